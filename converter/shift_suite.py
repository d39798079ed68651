"""The harder shift suite: TrashNet's items taken off their white board and photographed again.

Every TrashNet photo shows one item on the same bright, nearly uniform board under the same
light and camera; a bin's camera looks at a wooden, metal or dark plastic floor or into a
cluttered bin, through another white balance, a cheaper JPEG encoder, a moving item, a longer
distance or a hand. Each shift here cuts the item out of its photo (:func:`cut_out`: what
differs from a smooth fit of the board's colour, closed, filled and reduced to its largest
component) and composes it again:

========================  =====================================================================
``wood_floor``            on wooden planks (procedural: grain, plank gaps, a light falloff)
``metal_floor``           on brushed metal
``dark_plastic_floor``    on a dark plastic bin bottom with soft creases
``cluttered_bin``         among other waste: overlapping shapes of many colours
``tiled_floor``           on floor tiles with grout lines
``white_balance``         on one of those floors, with another camera's white balance
                          (uncorrected tungsten, cool daylight or fluorescent green)
``jpeg_low_quality``      on a floor, saved at JPEG quality 10
``motion_blur``           on a floor, smeared 9 to 17 px (of 512) along a random direction
``far_away``              on a floor, half the size (a quarter of the area), anywhere in frame
``occluded``              on a floor, a quarter to a third of the item covered by a hand
``texture_floor``         only with textures given (:func:`load_textures`): on a floor, wall or
                          ground texture from the ``ufoai-textures`` Debian package
========================  =====================================================================

The floors under the last five shifts, and every random choice, come from a generator seeded
by the photo's bytes and the shift's name: the same photo always gives the same picture. A photo
with no board around its item (the item fills the frame: no border looks like the board) is
shrunk to 75 % and framed by the floor instead; :attr:`Cutout.found` tells which.

The textures are GPL artwork: they are read at measurement time from the installed package
(``apt-get install ufoai-textures``), never copied into this repository, and the suite works
without them (``texture_floor`` is then left out, and it is never part of the mean).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage  # type: ignore[import-untyped]

# The segmentation and composition live in the trainer, which trains on the same cut-outs (its
# background replacement); item_mask is imported for the suite's users and tests.
from trainer.cutout import (  # noqa: F401
    Cutout,
    composite,
    cut_out,
    encode,
    feathered_frame,
    item_box,
    item_mask,
    motion_blur,
)

logger = logging.getLogger(__name__)

# Where Debian's ufoai-textures package puts its textures (a .pk3 is a zip file).
UFOAI_TEXTURES = Path("/usr/share/games/ufoai/base/0textures.pk3")
# Texture names that look like something a bin could stand on or in (one pattern: the words
# name materials, never categories, which no code spells).
_TEXTURE_WORDS = re.compile(r"floor|wood|metal|concrete|tile|carpet|asphalt|dirt")
# Normal, specular, gloss and glow maps sit beside the colour images; they are not photos.
_TEXTURE_MAPS = ("_nm.", "_sm.", "_gm.", "_pls.", "_glow.", "_rm.", "_bump.")
_TEXTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tga")


class Textures:
    """Colour textures from a folder or a .pk3/.zip archive, read one at a time when drawn."""

    def __init__(self, source: Path) -> None:
        self.source = Path(source)
        if self.source.is_dir():
            names = [str(p.relative_to(self.source)) for p in self.source.rglob("*")]
        else:
            with zipfile.ZipFile(self.source) as archive:
                names = archive.namelist()
        self.names = sorted(n for n in names if _is_floor_texture(n))
        if not self.names:
            raise ValueError(f"{self.source} holds no floor, wall or ground textures")

    def read(self, name: str) -> Image.Image:
        if self.source.is_dir():
            data = (self.source / name).read_bytes()
        else:
            with zipfile.ZipFile(self.source) as archive:
                data = archive.read(name)
        with Image.open(io.BytesIO(data)) as image:
            if "transparency" in image.info:
                return image.convert("RGBA").convert("RGB")
            return image.convert("RGB")


def _is_floor_texture(name: str) -> bool:
    lower = name.lower()
    base = lower.rsplit("/", 1)[-1]
    return (
        lower.endswith(_TEXTURE_SUFFIXES)
        and _TEXTURE_WORDS.search(base) is not None
        and not any(marker in base for marker in _TEXTURE_MAPS)
    )


def load_textures(source: Path | None = None) -> Textures | None:
    """Textures from ``source``, or from the installed ufoai-textures package when ``source``
    is None; None when that package is not installed.

    Raises:
        ValueError: ``source`` holds no usable texture.
        OSError, zipfile.BadZipFile: ``source`` cannot be read.
    """
    if source is None:
        if not UFOAI_TEXTURES.is_file():
            return None
        source = UFOAI_TEXTURES
    return Textures(source)


# ---------------------------------------------------------------------------------------------
# Floors: (height, width, 3) float32 pictures in 0..255.


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Value noise in 0..1 varying over about ``cell`` pixels."""
    grid = rng.random((max(2, int(height / cell) + 2), max(2, int(width / cell) + 2)))
    image = Image.fromarray(grid.astype(np.float32))
    noise = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    low, high = float(noise.min()), float(noise.max())
    scaled: np.ndarray = (noise - low) / max(high - low, 1e-6)
    return scaled


def _light_falloff(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A lamp off to one side: brightness falling from 1.1 to about 0.7 across the frame."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = rng.uniform(-0.5, 1.5) * width, rng.uniform(-0.5, 1.5) * height
    distance = np.hypot(xx - cx, yy - cy) / np.hypot(width, height)
    falloff: np.ndarray = np.clip(1.1 - rng.uniform(0.25, 0.5) * distance, 0.55, 1.1)
    return falloff[..., None]


def _wood(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    vertical = bool(rng.integers(2))
    long, across = (height, width) if vertical else (width, height)
    yy, xx = np.mgrid[0:across, 0:long].astype(np.float32)
    plank = rng.uniform(55, 110)
    index = (yy // plank).astype(int)
    palette = np.array(
        [[150, 100, 60], [120, 80, 45], [175, 130, 85], [95, 60, 35], [190, 150, 105]]
    )
    base = palette[rng.integers(len(palette))].astype(np.float32)
    plank_tone = 1 + rng.uniform(-0.15, 0.15, index.max() + 2)[index]
    warp = _smooth_noise(rng, across, long, 40) * 25
    grain = 0.5 + 0.5 * np.sin((yy + warp) * rng.uniform(0.35, 0.7) + index * 7.0)
    knots = _smooth_noise(rng, across, long, 8) * 0.12
    gaps = np.where(yy % plank < 2.5, 0.45, 1.0)
    tone = plank_tone * (0.82 + 0.18 * grain - knots) * gaps
    wood = base * tone[..., None]
    return wood.transpose(1, 0, 2) if vertical else wood


def _metal(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    grey = rng.uniform(120, 185)
    tint = np.array([1.0, 1.0, rng.uniform(1.0, 1.08)], dtype=np.float32)
    streaks = rng.normal(0, 1, (height, 1)) * 6 + rng.normal(0, 1, (height, width)) * 2
    brushed = ndimage.uniform_filter1d(streaks.astype(np.float32), 9, axis=1)
    sheen = _smooth_noise(rng, height, width, 120) * 40 - 20
    scratches = np.zeros((height, width), dtype=np.float32)
    for _ in range(int(rng.integers(5, 15))):
        y0, y1 = rng.integers(0, height, 2)
        x0, x1 = sorted(rng.integers(0, width, 2))
        xs = np.arange(x0, x1 + 1)
        ys = np.clip(np.round(np.interp(xs, [x0, x1], [y0, y1])).astype(int), 0, height - 1)
        scratches[ys, xs] = rng.uniform(20, 45)
    plate = grey + brushed + sheen + scratches
    metal: np.ndarray = plate[..., None] * tint
    return metal


def _dark_plastic(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    colours = np.array([[30, 30, 32], [22, 40, 28], [25, 30, 50], [45, 42, 40]], dtype=np.float32)
    base = colours[rng.integers(len(colours))]
    creases = _smooth_noise(rng, height, width, 60)
    highlight = np.clip((creases - 0.7) / 0.3, 0, 1) ** 2 * rng.uniform(40, 80)
    grain = rng.normal(0, 3, (height, width))
    plastic: np.ndarray = base + (highlight + grain + creases * 15)[..., None]
    return plastic


def _clutter(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    canvas = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(20, 60, 3)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(30, 50))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height
        w, h = rng.uniform(0.05, 0.35) * width, rng.uniform(0.05, 0.35) * height
        kind = int(rng.integers(4))
        if kind == 0:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        elif kind == 1:
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        elif kind == 2:
            points = [
                (float(x + rng.uniform(0, w)), float(y + rng.uniform(0, h)))
                for _ in range(int(rng.integers(3, 7)))
            ]
            draw.polygon(points, fill=colour)
        else:
            draw.line((x, y, x + w, y + h), fill=colour, width=int(rng.integers(3, 12)))
    clutter = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    shade = 0.55 + 0.45 * _smooth_noise(rng, height, width, 90)
    bin_floor: np.ndarray = np.asarray(clutter, dtype=np.float32) * shade[..., None]
    return bin_floor


def _tiles(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    colours = np.array(
        [[200, 190, 170], [160, 160, 165], [170, 90, 60], [90, 100, 110], [230, 225, 215]],
        dtype=np.float32,
    )
    base = colours[rng.integers(len(colours))]
    tile = rng.uniform(60, 130)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    offset_x, offset_y = rng.uniform(0, tile, 2)
    gx, gy = (xx + offset_x) % tile, (yy + offset_y) % tile
    grout = (gx < 3) | (gy < 3)
    index = ((xx + offset_x) // tile + 31 * ((yy + offset_y) // tile)).astype(int)
    tone = 1 + rng.uniform(-0.08, 0.08, int(index.max()) + 1)[index]
    speckle = rng.normal(0, 4, (height, width))
    floor = base * tone[..., None] + speckle[..., None]
    floor[grout] = base * 0.55
    tiles: np.ndarray = floor
    return tiles


FLOORS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "wood": _wood,
    "brushed_metal": _metal,
    "dark_plastic": _dark_plastic,
    "cluttered_bin": _clutter,
    "tiles": _tiles,
}


def make_floor(kind: str, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A ``kind`` floor (one of :data:`FLOORS`) lit from a random side, float32 HxWx3."""
    floor = FLOORS[kind](rng, height, width) * _light_falloff(rng, height, width)
    lit: np.ndarray = np.clip(floor, 0, 255).astype(np.float32)
    return lit


def _texture_floor(
    textures: Textures, rng: np.random.Generator, width: int, height: int
) -> np.ndarray:
    """One texture, drawn at random, tiled to fill the frame at 1.5 to 3 tiles across."""
    with_texture = textures.read(textures.names[int(rng.integers(len(textures.names)))])
    side = max(16, round(width / rng.uniform(1.5, 3.0)))
    tile = with_texture.resize((side, side), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (width, height))
    for top in range(0, height, side):
        for left in range(0, width, side):
            canvas.paste(tile, (left, top))
    floor = np.asarray(canvas, dtype=np.float32) * _light_falloff(rng, height, width)
    lit: np.ndarray = np.clip(floor, 0, 255).astype(np.float32)
    return lit


def on_random_floor(cut: Cutout, rng: np.random.Generator) -> np.ndarray:
    """The item on one of :data:`FLOORS`, drawn with ``rng``: the first step of every shift
    after the floors."""
    kind = list(FLOORS)[int(rng.integers(len(FLOORS)))]
    return composite(cut, make_floor(kind, rng, *cut.size))


# Channel gains of a camera balanced for another light: red, green, blue.
WHITE_BALANCES = {
    "tungsten": (1.22, 1.0, 0.68),
    "cool_daylight": (0.78, 0.96, 1.28),
    "fluorescent": (0.88, 1.12, 0.86),
}


def _white_balance(cut: Cutout, rng: np.random.Generator) -> np.ndarray:
    photo = on_random_floor(cut, rng).astype(np.float32)
    gains = np.array(list(WHITE_BALANCES.values())[int(rng.integers(len(WHITE_BALANCES)))])
    strength = rng.uniform(0.8, 1.0)
    balanced = photo * (1 + (gains - 1) * strength)
    out: np.ndarray = np.clip(balanced, 0, 255).astype(np.uint8)
    return out


JPEG_LOW_QUALITY = 10


def _jpeg_low_quality(cut: Cutout, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(on_random_floor(cut, rng)).save(buffer, "JPEG", quality=JPEG_LOW_QUALITY)
    with Image.open(buffer) as saved:
        return np.asarray(saved.convert("RGB"), dtype=np.uint8)


def _motion_blur(cut: Cutout, rng: np.random.Generator) -> np.ndarray:
    photo = on_random_floor(cut, rng)
    length = rng.uniform(9, 17) * max(cut.size) / 512
    return motion_blur(photo, length, float(rng.uniform(0, np.pi)))


FAR_AWAY_SCALE = 0.5


def _far_away(cut: Cutout, rng: np.random.Generator) -> np.ndarray:
    width, height = cut.size
    kind = list(FLOORS)[int(rng.integers(len(FLOORS)))]
    floor = make_floor(kind, rng, width, height)
    left, top, right, bottom = item_box(cut.alpha if cut.found else np.ones((height, width)))
    half_w = min((right - left) * FAR_AWAY_SCALE / 2, width / 2)
    half_h = min((bottom - top) * FAR_AWAY_SCALE / 2, height / 2)
    centre = (rng.uniform(half_w, width - half_w), rng.uniform(half_h, height - half_h))
    return composite(cut, floor, FAR_AWAY_SCALE, centre)


# Skin tones, light to dark.
SKIN = np.array(
    [[241, 194, 167], [224, 172, 138], [198, 134, 94], [161, 102, 70], [109, 68, 48]],
    dtype=np.float32,
)


def hand_mask(
    box: tuple[int, int, int, int], rng: np.random.Generator, size: tuple[int, int]
) -> np.ndarray:
    """A hand reaching over the item in ``box`` from one of its sides: a palm and four
    fingers, covering roughly a quarter to a third of the box; float32 0..1 at ``size``."""
    left, top, right, bottom = box
    box_w, box_h = right - left, bottom - top
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    side = int(rng.integers(4))  # the hand comes in from the left, top, right or bottom
    reach = rng.uniform(0.4, 0.55)
    across = rng.uniform(0.35, 0.5)
    along_centre = rng.uniform(0.3, 0.7)
    horizontal = side in (0, 2)
    span_along = box_w if horizontal else box_h  # the direction the hand reaches in
    span_across = box_h if horizontal else box_w
    depth = reach * span_along
    palm_depth, finger_depth = depth * 0.55, depth * 0.45
    width_across = across * span_across
    centre_across = along_centre * span_across
    # Coordinates along the reach from the box edge inwards, across from the box start.
    pieces: list[tuple[float, float, float, float]] = [
        (
            -palm_depth * 0.6,
            centre_across - width_across / 2,
            palm_depth,
            centre_across + width_across / 2,
        )
    ]
    finger_w = width_across / 4
    for k in range(4):
        start = centre_across - width_across / 2 + k * finger_w
        length = finger_depth * (0.75 + 0.25 * float(np.sin((k + 0.5) / 4 * np.pi)))
        pieces.append(
            (palm_depth * 0.8, start + finger_w * 0.1, palm_depth + length, start + finger_w * 0.9)
        )
    for a0, c0, a1, c1 in pieces:
        if side == 0:
            shape = (left + a0, top + c0, left + a1, top + c1)
        elif side == 2:
            shape = (right - a1, top + c0, right - a0, top + c1)
        elif side == 1:
            shape = (left + c0, top + a0, left + c1, top + a1)
        else:
            shape = (left + c0, bottom - a1, left + c1, bottom - a0)
        draw.ellipse(shape, fill=255)
    soft = canvas.filter(ImageFilter.GaussianBlur(1.0))
    return np.asarray(soft, dtype=np.float32) / 255.0


def _occluded(cut: Cutout, rng: np.random.Generator) -> np.ndarray:
    photo = on_random_floor(cut, rng).astype(np.float32)
    height, width = photo.shape[:2]
    box = item_box(cut.alpha if cut.found else feathered_frame(height, width))
    hand = hand_mask(box, rng, (width, height))
    skin = SKIN[int(rng.integers(len(SKIN)))]
    shading = 0.85 + 0.25 * _smooth_noise(rng, height, width, 50)
    covered = photo * (1 - hand[..., None]) + (skin * shading[..., None]) * hand[..., None]
    out: np.ndarray = np.clip(np.round(covered), 0, 255).astype(np.uint8)
    return out


def _floor_shift(kind: str) -> Callable[[Cutout, np.random.Generator], np.ndarray]:
    def shift(cut: Cutout, rng: np.random.Generator) -> np.ndarray:
        return composite(cut, make_floor(kind, rng, *cut.size))

    return shift


Shift = Callable[[Cutout, np.random.Generator], np.ndarray]

# The suite, in report order; every shift here always runs, and the mean is over these.
HARDER_SHIFTS: dict[str, Shift] = {
    "wood_floor": _floor_shift("wood"),
    "metal_floor": _floor_shift("brushed_metal"),
    "dark_plastic_floor": _floor_shift("dark_plastic"),
    "cluttered_bin": _floor_shift("cluttered_bin"),
    "tiled_floor": _floor_shift("tiles"),
    "white_balance": _white_balance,
    "jpeg_low_quality": _jpeg_low_quality,
    "motion_blur": _motion_blur,
    "far_away": _far_away,
    "occluded": _occluded,
}
TEXTURE_SHIFT = "texture_floor"


def suite(textures: Textures | None = None) -> dict[str, Shift]:
    """The shifts to run: :data:`HARDER_SHIFTS`, and ``texture_floor`` when textures are given."""
    shifts = dict(HARDER_SHIFTS)
    if textures is not None:

        def texture_floor(cut: Cutout, rng: np.random.Generator) -> np.ndarray:
            return composite(cut, _texture_floor(textures, rng, *cut.size))

        shifts[TEXTURE_SHIFT] = texture_floor
    return shifts


def shift_rng(data: bytes, shift: str) -> np.random.Generator:
    """The generator of one shift of one photo: seeded by both, so any subset of photos and
    shifts, in any order, gives the same pictures."""
    digest = hashlib.sha256(shift.encode() + b"\0" + data).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def harder_shifted(
    data: bytes, shift: str, textures: Textures | None = None, cut: Cutout | None = None
) -> bytes:
    """The encoded photo after ``shift`` of the suite, as a JPEG of quality 92 (the low-quality
    shift's own JPEG is decoded first). ``cut``, the photo's :func:`cut_out`, saves cutting
    it out again for each shift."""
    if cut is None:
        with Image.open(io.BytesIO(data)) as image:
            cut = cut_out(image)
    return encode(suite(textures)[shift](cut, shift_rng(data, shift)))


def all_shifted(data: bytes, textures: Textures | None = None) -> dict[str, bytes]:
    """The photo under every shift of the suite, cut out once."""
    with Image.open(io.BytesIO(data)) as image:
        cut = cut_out(image)
    return {
        name: encode(shift(cut, shift_rng(data, name))) for name, shift in suite(textures).items()
    }
