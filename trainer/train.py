"""``smartbin-train``: fine-tune an ImageNet-pretrained timm model on labelled photos.

Every run writes a folder: args.yaml, split.json (with its fingerprint), summary.csv (one row per
epoch), curves.png, confusion_*.png, report.json and checkpoint.pt. The checkpoint carries the
class list, the preprocessing and the split, so the converter needs nothing else.

Under ``torchrun`` the same command trains in several processes (trainer/distributed.py); rank 0
writes the run folder, and its checkpoint is the one a single process would have written.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from smartbin.preprocessing import Preprocessing, decode_image
from trainer import distributed
from trainer.backgrounds import (
    DEFAULT_PLACEMENT,
    BackdropPhotos,
    Cutouts,
    Photometric,
    Placement,
    replace_background,
)
from trainer.config import ConfigError, TrainConfig, add_arguments
from trainer.cutout import Cutout
from trainer.data import SPLITS, Sample, first_per_class, load_source, make_split_manifest, select
from trainer.distill import Teachers, distillation_loss, load_checkpoint
from trainer.distributed import Ranks
from trainer.evaluate import classification_report, eval_tensor, plot_confusion, predict
from trainer.model import PixelClassifier, create_classifier, default_preprocessing
from trainer.qat import (
    attach_fake_quant,
    freeze_batchnorm,
    plain_state_dict,
    pool_ranges,
    start_rounding,
)

logger = logging.getLogger(__name__)


def camera_augmentation(size: int) -> v2.Compose:
    """Augmentation for photos from other bins: framing, orientation, light, colour, focus."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomApply([v2.RandomRotation(25)], p=0.5),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.05)], p=0.8),
            v2.RandomGrayscale(0.05),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.2),
        ]
    )


class TrainImages(Dataset):
    """Training photos decoded once (uint8 CHW), augmented on every read.

    With ``backgrounds`` above 0 each item is cut off its board once, and on that share of the
    reads put on a random backdrop (as ``placement`` says) before the camera augmentation;
    ``photometric`` "strong" adds other cameras' white balance, smear, noise, resolution and
    JPEG after it (:mod:`trainer.backgrounds`).
    """

    def __init__(
        self,
        samples: list[Sample],
        size: int,
        backgrounds: float = 0.0,
        photometric: str = "camera",
        placement: Placement = DEFAULT_PLACEMENT,
        backdrop_photos: BackdropPhotos | None = None,
    ) -> None:
        # Decode at about twice the model input: crops stay sharp and memory stays small.
        self.images = [
            torch.from_numpy(np.array(decode_image(s.data, min_size=2 * size)))
            .permute(2, 0, 1)
            .contiguous()
            for s in samples
        ]
        self.labels = [s.label for s in samples]
        self.transform = camera_augmentation(size)
        self.backgrounds = backgrounds
        self.placement = placement
        self.backdrop_photos = backdrop_photos
        self.cutouts = Cutouts.of([_hwc(image) for image in self.images]) if backgrounds else None
        self.photometric = Photometric() if photometric == "strong" else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        # A generator per read, from torch's: each loader process draws its own.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
        if self.cutouts is not None and rng.random() < self.backgrounds:
            cut = self.cutouts.cutout(index, _hwc(image))
            image = _chw(
                replace_background(cut, rng, self.placement, self._other_item, self.backdrop_photos)
            )
        image = self.transform(image)
        if self.photometric is not None:
            image = _chw(self.photometric(_hwc(image), rng))
        return image.float(), self.labels[index]

    def _other_item(self, rng: np.random.Generator) -> Cutout:
        assert self.cutouts is not None
        index = int(rng.integers(len(self.images)))
        return self.cutouts.cutout(index, _hwc(self.images[index]))


def _hwc(image: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def _chw(photo: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(photo)).permute(2, 0, 1).contiguous()  # a writable copy


@dataclass
class Split:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The run's config: a ``--config`` recipe, overridden by the flags given; exits with the
    parser's usage error naming each refused key (and its file) or flag."""
    parser = argparse.ArgumentParser(
        prog="smartbin-train",
        description=(__doc__ or "").splitlines()[0],
        epilog="Every flag is also a recipe key: --batch-size 16 is batch_size: 16.",
    )
    add_arguments(parser)
    flags = vars(parser.parse_args(argv))
    recipe = flags.pop("config", None)
    try:
        return TrainConfig.from_sources(recipe, flags)
    except ConfigError as err:
        parser.error(str(err))


def make_optimizer(
    model: PixelClassifier, config: TrainConfig, factor: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW with two parameter groups: the body at ``body_lr``, the new head at ``lr`` (both
    times ``factor``, the learning-rate scaling of a run in several processes).

    Both groups hold ``lr``; the body's ``lr_scale``, by which timm's schedulers multiply every
    value they set, brings it to ``body_lr``, so that one schedule serves both groups.
    """
    head = list(model.head().parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    return torch.optim.AdamW(
        [
            {"params": body, "lr": config.lr * factor, "lr_scale": config.body_lr / config.lr},
            {"params": head, "lr": config.lr * factor},
        ],
        weight_decay=config.weight_decay,
    )


def lr_schedule(
    optimizer: torch.optim.Optimizer, updates: int, warmup_updates: int
) -> CosineLRScheduler:
    """Linear warm-up over ``warmup_updates``, then cosine decay to 0 at ``updates``; call
    ``step_update(n)`` after the n-th optimizer update.

    The first update runs at 1/``warmup_updates`` of the peak, the first one after the warm-up
    at the peak. The groups share one peak ``lr`` and differ by their ``lr_scale``.
    """
    if not 0 <= warmup_updates < updates:
        raise ValueError(f"{warmup_updates} warm-up updates leave no room in {updates} updates")
    peaks = {group["lr"] for group in optimizer.param_groups}
    if len(peaks) != 1:
        raise ValueError(f"parameter groups at learning rates {peaks}: use lr_scale instead")
    (peak,) = peaks
    return CosineLRScheduler(
        optimizer,
        t_initial=updates - warmup_updates,
        warmup_t=warmup_updates,
        warmup_lr_init=peak / warmup_updates if warmup_updates else 0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


@dataclass
class Objective:
    """The loss of a batch: the labels, mixed with the teachers' answers when there are any."""

    labels: nn.Module
    teachers: Teachers | None = None
    weight: float = 0.0
    temperature: float = 1.0

    def __call__(
        self, logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        loss = self.labels(logits, targets)
        if self.teachers is None:
            return loss
        taught = self.teachers.probabilities(inputs, self.temperature)
        soft = distillation_loss(logits, taught, self.temperature)
        return (1 - self.weight) * loss + self.weight * soft


Progress = Callable[[Iterable[Any]], Iterable[Any]]


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: CosineLRScheduler,
    loss_fn: Objective,
    device: torch.device,
    progress: Progress = iter,
    ema: ModelEmaV3 | None = None,
    updates: int = 0,
) -> tuple[dict[str, float], int]:
    """One pass over ``loader``; ``updates`` counts the optimizer updates before it.

    In several processes ``model`` is the DistributedDataParallel one, the average follows the
    plain model inside it, and the figures are those of every process's images together.

    Returns:
        The epoch's figures (with ``lr``, the head's learning rate at its last update, and
        ``images``, the count trained on) and the count of updates after it.
    """
    model.train()
    total, correct, loss_sum, lr = 0.0, 0.0, 0.0, 0.0
    for inputs, targets in progress(loader):
        inputs = inputs.to(device, non_blocking=True, memory_format=torch.channels_last)
        targets = targets.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(inputs)
            loss = loss_fn(logits, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[-1]["lr"]
        optimizer.step()
        updates += 1
        scheduler.step_update(updates)  # the learning rates of the next update
        if ema is not None:
            ema.update(distributed.unwrap(model), step=updates)  # its decay warms up
        total += len(targets)
        correct += int((logits.argmax(1) == targets).sum())
        loss_sum += loss.item() * len(targets)
    loss_sum, correct, total = distributed.sum_across([loss_sum, correct, total])
    figures = {"train_loss": loss_sum / total, "train_accuracy": correct / total, "lr": lr}
    return {**figures, "images": total}, updates


def _progress(desc: str) -> Progress:
    try:
        from tqdm import tqdm
    except ImportError:
        return iter
    return lambda it: tqdm(it, desc=desc, leave=False)


def _plot_curves(rows: list[dict[str, float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [r["epoch"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["train_loss"] for r in rows], label="train loss")
    left.legend()
    right.plot(epochs, [r["train_accuracy"] for r in rows], label="train accuracy")
    right.plot(epochs, [r["val_accuracy"] for r in rows], label="val accuracy")
    right.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class RunLog:
    """summary.csv rows, and MLflow when available and wanted; a log that does not ``write``
    (that of a process other than rank 0) only keeps its rows."""

    def __init__(self, folder: Path, config: TrainConfig, write: bool = True) -> None:
        self.folder = folder
        self.write = write
        self.rows: list[dict[str, float]] = []
        self.mlflow = None
        if config.mlflow and write:
            try:
                import mlflow
            except ImportError:
                logger.info("mlflow is not installed; logging to %s only", folder)
            else:
                import os

                if not os.environ.get("MLFLOW_TRACKING_URI"):
                    # A local file store needs no server; mlflow-skinny has no SQL backend.
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                    mlflow.set_tracking_uri((config.out / "mlruns").resolve().as_uri())
                mlflow.set_experiment("smartbin")
                mlflow.start_run(run_name=folder.name)
                mlflow.log_params({k: str(v) for k, v in config.model_dump(mode="json").items()})
                self.mlflow = mlflow

    def epoch(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        if not self.write:
            return
        with (self.folder / "summary.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(self.rows)
        if self.mlflow:
            self.mlflow.log_metrics(
                {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
            )

    def finish(self, metrics: dict[str, float]) -> None:
        if not self.write:
            return
        _plot_curves(self.rows, self.folder / "curves.png")
        if self.mlflow:
            self.mlflow.log_metrics(metrics)
            for name in ("curves.png", "confusion_test.png", "report.json", "split.json"):
                if (self.folder / name).exists():
                    self.mlflow.log_artifact(str(self.folder / name))
            self.mlflow.end_run()


def load_split(config: TrainConfig) -> tuple[list[str], dict[str, Any], Split]:
    image_set = load_source(config.data)
    if config.split:
        manifest = json.loads(config.split.read_text())
    else:
        manifest = make_split_manifest(image_set, seed=config.split_seed)
    sides = {name: select(image_set, manifest, name) for name in SPLITS}
    if config.limit_per_class:
        sides = {
            name: first_per_class(side, config.limit_per_class) for name, side in sides.items()
        }
    return image_set.classes, manifest, Split(**sides)


def choose_device(requested: str) -> torch.device:
    """``auto`` takes CUDA when present and the CPU otherwise."""
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_student(
    config: TrainConfig, classes: list[str], spec: Preprocessing, fingerprint: str
) -> PixelClassifier:
    """The model to train: ImageNet (or random) weights, or ``--init``'s checkpoint."""
    if config.weights is None and not config.hub_pretrained and config.init is None:
        logger.warning("no pretrained weights given: %s starts from random weights", config.arch)
    model = create_classifier(
        config.arch, len(classes), spec, config.weights, config.hub_pretrained
    )
    if config.init:
        start = load_checkpoint(config.init, classes, fingerprint)
        trained = (start["arch"], start["preprocessing"]["input_size"])
        if trained != (config.arch, spec.input_size):
            raise ValueError(
                f"{config.init} is {trained[0]} at {trained[1]} px, this run trains {config.arch} "
                f"at {spec.input_size} px: pass --arch {trained[0]} --img-size {trained[1]}"
            )
        model.load_state_dict(start["state_dict"])
    return model


def train_loader(
    samples: list[Sample], size: int, config: TrainConfig, cuda: bool, ranks: Ranks | None = None
) -> DataLoader:
    """Shuffled batches of augmented training photos; among several processes, each takes its
    own share of every epoch (a ``DistributedSampler`` seeded alike on all of them, padded so
    that every process has as many batches)."""
    placement = Placement(other_items=config.other_items, photos=config.photos)
    photos = BackdropPhotos(config.backdrop_photos) if config.backdrop_photos else None
    images = TrainImages(samples, size, config.backgrounds, config.photometric, placement, photos)
    sampler: DistributedSampler[tuple[torch.Tensor, int]] | None = None
    if ranks is not None and ranks.distributed:
        sampler = DistributedSampler(
            images, ranks.world_size, ranks.rank, shuffle=True, seed=config.seed
        )
    count = len(sampler) if sampler is not None else len(samples)
    return DataLoader(
        images,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=count > config.batch_size,
        num_workers=config.workers,
        persistent_workers=config.workers > 0,
        pin_memory=cuda,
    )


@dataclass
class Best:
    """The epoch whose weights the checkpoint keeps (the best val accuracy so far, or the
    latest with ``--keep last``), its val accuracy and its weights."""

    accuracy: float = -1.0
    epoch: int = 0
    state: dict[str, torch.Tensor] | None = None


def _val_accuracy(
    model: nn.Module, val: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> float:
    return float((predict(model, val[0], device).argmax(1) == val[1].numpy()).mean())


def _epoch_row(
    row: dict[str, float],
    evaluated: nn.Module,
    val: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    epoch: int,
    started: float,
) -> dict[str, float]:
    """The epoch's figures with val accuracy, measured by rank 0 and given to every process."""
    if distributed.is_main():
        accuracy = _val_accuracy(evaluated, val, device)
        row.update(epoch=epoch, val_accuracy=accuracy, seconds=time.time() - started)
    return distributed.from_main(row)


def fit(
    model: PixelClassifier,
    loader: DataLoader,
    val: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Objective,
    device: torch.device,
    log: RunLog,
    config: TrainConfig,
) -> Best:
    """Train up to ``config.epochs``, stopping early on val accuracy (with ``keep`` best) or the
    time limit; the model is left with the kept epoch's weights.

    Among several processes the model trains inside DistributedDataParallel at the learning
    rates of ``--lr-scaling``; rank 0's epoch row and time-limit decision are every process's,
    so that all of them stop after the same epoch and keep the same one's weights.
    """
    factor = distributed.lr_factor(config.lr_scaling, distributed.world_size())
    optimizer = make_optimizer(model, config, factor)
    scheduler = lr_schedule(
        optimizer, config.epochs * len(loader), config.warmup_epochs * len(loader)
    )
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema_decay else None
    trained = distributed.wrap(model, device)
    deadline = time.time() + 60 * config.max_minutes if config.max_minutes else math.inf
    best = Best()
    updates = 0
    for epoch in range(1, config.epochs + 1):
        started = time.time()
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)  # each process's share changes every epoch
        progress = _progress(f"epoch {epoch}/{config.epochs}") if distributed.is_main() else iter
        row, updates = train_one_epoch(
            trained, loader, optimizer, scheduler, loss_fn, device, progress, ema, updates
        )
        row["images_per_second"] = row["images"] / (time.time() - started)
        evaluated = ema.module if ema is not None else model
        row = _epoch_row(row, evaluated, val, device, epoch, started)
        log.epoch(row)
        logger.info("epoch %d: %s", epoch, {k: float(f"{v:.4g}") for k, v in row.items()})
        if row["val_accuracy"] > best.accuracy or config.keep == "last":
            state = {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}
            best = Best(row["val_accuracy"], epoch, state)
        elif epoch - best.epoch >= config.patience:
            logger.info("no better val accuracy for %d epochs: stopping", config.patience)
            break
        if distributed.from_main(time.time() > deadline):
            logger.info("time limit of %s minutes reached: stopping", config.max_minutes)
            break
    if best.state is not None:  # None only if no epoch ran, which parse_args rules out
        model.load_state_dict(best.state)
    return best


def evaluate_sides(
    model: PixelClassifier,
    split: Split,
    spec: Preprocessing,
    classes: list[str],
    device: torch.device,
    folder: Path,
    kind: str = "float",
) -> dict[str, dict[str, Any]]:
    """Reports for val and test, with their confusion pictures (titled ``kind``) in the run
    folder."""
    reports = {}
    for name, samples in (("val", split.val), ("test", split.test)):
        inputs, targets = eval_tensor(samples, spec)
        probabilities = predict(model, inputs, device)
        reports[name] = classification_report(probabilities, targets.numpy(), classes)
        plot_confusion(reports[name], classes, folder / f"confusion_{name}.png", f"{kind} {name}")
    (folder / "report.json").write_text(json.dumps(reports, indent=1))
    return reports


def _open_folder(config: TrainConfig, manifest: dict[str, Any], ranks: Ranks) -> Path:
    """The run folder (named by rank 0, for every process), written by rank 0."""
    name = config.name or f"{config.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = config.out / distributed.from_main(name)
    if ranks.main:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "args.yaml").write_text(config.to_yaml())
        (folder / "split.json").write_text(json.dumps(manifest, indent=1))
    return folder


def _log_processes(config: TrainConfig, ranks: Ranks, device: torch.device) -> None:
    """Say how a run in several processes batches and at which learning rates."""
    if not ranks.distributed:
        return
    factor = distributed.lr_factor(config.lr_scaling, ranks.world_size)
    logger.info(
        "%d processes (%s): batch %d per process, effective batch %d; peak learning rates "
        "%.3g (head) and %.3g (body): the recipe's times %.3g (--lr-scaling %s)",
        ranks.world_size,
        "NCCL" if device.type == "cuda" else "gloo",
        config.batch_size,
        config.batch_size * ranks.world_size,
        config.lr * factor,
        config.body_lr * factor,
        factor,
        config.lr_scaling,
    )


def _objective(
    config: TrainConfig, classes: list[str], fingerprint: str, device: torch.device
) -> Objective:
    """The loss: label-smoothed cross-entropy, mixed with the teachers' answers if any."""
    teachers = None
    if config.teacher:
        teachers = Teachers([load_checkpoint(p, classes, fingerprint) for p in config.teacher])
        teachers.to(device).to(memory_format=torch.channels_last)
    return Objective(
        nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        teachers,
        config.distill_weight,
        config.distill_temperature,
    )


def _save(
    model: PixelClassifier,
    config: TrainConfig,
    classes: list[str],
    spec: Preprocessing,
    manifest: dict[str, Any],
    best: Best,
    reports: dict[str, dict[str, Any]],
    checkpoint: Path,
) -> None:
    torch.save(
        {
            "arch": config.arch,
            "labels": classes,
            "preprocessing": spec.to_dict(),
            "state_dict": plain_state_dict(model),
            "split": manifest,
            "data": config.data,
            "best_epoch": best.epoch,
            "metrics": {
                n: {k: r[k] for k in ("accuracy", "macro_f1", "ece")} for n, r in reports.items()
            },
        },
        checkpoint,
    )


def run(config: TrainConfig) -> Path:
    """Train, evaluate on val and test, write the run folder; returns the checkpoint path.

    Under torchrun every process runs this and returns the path rank 0 wrote, once it is there.
    """
    ranks = Ranks.from_environment()
    if ranks.distributed:
        device = distributed.rank_device(config.device, ranks.local_rank)
    else:
        device = choose_device(config.device)
    with distributed.process_group(ranks, device):
        return _train(config, ranks, device)


def _train(config: TrainConfig, ranks: Ranks, device: torch.device) -> Path:
    torch.manual_seed(config.seed)
    classes, manifest, split = load_split(config)
    fingerprint = manifest["fingerprint"]
    distributed.agree(fingerprint, "split fingerprint")
    spec = default_preprocessing(config.arch, config.img_size)
    folder = _open_folder(config, manifest, ranks)
    logger.info(
        "classes %s; train %d, val %d, test %d images; %s on %s",
        classes,
        len(split.train),
        len(split.val),
        len(split.test),
        config.arch,
        device,
    )
    _log_processes(config, ranks, device)

    model = build_student(config, classes, spec, fingerprint)
    # Channels-last runs the depthwise convolutions a third faster on CPU (and suits GPUs too).
    model.to(device).to(memory_format=torch.channels_last)
    if config.freeze_batchnorm:
        freeze_batchnorm(model)
    loss_fn = _objective(config, classes, fingerprint, device)
    log = RunLog(folder, config, write=ranks.main)
    if ranks.distributed:  # the same start everywhere, then each process its own augmentation
        torch.manual_seed(config.seed + ranks.rank)
    loader = train_loader(split.train, spec.input_size, config, device.type == "cuda", ranks)
    if config.qat:
        ranges = attach_fake_quant(model)
        start_rounding(model, ranges, loader, device)
        pool_ranges(ranges)
    best = fit(model, loader, eval_tensor(split.val, spec), loss_fn, device, log, config)

    checkpoint = folder / "checkpoint.pt"
    if ranks.main:
        kind = "simulated int8" if config.qat else "float"
        reports = evaluate_sides(model, split, spec, classes, device, folder, kind)
        _save(model, config, classes, spec, manifest, best, reports, checkpoint)
        test_accuracy = reports["test"]["accuracy"]
        log.finish({"best_val_accuracy": best.accuracy, "test_accuracy": test_accuracy})
        logger.info(
            "kept epoch %d (%s): val %.4f, test %.4f -> %s",
            best.epoch,
            config.keep,
            best.accuracy,
            test_accuracy,
            checkpoint,
        )
    distributed.barrier()  # the checkpoint is written when any process returns its path
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    ranks = Ranks.from_environment()
    where = f"[rank {ranks.rank}/{ranks.world_size}] " if ranks.distributed else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {where}%(message)s")
    run(parse_args(argv))


if __name__ == "__main__":
    main()
