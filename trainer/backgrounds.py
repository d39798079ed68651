"""Training off the white board: background replacement and strong photometric augmentation.

Every TrashNet photo shows its item on the same bright board, so a model can learn the board
(or that brown around the item means a box filling the frame) instead of the item. Background
replacement cuts each training item off its board once (:func:`trainer.cutout.cut_out`) and, on
a share of the reads, puts it on a random backdrop at a random size and place. The backdrops are
drawn by generators of their own, not the harder shift suite's floors (wood, brushed metal, dark
plastic, clutter, tiles), so that the suite still measures how a model meets floors it never
saw:

============  ====================================================================
``plasma``    fractal value noise through a random two- or three-colour gradient
``flat``      one random colour under a lamp's gradient, with sensor noise
``stripes``   two random colours in stripes of random width and angle
``checks``    a checkerboard of two random colours at a random scale and angle
``granite``   speckles of several sizes and colours on a random base colour
============  ====================================================================

A share of the placements can land on a photo instead (``Placement.photos``, from
:class:`BackdropPhotos`: any folder of pictures of floors, walls, ground or empty bins, cropped,
turned and mirrored at random), and a share (``Placement.other_items``) on a piece of another
training item, enlarged to fill the frame: a bin's floor is mostly other waste, and a box's
brown or a bag's crinkle around an item then belongs to no category (on wooden planks the
default once called most items cardboard: docs/models.md).

Strong photometric augmentation (:class:`Photometric`) then does what other cameras do to a
photo: another white balance (random gains per channel), a smear along a random direction, a
coarse sensor (noise, or a smaller picture scaled back up) and a cheap JPEG encoder (quality
10 to 70). The suite's white balances are three fixed ones and its JPEG quality one fixed value;
here every value is drawn from a range.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from trainer.cutout import FRAME_FILLING_SCALE, Cutout, composite, cut_out, item_box, motion_blur
from trainer.data import IMAGE_SUFFIXES, photo_paths

logger = logging.getLogger(__name__)

Backdrop = Callable[[np.random.Generator, int, int], np.ndarray]


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random colour, pulled part of the way to its grey: floors and bins are more often
    muted than saturated, but any colour can come."""
    colour = rng.uniform(0, 255, 3)
    muted = colour + rng.uniform(0, 1) * (colour.mean() - colour)
    return muted.astype(np.float32)


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Noise in 0..1 varying over about ``cell`` pixels (a random grid, bicubically enlarged)."""
    grid = rng.random((max(2, int(height / cell) + 2), max(2, int(width / cell) + 2)))
    image = Image.fromarray(grid.astype(np.float32)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    noise: np.ndarray = np.clip(np.asarray(image, np.float32), 0, 1)
    return noise


def _plasma(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    octaves = [_value_noise(rng, height, width, max(width, height) / 2**k) for k in range(1, 6)]
    weights = 0.55 ** np.arange(len(octaves))
    field = sum(w * o for w, o in zip(weights, octaves, strict=True)) / weights.sum()
    field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
    stops = np.stack([_colour(rng) for _ in range(int(rng.integers(2, 4)))])
    positions = np.linspace(0, 1, len(stops))
    channels = [np.interp(field, positions, stops[:, c]) for c in range(3)]
    plasma: np.ndarray = np.stack(channels, axis=-1).astype(np.float32)
    return plasma


def _coordinates(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, ...]:
    """Pixel coordinates rotated by a random angle: along and across."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    across = -xx * np.sin(angle) + yy * np.cos(angle)
    return along, across


def _flat(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    along, _ = _coordinates(rng, height, width)
    ramp = 1 + rng.uniform(-0.3, 0.3) * (along / max(float(np.abs(along).max()), 1.0))
    grain = rng.normal(0, rng.uniform(1, 8), (height, width, 1))
    flat: np.ndarray = (_colour(rng) * ramp[..., None] + grain).astype(np.float32)
    return flat


def _stripes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    along, _ = _coordinates(rng, height, width)
    period = rng.uniform(0.03, 0.3) * max(width, height)
    duty = rng.uniform(0.2, 0.8)
    first = (along % period) < duty * period
    stripes: np.ndarray = np.where(first[..., None], _colour(rng), _colour(rng)).astype(np.float32)
    return stripes


def _checks(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    along, across = _coordinates(rng, height, width)
    side = rng.uniform(0.04, 0.25) * max(width, height)
    odd = ((along // side) + (across // side)) % 2 == 1
    checks: np.ndarray = np.where(odd[..., None], _colour(rng), _colour(rng)).astype(np.float32)
    return checks


def _granite(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    stone = np.broadcast_to(_colour(rng), (height, width, 3)).copy()
    for cell in (1.5, 4.0, 12.0):
        speckle = _value_noise(rng, height, width, cell) > rng.uniform(0.6, 0.8)
        stone[speckle] = _colour(rng)
    granite: np.ndarray = stone.astype(np.float32)
    return granite


BACKDROPS: dict[str, Backdrop] = {
    "plasma": _plasma,
    "flat": _flat,
    "stripes": _stripes,
    "checks": _checks,
    "granite": _granite,
}


def random_backdrop(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One of :data:`BACKDROPS`, drawn with ``rng``; float32 HxWx3 in 0..255."""
    kind = list(BACKDROPS)[int(rng.integers(len(BACKDROPS)))]
    backdrop: np.ndarray = np.clip(BACKDROPS[kind](rng, height, width), 0, 255)
    return backdrop


class BackdropPhotos:
    """Photos to put items on: every picture under a folder, kept as its file's bytes and
    decoded when drawn."""

    def __init__(self, root: Path) -> None:
        files = photo_paths(root)
        if not files:
            raise ValueError(f"{root} holds no photos ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.photos = [_checked_photo(f) for f in files]
        logger.info("%d backdrop photos from %s", len(self.photos), root)

    def __len__(self) -> int:
        return len(self.photos)

    def draw(self, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
        """A random square-ish window of a random photo (a third to all of its shorter side),
        turned by a multiple of 90 degrees, mirrored or not, enlarged to ``width`` x
        ``height``; float32 HxWx3."""
        with Image.open(io.BytesIO(self.photos[int(rng.integers(len(self.photos)))])) as image:
            photo = image.convert("RGB")
        photo = photo.rotate(90 * int(rng.integers(4)), expand=True)
        side = rng.uniform(1 / 3, 1.0) * min(photo.size)
        aspect = height / width
        window_w, window_h = min(side, photo.width), min(side * aspect, photo.height)
        x = rng.uniform(0, photo.width - window_w)
        y = rng.uniform(0, photo.height - window_h)
        window = photo.crop((x, y, x + window_w, y + window_h))
        backdrop = np.asarray(window.resize((width, height), Image.Resampling.BILINEAR), np.float32)
        return backdrop[:, ::-1] if rng.random() < 0.5 else backdrop


def _checked_photo(path: Path) -> bytes:
    """The file's bytes, once PIL has decoded them: a broken photo is named at the start, not
    an hour into training."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, SyntaxError) as err:  # PIL raises SyntaxError for some broken files
        raise ValueError(f"{path} is not a readable photo: {err}") from err
    return data


@dataclass(frozen=True)
class Cutouts:
    """The items of the training photos, cut off their boards once: per photo its alpha as
    uint8 (a quarter of the memory of float) and whether a board was found."""

    alphas: list[np.ndarray]
    found: list[bool]

    @classmethod
    def of(cls, images: list[np.ndarray]) -> Cutouts:
        """Cut out every photo (uint8 HxWx3); about 40 ms a TrashNet photo."""
        alphas, found = [], []
        for image in images:
            cut = cut_out(Image.fromarray(image))
            alphas.append(np.round(cut.alpha * 255).astype(np.uint8))
            found.append(cut.found)
        logger.info("cut out %d photos: a board found around %d", len(images), sum(found))
        return cls(alphas, found)

    def cutout(self, index: int, image: np.ndarray) -> Cutout:
        return Cutout(image, self.alphas[index].astype(np.float32) / 255.0, self.found[index])


@dataclass(frozen=True)
class Placement:
    """How an item lands on its backdrop: at ``smallest_scale`` to 100 % of its size, anywhere
    it fits, on ``occlusion`` of the placements partly covered (:func:`occlude`), and on
    ``other_items`` of them on a piece of another training item (:func:`piece_of`)."""

    smallest_scale: float = 0.5  # items stay large enough to name
    occlusion: float = 0.0
    other_items: float = 0.0  # share of the backdrops that are a piece of another item
    photos: float = 0.5  # share of the other backdrops that are backdrop photos, when given


DEFAULT_PLACEMENT = Placement()


def piece_of(other: Cutout, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random window of ``other``'s item (a third to all of its box's shorter side, the
    whole frame where no board was found), enlarged to ``width`` x ``height``; float32
    HxWx3."""
    left, top, right, bottom = item_box(other.alpha) if other.found else (0, 0, *other.size)
    # The window takes the frame's shape; a tall frame's window is narrowed to stay inside the
    # box, as PIL would fill the rest of a crop beyond the photo with black.
    aspect = height / width
    side = rng.uniform(1 / 3, 1.0) * min(right - left, bottom - top, (bottom - top) / aspect)
    x = rng.uniform(left, max(left, right - side))
    y = rng.uniform(top, max(top, bottom - max(side, side * aspect)))
    window = Image.fromarray(other.image).crop((x, y, x + side, y + side * aspect))
    piece = np.asarray(window.resize((width, height), Image.Resampling.BILINEAR), np.float32)
    return piece[:, ::-1] if rng.random() < 0.5 else piece


def replace_background(
    cut: Cutout,
    rng: np.random.Generator,
    placement: Placement = DEFAULT_PLACEMENT,
    others: Callable[[np.random.Generator], Cutout] | None = None,
    photos: BackdropPhotos | None = None,
) -> np.ndarray:
    """The item on a random backdrop, placed as ``placement`` says; uint8 HxWx3. ``others``
    draws another item for the ``placement.other_items`` share of backdrops (:func:`piece_of`),
    ``photos`` a photo for the ``placement.photos`` share of the rest."""
    width, height = cut.size
    if others is not None and rng.random() < placement.other_items:
        backdrop = piece_of(others(rng), rng, width, height)
    elif photos is not None and rng.random() < placement.photos:
        backdrop = photos.draw(rng, width, height)
    else:
        backdrop = random_backdrop(rng, width, height)
    scale = float(rng.uniform(placement.smallest_scale, 1.0))
    margin_x, margin_y = width * scale / 2, height * scale / 2
    centre = (
        float(rng.uniform(min(margin_x, width / 2), max(width - margin_x, width / 2))),
        float(rng.uniform(min(margin_y, height / 2), max(height - margin_y, height / 2))),
    )
    photo = composite(cut, backdrop, scale, centre)
    if rng.random() < placement.occlusion:
        photo = occlude(photo, _placed_box(cut, scale, centre), rng)
    return photo


def _placed_box(
    cut: Cutout, scale: float, centre: tuple[float, float]
) -> tuple[float, float, float, float]:
    """The item's box once :func:`composite` has scaled it about its centre onto ``centre``."""
    width, height = cut.size
    left, top, right, bottom = item_box(cut.alpha) if cut.found else (0, 0, width, height)
    scale = scale if cut.found else min(scale, FRAME_FILLING_SCALE)  # as composite shrinks it
    half_w, half_h = (right - left) * scale / 2, (bottom - top) * scale / 2
    return centre[0] - half_w, centre[1] - half_h, centre[0] + half_w, centre[1] + half_h


def occlude(
    photo: np.ndarray, box: tuple[float, float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """Something between the item in ``box`` and the camera (a bag, a sleeve, another item): a
    soft-edged ellipse of a random backdrop centred on one of the box's sides, covering about
    5 to 30 % of the box; uint8 HxWx3. Not the harder suite's hand, so that it still measures
    a cover the model never saw."""
    left, top, right, bottom = box
    box_w, box_h = right - left, bottom - top
    x, y = float(rng.uniform(left, right)), float(rng.uniform(top, bottom))
    side = int(rng.integers(4))
    x = (left, right, x, x)[side]
    y = (y, y, top, bottom)[side]
    radius_x, radius_y = rng.uniform(0.2, 0.45) * box_w, rng.uniform(0.2, 0.45) * box_h
    height, width = photo.shape[:2]
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).ellipse(
        (x - radius_x, y - radius_y, x + radius_x, y + radius_y), fill=255
    )
    cover = np.asarray(canvas.filter(ImageFilter.GaussianBlur(1.5)), np.float32)[..., None] / 255
    blended = photo * (1 - cover) + random_backdrop(rng, width, height) * cover
    out: np.ndarray = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return out


@dataclass(frozen=True)
class Photometric:
    """What another camera does to a photo, each step with its own probability."""

    white_balance: float = 0.5
    smear: float = 0.25
    noise: float = 0.25
    low_resolution: float = 0.2
    jpeg: float = 0.5

    def __call__(self, photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``photo`` (uint8 HxWx3) through the steps drawn; uint8 HxWx3."""
        out = photo
        if rng.random() < self.white_balance:
            gains = np.exp(rng.normal(0, 0.15, 3)).astype(np.float32)
            out = np.clip(out * gains, 0, 255).astype(np.uint8)
        if rng.random() < self.smear:
            length = rng.uniform(3, 18) * max(out.shape[:2]) / 512
            out = motion_blur(out, length, float(rng.uniform(0, np.pi)))
        if rng.random() < self.noise:
            grain = rng.normal(0, rng.uniform(2, 12), out.shape)
            out = np.clip(out + grain, 0, 255).astype(np.uint8)
        if rng.random() < self.low_resolution:
            out = _low_resolution(out, float(rng.uniform(0.25, 0.6)))
        if rng.random() < self.jpeg:
            out = _jpeg(out, int(rng.integers(10, 71)))
        return out


def _low_resolution(photo: np.ndarray, factor: float) -> np.ndarray:
    image = Image.fromarray(photo)
    small = image.resize(
        (max(8, round(image.width * factor)), max(8, round(image.height * factor))),
        Image.Resampling.BILINEAR,
    )
    return np.asarray(small.resize(image.size, Image.Resampling.BILINEAR), dtype=np.uint8)


def _jpeg(photo: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=quality)
    with Image.open(buffer) as saved:
        return np.asarray(saved.convert("RGB"), dtype=np.uint8)
