"""Adapting a trained model to one bin's scene: a few dozen labelled photos of its own floor.

A bin's camera sees one scene (its floor, light and lens), unlike the white board of the photos
the model learned from. :func:`adapt` fine-tunes all but the model's first blocks on that
site's photos and keeps what the site cannot show:

- the stem and the first blocks stay frozen (they see edges, which every scene shares; and a
  few dozen photos cannot retrain them), the rest learns at a small rate (a site's blur,
  distance and light change what the middle blocks see), and every BatchNorm stays in eval
  mode with its statistics frozen (the shipped default's are folded into its convolutions
  anyway, ``trainer.recover``);
- each photo is seen as ``views`` versions, the edge's own preprocessing of it and camera
  augmentations (``trainer.train.camera_augmentation``); their features at the frozen blocks'
  output are computed once and the rest trains on them for ``steps`` updates, so an update
  costs only the part that learns;
- a category missing from the site is kept by replay (photos of the base model's training side
  mixed in, learning their labels and the base model's answers on them) when replay photos are
  given, and by distillation otherwise: the student learns the base model's answers over the
  base categories on the site photos too;
- a category only the site has is added: the head grows a row, started from the mean of that
  category's site features (weight imprinting), so it answers sensibly from the first step;
- photos of the empty scene (filed as "not an item") are backdrops: each replay photo's item is
  cut off its white board and put on them (:func:`on_backdrops`), so every base category is
  also seen on the site's own floor, light and lens, many more times than the few labelled
  site photos show it; the items take the site's light, as its labelled photos show it
  (:func:`trainer.light.site_light`). With replay they alone (no labelled photo yet) are
  enough to start: the items are then learnt on the floor in their own light.

The folder of site photos has one sub-folder per category (a ``smartbin-collect`` folder);
files that are not images (sidecar ``.json``) are ignored, and so is the "not an item" folder
unless its label is asked for.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from smartbin.preprocessing import Preprocessing, decode_image, prepare
from trainer.cutout import composite, cut_out, encode
from trainer.data import Sample, photo_paths
from trainer.distill import distillation_loss
from trainer.light import site_light
from trainer.model import PixelClassifier, build_from_checkpoint
from trainer.train import camera_augmentation, choose_device

logger = logging.getLogger(__name__)

# The folder smartbin-collect files photos that show no item in. Like every folder whose name
# starts with a dot it is skipped, unless asked for; its label is then the name without the dot.
NOT_AN_ITEM = ".not-an-item"


class SiteError(ValueError):
    """A site folder or replay folder that cannot be adapted on; the message says what to fix."""


@dataclass(frozen=True)
class AdaptConfig:
    """How the blocks from ``train_from_block`` on are fine-tuned (defaults measured in
    docs/site-adaptation.md)."""

    steps: int = 100  # optimizer updates, whatever the photo count
    views: int = 3
    batch_size: int = 32
    lr: float = 1e-3  # the head's peak learning rate
    body_lr: float = 1e-4  # the trained blocks' peak learning rate
    weight_decay: float = 0.02
    train_from_block: int = 2  # blocks before this one stay frozen
    label_smoothing: float = 0.1
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    replay_views: int = 1
    replay_distill: bool = True  # replay photos also learn the base model's answers
    backdrop_views: int = 2  # each replay item on this many empty-scene photos (0: none)
    match_light: bool = True  # the items put there take the site's light (trainer.light)
    keep_base: float = 0.5  # the adapted weights are moved this share back toward the base's
    cutmix: float = 0.0  # share of the batches cut-mixed at the frozen blocks' output (0: none)
    seed: int = 0
    device: str = "auto"


@dataclass
class SitePhotos:
    """A site folder's photos: ``labels`` are the folder names, ``samples`` index into them."""

    root: Path
    labels: list[str]
    samples: list[Sample]
    fingerprint: str
    skipped_folders: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: sum(s.label == i for s in self.samples) for i, name in enumerate(self.labels)}


def site_fingerprint(files: Sequence[tuple[str, bytes]]) -> str:
    """sha256 over the sorted relative paths and each file's sha256: the same photos under the
    same names give the same fingerprint, whatever the folder is called or where it lies."""
    digest = hashlib.sha256()
    for relative, data in sorted(files):
        digest.update(f"{relative}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return digest.hexdigest()


def load_site(root: Path, keep: Sequence[str] = ()) -> SitePhotos:
    """The labelled photos of a site folder (one sub-folder per category). Folders whose names
    start with a dot (:data:`NOT_AN_ITEM`) are skipped unless named in ``keep``, and learnt
    then under their name without the dot. A folder with photos of the empty scene only gives
    no labelled photo; its fingerprint is then theirs.

    Raises:
        SiteError: the folder is missing or holds no photo in any category folder nor of the
            empty scene.
    """
    if not root.is_dir():
        raise SiteError(
            f"site folder {root} not found: pass a folder with one sub-folder per label"
        )
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    skipped = [d.name for d in folders if d.name.startswith(".") and d.name not in keep]
    labels: list[str] = []
    samples: list[Sample] = []
    files: list[tuple[str, bytes]] = []
    for folder in folders:
        if folder.name in skipped:
            continue
        photos = _photo_files(root, folder)
        if not photos:
            logger.warning("%s holds no photos: its label is treated as missing", folder)
            continue
        labels.append(folder.name.lstrip("."))
        files += photos
        samples += [Sample(relative, len(labels) - 1, data) for relative, data in photos]
    if not samples:
        # Photos of the empty scene alone still adapt the model to the floor (the replay items
        # are put on it); they are then what the fingerprint covers.
        files = [] if NOT_AN_ITEM in keep else _photo_files(root, root / NOT_AN_ITEM)
    if not files:
        raise SiteError(
            f"{root} holds no labelled photos: put each label's photos (.jpg, .png, ...) in a "
            f"sub-folder named after the label, or photos of the empty scene in {NOT_AN_ITEM}"
        )
    return SitePhotos(root, labels, samples, site_fingerprint(files), skipped)


def _photo_files(root: Path, folder: Path) -> list[tuple[str, bytes]]:
    """``folder``'s images as (path relative to ``root``, bytes)."""
    if not folder.is_dir():
        return []
    return [(str(p.relative_to(root)), p.read_bytes()) for p in photo_paths(folder)]


def load_backdrops(root: Path, folder: str = NOT_AN_ITEM) -> list[bytes]:
    """The photos of ``root/folder`` (the empty scene: what the bin filed as not an item)."""
    return [data for _, data in _photo_files(root, root / folder)]


def on_backdrops(
    photos: Sequence[Sample],
    backdrops: Sequence[bytes],
    per_photo: int,
    seed: int,
    light: np.ndarray | None = None,
) -> list[Sample]:
    """Each photo's item cut off its white board (:func:`trainer.cutout.cut_out`) and put on
    ``per_photo`` of ``backdrops``: a part of one, mirrored or not, at 50 to 100 % of the
    item's size, anywhere it fits, its colours multiplied by ``light`` (gains per channel,
    :func:`trainer.light.site_light`) when given. Every choice is drawn from the photo, the
    copy and ``seed``, so the same photos give the same composites. A photo whose board is not
    found (a box that fills its frame) is shrunk to 75 % and framed by the backdrop."""
    if not backdrops or per_photo == 0:
        return []
    floors = []
    for data in backdrops:
        with Image.open(io.BytesIO(data)) as image:
            floors.append(ImageOps.exif_transpose(image).convert("RGB"))
    composed: list[Sample] = []
    for sample in photos:
        with Image.open(io.BytesIO(sample.data)) as image:
            cut = cut_out(ImageOps.exif_transpose(image))
        if light is not None:
            lit = np.clip(cut.image * light.astype(np.float32), 0, 255).astype(np.uint8)
            cut = replace(cut, image=lit)
        width, height = cut.size
        for copy in range(per_photo):
            rng = np.random.default_rng(_view_seed(sample, 1000 + copy, seed))
            floor = floors[int(rng.integers(len(floors)))]
            if rng.random() < 0.5:
                floor = ImageOps.mirror(floor)
            part = ImageOps.fit(floor, (width, height), centering=tuple(rng.uniform(0, 1, 2)))
            scale = float(rng.uniform(0.5, 1.0))
            centre = (
                float(rng.uniform(width * scale / 2, width - width * scale / 2)),
                float(rng.uniform(height * scale / 2, height - height * scale / 2)),
            )
            photo = composite(cut, np.asarray(part, np.float32), scale, centre)
            composed.append(Sample(f"{sample.key}@backdrop{copy}", sample.label, encode(photo)))
    return composed


def merged_labels(base: Sequence[str], site: Sequence[str]) -> list[str]:
    """The base labels in their order, then the site's new ones in the site's order."""
    return [*base, *(name for name in site if name not in base)]


def relabel(samples: Sequence[Sample], names: Sequence[str], labels: Sequence[str]) -> list[Sample]:
    """``samples`` whose labels index ``names``, relabelled to index ``labels`` (by name)."""
    index = {name: i for i, name in enumerate(labels)}
    return [Sample(s.key, index[names[s.label]], s.data) for s in samples]


# ---------------------------------------------------------------------------------------------
# The model in two parts: the frozen trunk and the top that learns.


def _blocks(model: PixelClassifier) -> nn.Sequential:
    blocks = getattr(model.backbone, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise SiteError(
            f"{type(model.backbone).__name__} has no 'blocks': adaptation supports timm's "
            "EfficientNet family (tf_efficientnet_lite*, mobilenetv2_*)"
        )
    return blocks


@torch.no_grad()
def trunk_features(model: PixelClassifier, pixels: torch.Tensor, cut: int) -> torch.Tensor:
    """The output of the blocks before ``cut`` for NCHW pixels in 0..255."""
    backbone: Any = model.backbone
    x = backbone.bn1(backbone.conv_stem((pixels - model.offset) * model.scale))
    for block in _blocks(model)[:cut]:
        x = block(x)
    return x


def top_logits(model: PixelClassifier, features: torch.Tensor, cut: int) -> torch.Tensor:
    """The logits from :func:`trunk_features`' output: the blocks from ``cut`` on and the head."""
    backbone: Any = model.backbone
    x = features
    for block in _blocks(model)[cut:]:
        x = block(x)
    logits: torch.Tensor = backbone.forward_head(backbone.bn2(backbone.conv_head(x)))
    return logits


def pooled_features(model: PixelClassifier, features: torch.Tensor, cut: int) -> torch.Tensor:
    """What the classifier sees (the pooled head features), for weight imprinting."""
    backbone: Any = model.backbone
    x = features
    for block in _blocks(model)[cut:]:
        x = block(x)
    pooled: torch.Tensor = backbone.forward_head(
        backbone.bn2(backbone.conv_head(x)), pre_logits=True
    )
    return pooled


def grow_head(model: PixelClassifier, count: int, means: torch.Tensor | None = None) -> None:
    """Add ``count`` rows to the classifier. Each new row points along its category's mean
    pooled feature (``means``, one row per new category) at the old rows' mean length, with the
    old rows' mean bias, so a new category scores like an old one on its own photos."""
    if count == 0:
        return
    head = model.head()
    if not isinstance(head, nn.Linear):
        raise SiteError(f"the classifier is a {type(head).__name__}, not a Linear layer")
    grown = nn.Linear(head.in_features, head.out_features + count)
    with torch.no_grad():
        grown.weight[: head.out_features] = head.weight
        grown.bias[: head.out_features] = head.bias
        length = head.weight.norm(dim=1).mean()
        if means is None:
            means = torch.randn(count, head.in_features)
        grown.weight[head.out_features :] = F.normalize(means, dim=1) * length
        grown.bias[head.out_features :] = head.bias.mean()
    model.backbone.classifier = grown  # timm's EfficientNet family names its head so


# ---------------------------------------------------------------------------------------------
# Views of each photo and their trunk features, computed once.


def _view_seed(sample: Sample, view: int, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{view}\0".encode() + sample.data).digest()
    return int.from_bytes(digest[:4], "little")


def view_pixels(sample: Sample, view: int, spec: Preprocessing, seed: int) -> torch.Tensor:
    """View 0 is the photo as the bin prepares it; the others are camera augmentations, each
    drawn from a generator seeded by the photo, the view and ``seed`` (CHW float 0..255)."""
    if view == 0:
        return torch.from_numpy(prepare(sample.data, spec).copy()).permute(2, 0, 1).float()
    image = decode_image(sample.data, min_size=2 * spec.input_size)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_view_seed(sample, view, seed))
        augmented: torch.Tensor = camera_augmentation(spec.input_size)(pixels)
    return augmented.float()


class FeatureBank:
    """Trunk features of photo views, kept (as float16) so that a photo seen by several
    adaptations, or several passes, goes through the frozen blocks once."""

    def __init__(
        self, model: PixelClassifier, spec: Preprocessing, cut: int, device: torch.device
    ) -> None:
        self.model, self.spec, self.cut, self.device = model, spec, cut, device
        self.kept: dict[tuple[str, int, int], torch.Tensor] = {}

    def features(self, samples: Sequence[Sample], views: int, seed: int) -> torch.Tensor:
        """``(len(samples) * views, C, H, W)``: every view of the first photo, then the next."""
        keys = [(s.digest, v, seed) for s in samples for v in range(views)]
        todo = [
            (s, v) for s in samples for v in range(views) if (s.digest, v, seed) not in self.kept
        ]
        for start in range(0, len(todo), 32):
            batch = todo[start : start + 32]
            pixels = torch.stack([view_pixels(s, v, self.spec, seed) for s, v in batch])
            pixels = pixels.to(self.device).contiguous(memory_format=torch.channels_last)
            out = trunk_features(self.model, pixels, self.cut).half().cpu()
            for (sample, view), tensor in zip(batch, out, strict=True):
                self.kept[(sample.digest, view, seed)] = tensor
        return torch.stack([self.kept[k] for k in keys])


# ---------------------------------------------------------------------------------------------
# Fine-tuning.


@dataclass
class TrainingSet:
    """Trunk features with their labels and, for the rows ``distilled`` marks, the base
    model's probabilities (over the base labels, at the distillation temperature)."""

    features: torch.Tensor
    labels: torch.Tensor
    teacher: torch.Tensor | None = None
    distilled: torch.Tensor | None = None  # bool, one per row


def teacher_probabilities(
    base: PixelClassifier, features: torch.Tensor, config: AdaptConfig, device: torch.device
) -> torch.Tensor:
    """The base model's probabilities from trunk features, at the distillation temperature."""
    out = []
    with torch.no_grad():
        for start in range(0, len(features), 64):
            batch = features[start : start + 64].to(device).float()
            logits = top_logits(base, batch, config.train_from_block)
            out.append((logits.float() / config.distill_temperature).softmax(1).cpu())
    return torch.cat(out)


def _with_rows(data: TrainingSet, features: torch.Tensor, samples: Sequence[Sample]) -> TrainingSet:
    """``data`` and rows of ``features`` labelled by ``samples``, not distilled."""
    labels = torch.tensor([s.label for s in samples])
    grown = TrainingSet(torch.cat([data.features, features]), torch.cat([data.labels, labels]))
    if data.teacher is not None and data.distilled is not None:
        grown.teacher = torch.cat(
            [data.teacher, data.teacher.new_zeros(len(labels), data.teacher.shape[1])]
        )
        grown.distilled = torch.cat([data.distilled, torch.zeros(len(labels), dtype=torch.bool)])
    return grown


def _optimizer(model: PixelClassifier, config: AdaptConfig) -> torch.optim.Optimizer:
    head = list(model.head().parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    return torch.optim.AdamW(
        [{"params": body, "lr": config.body_lr}, {"params": head, "lr": config.lr}],
        weight_decay=config.weight_decay,
    )


def freeze_trunk(model: PixelClassifier, cut: int) -> None:
    """Only the blocks from ``cut`` on and the head learn; every BatchNorm stays in eval mode
    (the model is never put in train mode)."""
    model.requires_grad_(False)
    for block in _blocks(model)[cut:]:
        block.requires_grad_(True)
    backbone: Any = model.backbone
    backbone.conv_head.requires_grad_(True)
    backbone.bn2.requires_grad_(True)
    model.head().requires_grad_(True)
    model.eval()


def _batch_loss(
    model: PixelClassifier,
    data: TrainingSet,
    index: torch.Tensor,
    config: AdaptConfig,
    device: torch.device,
    base_label_count: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, int]:
    """The loss of one batch and how many of its answers were right."""
    features = data.features[index].to(device).float()
    targets = data.labels[index].to(device)
    partner, kept = torch.arange(len(index)), 1.0
    if config.cutmix and float(torch.rand(1, generator=generator)) < config.cutmix:
        features, partner, kept = cut_mix(features, generator)
    features = features.contiguous(memory_format=torch.channels_last)
    logits = top_logits(model, features, config.train_from_block)
    loss = kept * F.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)
    if kept < 1:
        loss = loss + (1 - kept) * F.cross_entropy(
            logits, targets[partner], label_smoothing=config.label_smoothing
        )
    if data.teacher is not None and data.distilled is not None:
        distilled = data.distilled[index]
        rows = (distilled & distilled[partner]).to(device)
        if rows.any():
            teacher = data.teacher[index]
            taught = (kept * teacher + (1 - kept) * teacher[partner]).to(device)[rows]
            soft = distillation_loss(
                logits[rows, :base_label_count], taught, config.distill_temperature
            )
            share = rows.float().mean()
            loss = (1 - config.distill_weight) * loss + config.distill_weight * share * soft
    return loss, int((logits.argmax(1) == targets).sum())


def cut_mix(
    features: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix on feature maps: a box of each row's map is replaced by the same box of another
    row's. Returns the mixed maps, which row each took its box from, and the share of the maps
    left as they were (the weight of each row's own label; the partner's gets the rest)."""
    height, width = features.shape[-2:]
    side = math.sqrt(1 - float(torch.rand(1, generator=generator)))  # box area ~ uniform(0, 1)
    box_h, box_w = round(height * side), round(width * side)
    top = int(torch.randint(0, height - box_h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - box_w + 1, (1,), generator=generator))
    partner = torch.randperm(len(features), generator=generator)
    mixed = features.clone()
    window = (..., slice(top, top + box_h), slice(left, left + box_w))
    mixed[window] = features[partner][window]
    return mixed, partner, 1 - box_h * box_w / (height * width)


def train_top(
    model: PixelClassifier,
    data: TrainingSet,
    config: AdaptConfig,
    device: torch.device,
    base_label_count: int,
) -> list[dict[str, float]]:
    """Fine-tune ``model``'s top on ``data`` for ``config.steps`` updates (a cosine schedule),
    in shuffled passes over the views; one row of figures per pass.

    A fixed count of updates, not of passes, keeps the time the same for 5 photos per label as
    for 50: few photos are seen more often, many photos each fewer times."""
    freeze_trunk(model, config.train_from_block)
    optimizer = _optimizer(model, config)
    total = config.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    generator = torch.Generator().manual_seed(config.seed)
    rows: list[dict[str, float]] = []
    done = 0
    while done < total:
        order = torch.randperm(len(data.labels), generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        for start in range(0, len(order), config.batch_size):
            if done == total:
                break
            index = order[start : start + config.batch_size]
            loss, right = _batch_loss(
                model, data, index, config, device, base_label_count, generator
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
            loss_sum += loss.item() * len(index)
            correct += right
            seen += len(index)
        rows.append(
            {
                "pass": len(rows) + 1,
                "updates": done,
                "loss": loss_sum / seen,
                "train_accuracy": correct / seen,
            }
        )
        logger.info(
            "adapt pass %d (%d updates): loss %.4f, train accuracy %.4f",
            len(rows),
            done,
            loss_sum / seen,
            correct / seen,
        )
    return rows


def toward_base(
    adapted: dict[str, torch.Tensor], base: dict[str, torch.Tensor], share: float
) -> dict[str, torch.Tensor]:
    """``adapted`` moved ``share`` of the way back to ``base``, tensor by tensor (weight-space
    interpolation, as WiSE-FT does): it keeps more of what the base knew (its training photos)
    at little cost on the site. Rows of a grown head that the base lacks stay as adapted."""
    mixed = {}
    for key, tensor in adapted.items():
        tensor = tensor.detach().cpu().clone()
        old = base.get(key)
        if old is not None and tensor.is_floating_point() and share:
            rows = old.shape[0] if old.dim() else None
            old = old.detach().cpu()
            if rows is None:
                tensor = (1 - share) * tensor + share * old
            else:
                tensor[:rows] = (1 - share) * tensor[:rows] + share * old
        mixed[key] = tensor
    return mixed


@dataclass
class Adapted:
    """The adapted model as a trainer checkpoint dict, and what the manifest records of it."""

    checkpoint: dict[str, Any]
    labels: list[str]
    added: list[str]
    missing: list[str]
    kept_by: str
    passes: list[dict[str, float]]
    backdrop_photos: int = 0  # replay items composed on the empty scene
    backdrop_light: list[float] | None = None  # the gains that lit them (RGB), if any


def adapt(
    base_checkpoint: dict[str, Any],
    site: SitePhotos,
    replay: Sequence[Sample] = (),
    config: AdaptConfig | None = None,
    bank: FeatureBank | None = None,
    backdrops: Sequence[bytes] = (),
) -> Adapted:
    """Fine-tune the model of ``base_checkpoint`` on ``site``'s photos.

    ``replay`` are photos of the base model's training side, labelled by index into the base
    labels; when there are none, the base model's answers are distilled instead. ``backdrops``
    are photos of the site's empty scene: the replay items are put on them too
    (:func:`on_backdrops`, ``config.backdrop_views`` each). ``bank``, a
    :class:`FeatureBank` on the same base model and cut, lets several adaptations share the
    features of the photos they share.
    """
    config = config or AdaptConfig()
    device = choose_device(config.device)
    torch.manual_seed(config.seed)
    base_labels = list(base_checkpoint["labels"])
    labels = merged_labels(base_labels, site.labels)
    added = labels[len(base_labels) :]
    missing = [name for name in base_labels if name not in site.labels]
    site_samples = relabel(site.samples, site.labels, labels)
    if not site_samples and not (replay and backdrops and config.backdrop_views):
        raise SiteError(
            f"{site.root} holds photos of the empty scene only: adapting to it takes replay "
            "photos to put on it (--replay, with --backdrop-views above 0)"
        )
    spec = Preprocessing.from_dict(base_checkpoint["preprocessing"])

    base = build_from_checkpoint(base_checkpoint).to(device).to(memory_format=torch.channels_last)
    _blocks(base)  # refuse an unsupported architecture before any work
    if bank is None:
        bank = FeatureBank(base, spec, config.train_from_block, device)
    site_targets = torch.tensor([s.label for s in site_samples], dtype=torch.long)
    site_targets = site_targets.repeat_interleave(config.views)
    features: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    if site_samples:  # none when only the empty scene was photographed
        site_features = bank.features(site_samples, config.views, config.seed)
        features, targets = [site_features], [site_targets]
    if replay:
        replay_features = bank.features(replay, config.replay_views, config.seed)
        features.append(replay_features)
        targets.append(
            torch.tensor([s.label for s in replay]).repeat_interleave(config.replay_views)
        )
    light = None
    if site_samples and replay and backdrops and config.backdrop_views and config.match_light:
        light = site_light(site_samples, backdrops, replay)
        logger.info("the site's light on the replay items: %s", light)
    composed = on_backdrops(replay, backdrops, config.backdrop_views, config.seed, light)
    data = TrainingSet(torch.cat(features), torch.cat(targets))
    # Without replay the base model's answers on the site photos keep the missing labels; with
    # it, its answers on the replay photos keep what it did on its own photos, beside their
    # labels (the replay photos' trunk features are the base model's own, so this costs nothing).
    if not replay or config.replay_distill:
        data.teacher = teacher_probabilities(base, data.features, config, device)
        data.distilled = torch.ones(len(data.labels), dtype=torch.bool)
        if replay:
            data.distilled[: len(site_targets)] = False
    if composed:
        # The items on the site's floor learn their labels only: the base model's answers
        # there are what the adaptation is to correct.
        data = _with_rows(data, bank.features(composed, 1, config.seed), composed)

    model = build_from_checkpoint(base_checkpoint).to(device).to(memory_format=torch.channels_last)
    new_rows = [
        pooled_features(
            model,
            site_features[site_targets == labels.index(name)].to(device).float(),
            config.train_from_block,
        ).mean(0)
        for name in added
    ]
    with torch.no_grad():
        grow_head(model, len(added), torch.stack(new_rows).cpu() if new_rows else None)
    model.to(device)
    logger.info(
        "adapting on %d site photos (%s) x %d views, %d replay photos, %d of them on %d "
        "empty-scene photos; added %s, kept %s by %s",
        len(site_samples),
        site.counts(),
        config.views,
        len(replay),
        len(composed),
        len(backdrops),
        added or "none",
        missing or "none",
        "replay" if replay else "distillation",
    )
    rows = train_top(model, data, config, device, len(base_labels))
    model.eval()
    state = toward_base(model.state_dict(), base.state_dict(), config.keep_base)
    checkpoint = {
        "arch": base_checkpoint["arch"],
        "labels": labels,
        "preprocessing": spec.to_dict(),
        "state_dict": state,
        "split": {"fingerprint": site.fingerprint},
        "data": str(site.root),
    }
    kept_by = "replay" if replay else "distillation"
    lit = None if light is None else [round(float(g), 3) for g in light]
    return Adapted(checkpoint, labels, added, missing, kept_by, rows, len(composed), lit)


def pick_replay(
    samples: Sequence[Sample],
    names: Sequence[str],
    labels: Sequence[str],
    per_label: int,
    seed: int,
) -> list[Sample]:
    """Up to ``per_label`` photos of each label that ``labels`` has, drawn with ``seed``,
    relabelled to index ``labels``; photos of other labels are left out."""
    rng = np.random.default_rng(seed)
    chosen: list[Sample] = []
    for index, name in enumerate(names):
        if name not in labels:
            logger.warning("replay photos of %r left out: the model has no such label", name)
            continue
        of_label = [s for s in samples if s.label == index]
        picked = rng.permutation(len(of_label))[:per_label]
        chosen.extend(of_label[i] for i in sorted(picked))
    return relabel(chosen, names, labels)
