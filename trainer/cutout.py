"""Cutting an item off its white board and composing it on another floor.

TrashNet photographs every item on one bright, nearly uniform board: what differs from a smooth
fit of the board's colour is the item (:func:`cut_out`), and :func:`composite` puts it, with a
soft shadow, on any other floor. The harder shift suite (``converter/shift_suite.py``) measures a
model on such photos, and the trainer's background replacement (:mod:`trainer.backgrounds`)
trains on them, so both cut items out the same way; this module is the one place that does.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage  # type: ignore[import-untyped]

logger = logging.getLogger(__name__)

# The photo is segmented with its shorter side at this size, then the mask scaled back.
SEGMENT_SIDE = 192


@dataclass(frozen=True)
class Cutout:
    """A photo and where its item is.

    ``alpha`` is 1 on the item, 0 on the board and in between along a one-pixel seam; with
    ``found`` False no board was found and the whole photo counts as the item.
    """

    image: np.ndarray  # uint8 HxWx3
    alpha: np.ndarray  # float32 HxW in 0..1
    found: bool

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.image.shape[1], self.image.shape[0]


def _outer_ring(height: int, width: int) -> np.ndarray:
    ring = max(2, round(min(height, width) * 0.06))
    border = np.zeros((height, width), dtype=bool)
    border[:ring] = border[-ring:] = True
    border[:, :ring] = border[:, -ring:] = True
    return border


def _board_fit(small: np.ndarray, where: np.ndarray) -> np.ndarray:
    """The board's colour at every pixel: a quadratic surface in x and y per channel, fitted to
    the pixels ``where`` is true and refitted twice without the outliers (an item touching the
    edge, its shadow)."""
    height, width, _ = small.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    x = xx / max(width - 1, 1) * 2 - 1
    y = yy / max(height - 1, 1) * 2 - 1
    basis = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)
    # Every other pixel each way is plenty for a smooth surface, and four times faster.
    sparse = where & ((yy % 2 == 0) & (xx % 2 == 0))
    rows, colours = basis[sparse].astype(np.float64), small[sparse].astype(np.float64)
    keep = np.ones(len(rows), dtype=bool)
    coefficients = np.zeros((basis.shape[-1], 3), dtype=np.float64)
    for _ in range(3):
        kept = rows[keep]
        # Least squares through the 6 x 6 normal equations (a tiny ridge keeps them solvable).
        gram = kept.T @ kept + 1e-6 * np.eye(basis.shape[-1])
        coefficients = np.linalg.solve(gram, kept.T @ colours[keep])
        residual = np.linalg.norm(rows @ coefficients - colours, axis=1)
        keep = residual < 3 * (1.4826 * float(np.median(residual[keep])) + 1.0)
    fitted: np.ndarray = (basis @ coefficients).astype(np.float32)
    return fitted


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk: np.ndarray = x * x + y * y <= radius * radius
    return disk


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    largest: np.ndarray = labels == 1 + int(np.argmax(sizes))
    return largest


def _unlike_board(small: np.ndarray, board: np.ndarray) -> np.ndarray:
    """Pixels of another colour than the board (chromaticity more than 24 levels away), much
    darker than a shadow (under 55 % of the board's brightness) or brighter (over 130 %)."""
    brightness = small.mean(axis=-1) + 1.0
    board_brightness = board.mean(axis=-1)
    ratio = brightness / board_brightness
    chroma = small / brightness[..., None] - board / board_brightness[..., None]
    chroma_distance = np.linalg.norm(chroma, axis=-1) * 255.0
    unlike: np.ndarray = (chroma_distance > 24) | (ratio < 0.55) | (ratio > 1.3)
    return unlike


def item_mask(image: Image.Image) -> tuple[np.ndarray, bool]:
    """Where the item is, at :data:`SEGMENT_SIDE` px on the shorter side, and whether a board
    was found around it.

    A pixel is evidence of the item when it lies on or among edges (log-brightness gradient:
    glass, clear plastic and white paper show mostly as edges) or is unlike the board's fitted
    colour (:func:`_unlike_board`). Specks are dropped, the rest closed with a disk (bridging
    the gaps in a glass outline), filled, opened, eroded by the two pixels that edges reach
    past the item and reduced to its largest component. No board
    is found when the fitted board is dark or coloured, or the item covers under 1 % or over
    85 % of the photo.
    """
    width, height = image.size
    scale = SEGMENT_SIDE / min(width, height)
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    small = np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.float32)
    log_brightness = ndimage.gaussian_filter(np.log(small.mean(axis=-1) + 1.0), 0.8)
    gradient = np.hypot(ndimage.sobel(log_brightness, 0), ndimage.sobel(log_brightness, 1))
    gradient *= 255.0 / 8.0
    edge_density = ndimage.uniform_filter((gradient > 7).astype(np.float32), 7)
    edges = (gradient > 20) | (edge_density > 0.2)
    # The board's light is uneven (brighter in the middle): fit it first to the outer ring,
    # then again to every pixel that looked like board the first time.
    board_pixels = _outer_ring(*small.shape[:2])
    for _ in range(2):
        board = np.clip(_board_fit(small, board_pixels), 1.0, 255.0)
        evidence = edges | _unlike_board(small, board)
        board_pixels = ~ndimage.binary_dilation(evidence, iterations=3)
        if board_pixels.mean() < 0.15:
            break
    labels, count = ndimage.label(evidence)
    if count:
        sizes = ndimage.sum(evidence, labels, range(1, count + 1))
        evidence = np.isin(labels, 1 + np.flatnonzero(sizes >= 12))
    radius = 7
    padded = np.pad(evidence, radius + 1)
    closed = ndimage.binary_closing(padded, structure=_disk(radius))[
        radius + 1 : -radius - 1, radius + 1 : -radius - 1
    ]
    mask = ndimage.binary_opening(ndimage.binary_fill_holes(closed), structure=_disk(2))
    # Edges and their density reach two or three pixels past the item: take them back.
    mask = _largest_component(ndimage.binary_erosion(mask, structure=_disk(2)))
    board_like = (
        float(np.median(board.mean(axis=-1))) > 90
        and float(np.median(np.ptp(board, axis=-1))) < 40
        and 0.01 < float(mask.mean()) < 0.85
    )
    return mask, board_like


def cut_out(image: Image.Image) -> Cutout:
    """The item of a TrashNet-like photo, with a soft-edged alpha at the photo's size."""
    rgb = image.convert("RGB")
    mask, found = item_mask(rgb)
    if not found:
        return Cutout(np.asarray(rgb, dtype=np.uint8), np.ones(rgb.size[::-1], np.float32), False)
    alpha_image = Image.fromarray(mask.astype(np.uint8) * 255).resize(
        rgb.size, Image.Resampling.BILINEAR
    )
    alpha = np.asarray(alpha_image, dtype=np.float32) / 255.0
    # A hard core and a short seam: scaled-up mask edges are soft over several pixels.
    alpha = np.clip((alpha - 0.3) / 0.4, 0.0, 1.0)
    return Cutout(np.asarray(rgb, dtype=np.uint8), alpha.astype(np.float32), True)


# ---------------------------------------------------------------------------------------------
# Composition.


# An item with no board found around it fills its frame: it is shrunk at least to this share
# when composed, so that the new floor shows around it.
FRAME_FILLING_SCALE = 0.75


def composite(
    cut: Cutout,
    floor: np.ndarray,
    scale: float = 1.0,
    centre: tuple[float, float] | None = None,
) -> np.ndarray:
    """The item on ``floor`` (same size as the photo), with a soft shadow; uint8 HxWx3.

    At ``scale`` 1 the item keeps its place and its pixels (where alpha is 1 the photo's
    pixels are copied unchanged); smaller, it is centred on ``centre`` (x, y in pixels; the
    frame's centre by default). An item with no board found is shrunk to 75 % at least.
    """
    width, height = cut.size
    item, alpha = cut.image.astype(np.float32), cut.alpha
    if not cut.found:
        scale = min(scale, FRAME_FILLING_SCALE)
        alpha = feathered_frame(height, width)
    if scale != 1.0 or centre is not None:
        item, alpha = _place(item, alpha, scale, centre or (width / 2, height / 2))
    # A soft shadow down and to the right, as from a lamp above and behind the camera.
    reach = 0.01 * max(width, height)
    cast = ndimage.shift(alpha, (reach, 0.75 * reach), order=1, cval=0.0)
    shadow = ndimage.gaussian_filter(cast, 1.2 * reach)
    floor = floor * (1 - 0.45 * np.clip(shadow, 0, 1))[..., None]
    blended = item * alpha[..., None] + floor * (1 - alpha[..., None])
    out: np.ndarray = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return out


def encode(photo: np.ndarray, quality: int = 92) -> bytes:
    """``photo`` (uint8 HxWx3) as a JPEG file's bytes."""
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def feathered_frame(height: int, width: int) -> np.ndarray:
    """Alpha of a whole photo used as the item: 1 inside, fading over its outer 3 %."""
    margin = max(2.0, 0.03 * min(height, width))
    ys = np.minimum(np.arange(height), np.arange(height)[::-1]) / margin
    xs = np.minimum(np.arange(width), np.arange(width)[::-1]) / margin
    frame: np.ndarray = np.clip(np.minimum.outer(ys, xs), 0, 1).astype(np.float32)
    return frame


def _place(
    item: np.ndarray, alpha: np.ndarray, scale: float, centre: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """``item`` and ``alpha`` scaled by ``scale`` about the item's own centre, which lands on
    ``centre``; the frame keeps its size (what falls outside is cut off)."""
    height, width = alpha.shape
    ys, xs = np.nonzero(alpha > 0.5)
    item_x = (xs.min() + xs.max()) / 2 if len(xs) else width / 2
    item_y = (ys.min() + ys.max()) / 2 if len(ys) else height / 2
    # Output pixel p shows source pixel (p - centre) / scale + item centre.
    matrix = (1 / scale, 0, item_x - centre[0] / scale, 0, 1 / scale, item_y - centre[1] / scale)
    moved = Image.fromarray(item.astype(np.uint8)).transform(
        (width, height), Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR
    )
    moved_alpha = Image.fromarray(alpha.astype(np.float32)).transform(
        (width, height), Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR, fillcolor=0.0
    )
    return np.asarray(moved, np.float32), np.asarray(moved_alpha, np.float32)


def item_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the item, the whole frame when there is none."""
    ys, xs = np.nonzero(alpha > 0.5)
    if not len(xs):
        return 0, 0, alpha.shape[1], alpha.shape[0]
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def motion_blur(photo: np.ndarray, length: float, angle: float) -> np.ndarray:
    """``photo`` averaged along a ``length``-pixel line at ``angle`` radians, as an item moving
    during the exposure; the frame's edges are extended, not wrapped."""
    steps = max(2, int(round(length)))
    pad = steps
    padded = np.pad(photo.astype(np.float32), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    height, width = photo.shape[:2]
    total = np.zeros((height, width, 3), dtype=np.float32)
    for t in np.linspace(-length / 2, length / 2, steps):
        dx, dy = int(round(t * np.cos(angle))), int(round(t * np.sin(angle)))
        total += padded[pad + dy : pad + dy + height, pad + dx : pad + dx + width]
    out: np.ndarray = np.clip(np.round(total / steps), 0, 255).astype(np.uint8)
    return out
