"""The light of a bin's scene, estimated from its labelled photos.

``smartbin-adapt`` puts the base model's training items on photos of the site's empty floor
(:func:`trainer.adapt.on_backdrops`), so that every category is seen on that floor. The floor
in those photos is lit as the site lights it; the items are lit as TrashNet's lamp lit them. A
warm bulb or cool daylight tints everything at the site, the items too, and the site's labelled
photos show it: their pixels whose colours the empty floor does not have are the items'.

:func:`site_light` compares, per category, the mean colour of those pixels with the mean colour
of the same category's training items (where their cut-out says the item is). The ratio, per
channel, is the site's light as a gain on the items; averaged over the categories both have, so
that a site with more photos of one category does not tilt it. On the three simulated sites
(``converter.site_sim``) it reads each channel's gain within 3.3 % from 25 labelled photos per
category, within 6 % from 5. The brightness is the looser part: where an item's shadow falls
on a plain floor, the shadow's pixels count as the item's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from smartbin.preprocessing import decode_image
from trainer.cutout import SEGMENT_SIDE, item_mask
from trainer.data import Sample

logger = logging.getLogger(__name__)

# Each channel in this many levels when the floor's colours are counted.
LEVELS = 16
# The floor's colours: its most frequent ones, covering this share of its pixels (the rest are
# specks, seams and noise that items share).
FLOOR_SHARE = 0.99
# Training items measured per category: enough for a stable mean colour, and it bounds the time.
ITEMS_PER_LABEL = 40
# A gain outside this range is not a light but a mismatch (items unlike the training ones).
GAIN_RANGE = (0.5, 2.0)


def _pixels(data: bytes) -> Image.Image:
    """The photo upright, its shorter side at :data:`SEGMENT_SIDE`: the size
    :func:`trainer.cutout.item_mask` answers at."""
    rgb = decode_image(data)
    scale = SEGMENT_SIDE / min(rgb.size)
    return rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.BOX)


def _colour_bins(pixels: np.ndarray) -> np.ndarray:
    levels = np.clip(pixels.astype(np.int64) * LEVELS // 256, 0, LEVELS - 1)
    bins: np.ndarray = (levels[..., 0] * LEVELS + levels[..., 1]) * LEVELS + levels[..., 2]
    return bins


def floor_colours(backdrops: Sequence[bytes]) -> np.ndarray:
    """Which colour bins (``LEVELS`` cubed) the empty floor's photos show."""
    counts = np.zeros(LEVELS**3, np.int64)
    for data in backdrops:
        bins = _colour_bins(np.asarray(_pixels(data)))
        counts += np.bincount(bins.ravel(), minlength=len(counts))
    order = np.argsort(counts)[::-1]
    covered = np.cumsum(counts[order]) <= FLOOR_SHARE * counts.sum()
    floor = np.zeros(len(counts), bool)
    floor[order[covered]] = True
    return floor


def _site_item_colours(site: Sequence[Sample], floor: np.ndarray) -> dict[int, np.ndarray]:
    pixels: dict[int, list[np.ndarray]] = {}
    for sample in site:
        photo = np.asarray(_pixels(sample.data)).reshape(-1, 3)
        pixels.setdefault(sample.label, []).append(photo[~floor[_colour_bins(photo)]])
    return {label: np.concatenate(parts) for label, parts in pixels.items()}


def _training_item_colours(replay: Sequence[Sample], labels: set[int]) -> dict[int, np.ndarray]:
    pixels: dict[int, list[np.ndarray]] = {}
    for sample in replay:
        if sample.label not in labels or len(pixels.get(sample.label, ())) >= ITEMS_PER_LABEL:
            continue
        image = _pixels(sample.data)
        mask, found = item_mask(image)
        if found:
            pixels.setdefault(sample.label, []).append(np.asarray(image)[mask])
    return {label: np.concatenate(parts) for label, parts in pixels.items()}


def site_light(
    site: Sequence[Sample], backdrops: Sequence[bytes], replay: Sequence[Sample]
) -> np.ndarray | None:
    """The gain per channel (RGB) that lights ``replay``'s items as the ``site`` photos' items
    are lit; ``backdrops`` are the site's empty floor. Labels of ``site`` and ``replay`` index
    the same list. None when no category has item pixels on both sides, or the gain is outside
    :data:`GAIN_RANGE` (the site's items are then unlike the training items, not lit otherwise).
    """
    if not site or not backdrops or not replay:
        return None
    on_site = _site_item_colours(site, floor_colours(backdrops))
    trained = _training_item_colours(replay, {k for k, v in on_site.items() if len(v)})
    ratios = [
        on_site[label].mean(0) / np.maximum(trained[label].mean(0), 1.0)
        for label in sorted(trained)
    ]
    if not ratios:
        return None
    gains: np.ndarray = np.mean(ratios, axis=0)
    if gains.min() < GAIN_RANGE[0] or gains.max() > GAIN_RANGE[1]:
        logger.warning("the site's light came out as %s: left as the training photos'", gains)
        return None
    return gains
