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


def photo_paths(folder: Path) -> list[Path]:
    """Every image under ``folder`` (sub-folders included), in a stable order."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _load_folder(root: Path) -> ImageSet:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{root} needs one sub-folder per class (two or more), found {classes}")
    samples: list[Sample] = []
    for label, name in enumerate(classes):
        files = photo_paths(root / name)
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
    """A 16x16 greyscale thumbnail, flattened: a resized or re-encoded copy is nearly equal."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (64, 64))
        small = image.convert("L").resize((16, 16), Image.Resampling.BOX)
        return np.asarray(small, dtype=np.float64).reshape(-1)


def deduplicate(
    samples: Sequence[Sample], max_rms_difference: float = 2.0
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Keep the first sample of each photo, in key order.

    A photo is a duplicate when its bytes are identical to an earlier one, or when its thumbnail
    differs from a kept photo's by at most ``max_rms_difference`` grey levels (root mean square):
    a resized or re-encoded copy, like the full-size and resized twins of the hub's TrashNet.

    Returns:
        The kept samples and ``(dropped_key, kept_key)`` pairs.
    """
    ordered = sorted(samples, key=lambda s: s.key)
    thumbs = np.stack([thumbnail(s.data) for s in ordered]) if ordered else np.empty((0, 256))
    squares = (thumbs**2).sum(axis=1)
    limit = max_rms_difference**2 * thumbs.shape[1]
    by_digest: dict[str, str] = {}
    kept_rows: list[int] = []
    dropped = []
    for row, sample in enumerate(ordered):
        first = by_digest.get(sample.digest)
        if first is None and kept_rows:
            # Squared distances to every kept thumbnail at once: |a|^2 + |b|^2 - 2 a.b
            distances = squares[kept_rows] + squares[row] - 2 * thumbs[kept_rows] @ thumbs[row]
            nearest = int(np.argmin(distances))
            if distances[nearest] <= limit:
                first = ordered[kept_rows[nearest]].key
        if first is not None:
            dropped.append((sample.key, first))
            continue
        by_digest[sample.digest] = sample.key
        kept_rows.append(row)
    return [ordered[row] for row in kept_rows], dropped


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


def first_per_class(samples: Sequence[Sample], count: int) -> list[Sample]:
    """The first ``count`` samples of each class, in their order."""
    seen: dict[int, int] = {}
    chosen = []
    for sample in samples:
        if seen.get(sample.label, 0) < count:
            seen[sample.label] = seen.get(sample.label, 0) + 1
            chosen.append(sample)
    return chosen
