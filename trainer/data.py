"""Training data: load an image folder or a Hugging Face dataset, deduplicate, split.

Class names come from the data (sub-folder names, or the dataset's ClassLabel feature), never
from code. The split is written as a manifest with a fingerprint, and the converter reuses the
split recorded in the checkpoint, so every step sees the same train/val/test sides.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One labelled photo, kept encoded in memory (TrashNet is ~43 MB)."""

    key: str
    label: int
    data: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class ImageSet:
    """Every sample of a source, with the class names in label-index order."""

    source: str
    classes: list[str]
    samples: list[Sample]


def load_source(source: str) -> ImageSet:
    """Load a local folder (one sub-folder per class) or a Hugging Face hub dataset id."""
    if Path(source).is_dir():
        return _load_folder(Path(source))
    return _load_hub(source)


def _load_folder(root: Path) -> ImageSet:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{root} needs one sub-folder per class (two or more), found {classes}")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class folder {root / name} holds no images")
        samples.extend(Sample(str(p.relative_to(root)), label, p.read_bytes()) for p in files)
    return ImageSet(str(root), classes, samples)


def _load_hub(hub_id: str) -> ImageSet:
    import datasets  # only needed for hub ids; the GPU box and the bin lack it

    loaded = datasets.load_dataset(hub_id)
    splits = list(loaded.values())
    label_feature = splits[0].features["label"]
    samples = []
    for split_name, split in zip(loaded.keys(), splits, strict=True):
        split = split.cast_column("image", datasets.Image(decode=False))
        for index, row in enumerate(split):
            data = row["image"]["bytes"] or Path(row["image"]["path"]).read_bytes()
            samples.append(Sample(f"{split_name}/{index}", int(row["label"]), data))
    return ImageSet(hub_id, list(label_feature.names), samples)


def thumbnail(data: bytes) -> np.ndarray:
    """A 32x32 greyscale thumbnail: the same photo re-encoded or resized gives nearly the same."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (64, 64))
        return np.asarray(
            image.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32
        )


def difference_hash(thumb: np.ndarray) -> bytes:
    """64-bit difference hash of a thumbnail, used to find candidate duplicates quickly."""
    small = thumb.reshape(8, 4, 32).mean(axis=1).reshape(8, 8, 4).mean(axis=2)
    return (
        np.packbits(small[:, 1:] > small[:, :-1]).tobytes()
        + np.packbits(small[1:, :] > small[:-1, :]).tobytes()
    )


def deduplicate(
    samples: Sequence[Sample], max_mean_difference: float = 3.0
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Keep the first sample of each photo, in key order.

    A photo is a duplicate when its bytes are identical to an earlier one, or when it has the
    same difference hash and its thumbnail differs by at most ``max_mean_difference`` grey levels
    on average (a resized or re-encoded copy). The thumbnail check keeps distinct photos whose
    hashes collide, such as plain sheets on a plain background.

    Returns:
        The kept samples and ``(dropped_key, kept_key)`` pairs.
    """
    by_digest: dict[str, str] = {}
    by_hash: dict[bytes, list[tuple[str, np.ndarray]]] = {}
    kept, dropped = [], []
    for sample in sorted(samples, key=lambda s: s.key):
        first = by_digest.get(sample.digest)
        thumb = thumbnail(sample.data)
        candidates = by_hash.setdefault(difference_hash(thumb), [])
        if first is None:
            first = next(
                (
                    key
                    for key, other in candidates
                    if np.abs(other - thumb).mean() <= max_mean_difference
                ),
                None,
            )
        if first is not None:
            dropped.append((sample.key, first))
            continue
        by_digest[sample.digest] = sample.key
        candidates.append((sample.key, thumb))
        kept.append(sample)
    return kept, dropped


def split_samples(
    samples: Sequence[Sample],
    num_classes: int,
    seed: int = 0,
    fractions: tuple[float, float] = (0.70, 0.15),
) -> dict[str, list[str]]:
    """Stratified train/val/test split of sample keys; test takes what train and val leave."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    for label in range(num_classes):
        keys = sorted(s.key for s in samples if s.label == label)
        keys = [keys[i] for i in rng.permutation(len(keys))]
        n_train = round(len(keys) * fractions[0])
        n_val = round(len(keys) * fractions[1])
        out["train"] += keys[:n_train]
        out["val"] += keys[n_train : n_train + n_val]
        out["test"] += keys[n_train + n_val :]
    return {name: sorted(keys) for name, keys in out.items()}


def make_split_manifest(
    image_set: ImageSet, seed: int = 0, fractions: tuple[float, float] = (0.70, 0.15)
) -> dict[str, Any]:
    """Deduplicate and split, returning a JSON-able manifest with a fingerprint."""
    kept, dropped = deduplicate(image_set.samples)
    splits = split_samples(kept, len(image_set.classes), seed, fractions)
    digests = {s.key: s.digest for s in kept}
    body = {
        "classes": image_set.classes,
        "splits": {name: [[key, digests[key]] for key in keys] for name, keys in splits.items()},
    }
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    logger.info(
        "split %s: %s, %d duplicates dropped",
        fingerprint,
        {k: len(v) for k, v in splits.items()},
        len(dropped),
    )
    return {
        "source": image_set.source,
        "seed": seed,
        "fractions": list(fractions),
        "fingerprint": fingerprint,
        "duplicates_dropped": dropped,
        **body,
    }


def select(image_set: ImageSet, manifest: dict[str, Any], split: str) -> list[Sample]:
    """The samples of one side of a split manifest, checked against their recorded bytes."""
    if list(manifest["classes"]) != image_set.classes:
        raise ValueError(
            f"split manifest classes {manifest['classes']} differ from the data's "
            f"{image_set.classes}"
        )
    by_key = {s.key: s for s in image_set.samples}
    chosen = []
    for key, digest in manifest["splits"][split]:
        sample = by_key.get(key)
        if sample is None or sample.digest != digest:
            raise ValueError(f"{key} is missing or changed since split {manifest['fingerprint']}")
        chosen.append(sample)
    return chosen
