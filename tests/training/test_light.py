"""The site's light, read off its labelled photos, lights the training items put on its floor."""

from __future__ import annotations

import io

import numpy as np
from helpers import PHOTOS
from PIL import Image

from converter.shift_suite import make_floor
from trainer.cutout import composite, cut_out, encode
from trainer.data import Sample
from trainer.light import site_light

WARM_BULB = np.array([1.2, 1.0, 0.7])


def _floor(shape: tuple[int, int]) -> np.ndarray:
    """The same wooden floor (the harder shift suite's) for every photo."""
    return make_floor("wood", np.random.default_rng(0), shape[1], shape[0])


def _lit(photo: np.ndarray, gains: np.ndarray) -> bytes:
    return encode(np.clip(photo * gains, 0, 255).astype(np.uint8))


def _site(gains: np.ndarray) -> tuple[list[Sample], list[bytes], list[Sample]]:
    """Items of the test photos on a wooden floor under ``gains``, the floor alone under them,
    and the same photos as they are."""
    site, replay = [], []
    categories = sorted(d for d in PHOTOS.iterdir() if d.is_dir())
    for label, folder in enumerate(categories):
        for path in sorted(folder.glob("*.jpg"))[:4]:
            data = path.read_bytes()
            replay.append(Sample(path.name, label, data))
            cut = cut_out(Image.open(io.BytesIO(data)))
            if not cut.found:  # no board around it: the photo would be all item
                continue
            photo = composite(cut, _floor(cut.image.shape[:2]), 0.8)
            site.append(Sample(path.name, label, _lit(photo, gains)))
    return site, [_lit(_floor((384, 512)), gains)], replay


def test_the_light_of_the_site_is_read_off_its_labelled_photos() -> None:
    """The tint (each channel against green) is read closely; the brightness more loosely: the
    items' shadows on the floor count as item pixels and darken it."""
    site, empty, replay = _site(WARM_BULB)
    light = site_light(site, empty, replay)
    assert light is not None
    np.testing.assert_allclose(light / light[1], WARM_BULB / WARM_BULB[1], rtol=0.05)
    assert 0.75 < light[1] / WARM_BULB[1] < 1.1
    neutral = site_light(*_site(np.ones(3)))
    assert neutral is not None
    np.testing.assert_allclose(neutral / neutral[1], 1.0, rtol=0.05)


def test_without_the_empty_floor_or_training_items_there_is_no_light_to_match() -> None:
    site, empty, replay = _site(WARM_BULB)
    assert site_light(site, [], replay) is None
    assert site_light(site, empty, []) is None
    unshared = [Sample(s.key, s.label + 100, s.data) for s in replay]
    assert site_light(site, empty, unshared) is None
