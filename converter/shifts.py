"""Camera shifts: test photos as another bin's camera might take them.

TrashNet photos share one white backdrop, one light and one camera. These deterministic shifts
show how an answer holds up when any of those change; the converter reports int8 accuracy on
each shifted copy of the test side.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter


def _dim(image: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(0.5)


def _warm_light(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) * np.array([1.08, 0.95, 0.70])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _blurry_low_quality(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.filter(ImageFilter.GaussianBlur(2.5)).save(buffer, "JPEG", quality=30)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _dark_backdrop(image: Image.Image) -> Image.Image:
    """The item smaller, framed by a dark, noisy bin floor instead of white board."""
    rng = np.random.default_rng(0)
    width, height = image.size
    floor = rng.normal(60, 20, (height, width, 3)).clip(0, 255).astype(np.uint8)
    canvas = Image.fromarray(floor)
    small = image.resize((int(width * 0.7), int(height * 0.7)), Image.Resampling.BILINEAR)
    canvas.paste(small, ((width - small.width) // 2, (height - small.height) // 2))
    return canvas


def _upside_down(image: Image.Image) -> Image.Image:
    return image.rotate(180)


SHIFTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "dim": _dim,
    "warm_light": _warm_light,
    "blurry_low_quality": _blurry_low_quality,
    "dark_backdrop": _dark_backdrop,
    "upside_down": _upside_down,
}


def shifted(data: bytes, shift: str) -> bytes:
    """The encoded photo after ``shift``, re-encoded as a high-quality JPEG."""
    with Image.open(io.BytesIO(data)) as image:
        out = SHIFTS[shift](image.convert("RGB"))
    buffer = io.BytesIO()
    out.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()
