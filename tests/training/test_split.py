"""The split: deduplicated by content, stratified, fingerprinted, no photo on two sides."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from trainer.data import SPLITS, ImageSet, Sample, load_source, make_split_manifest, select


def test_no_photo_sits_on_two_sides(tiny_data: Path) -> None:
    image_set = load_source(str(tiny_data))
    manifest = make_split_manifest(image_set, seed=0)
    seen_keys: dict[str, str] = {}
    seen_digests: dict[str, str] = {}
    for side in SPLITS:
        for key, digest in manifest["splits"][side]:
            assert key not in seen_keys and digest not in seen_digests
            seen_keys[key] = seen_digests[digest] = side
    kept = len(image_set.samples) - len(manifest["duplicates_dropped"])
    assert len(seen_keys) == kept


def test_copies_are_dropped_even_when_resized_or_relabelled(tiny_data: Path) -> None:
    image_set = load_source(str(tiny_data))
    original = image_set.samples[0]
    with Image.open(io.BytesIO(original.data)) as image:
        buffer = io.BytesIO()
        image.resize((image.width // 2, image.height // 2)).save(buffer, "JPEG", quality=80)
    copies = [
        Sample("zz/resized.jpg", original.label, buffer.getvalue()),
        Sample("zz/relabelled.jpg", (original.label + 1) % 2, original.data),
    ]
    manifest = make_split_manifest(ImageSet("x", image_set.classes, image_set.samples + copies))
    dropped = dict(manifest["duplicates_dropped"])
    assert dropped == {"zz/resized.jpg": original.key, "zz/relabelled.jpg": original.key}


def test_split_is_stratified_and_repeatable(tiny_data: Path) -> None:
    image_set = load_source(str(tiny_data))
    first, second = make_split_manifest(image_set, 0), make_split_manifest(image_set, 0)
    assert first["fingerprint"] == second["fingerprint"]
    assert make_split_manifest(image_set, 1)["fingerprint"] != first["fingerprint"]
    train = select(image_set, first, "train")
    assert {s.label for s in train} == set(range(len(image_set.classes)))
