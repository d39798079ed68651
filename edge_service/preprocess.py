"""The one definition of how a photo becomes the model's input.

The trainer's evaluation, the converter's calibration and the edge runtime all call these
functions, so the model sees the same pixels everywhere. Normalisation (mean/std) happens inside
the model itself, which keeps the runtime's job to decode, resize, crop.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# Pillow's own bomb check only warns below twice its limit; we enforce our own limit instead.
Image.MAX_IMAGE_PIXELS = None

_INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ImageDecodeError(ValueError):
    """The bytes are not an image we can classify; the message says why."""


@dataclass(frozen=True)
class Preprocessing:
    """How pixels are prepared for a model: resize the shorter side, centre-crop a square.

    ``mean`` and ``std`` are applied by the model on 0..255 pixels; they travel here so that the
    trainer and converter build the model with the same values the bundle records.
    """

    input_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    color: str = field(default="RGB")

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
        if not 0 < self.input_size <= self.resize_size:
            raise ValueError("need 0 < input_size <= resize_size")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            input_size=int(data["input_size"]),
            resize_size=int(data["resize_size"]),
            interpolation=str(data.get("interpolation", "bilinear")),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data


def decode_image(data: bytes, max_pixels: int = 40_000_000, min_size: int = 0) -> Image.Image:
    """Decode encoded image bytes into an upright RGB image.

    Args:
        data: the encoded file (JPEG, PNG, WebP, BMP, GIF...).
        max_pixels: refuse images with more pixels than this before decoding them (bomb guard).
        min_size: for JPEG, let the decoder scale down by a power of two while both sides stay
            at least this large (much faster for camera-sized photos).

    Raises:
        ImageDecodeError: empty, unreadable, truncated or oversized input.
    """
    if not data:
        raise ImageDecodeError("image is empty: send the bytes of an encoded image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} = {width * height} pixels, more than the "
                    f"limit of {max_pixels}: send a smaller image"
                )
            if min_size and image.format == "JPEG":
                image.draft("RGB", (min_size, min_size))
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as err:
        raise ImageDecodeError(
            "bytes are not a recognised image format: send a JPEG, PNG, WebP or BMP file"
        ) from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(
            f"image could not be decoded ({err}): the file may be truncated or corrupt"
        ) from err


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten any mode (palette, alpha, greyscale, 16-bit, CMYK) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas become white, like the background of the training photos.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = max(float(array.max()), 1.0)
        image = Image.fromarray((array * (255.0 / peak)).astype(np.uint8))
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """Resize the shorter side to ``resize_size`` and centre-crop ``input_size`` square.

    Returns:
        uint8 array of shape (input_size, input_size, 3), RGB.
    """
    width, height = image.size
    scale = spec.resize_size / min(width, height)
    new_size = (
        max(spec.input_size, round(width * scale)),
        max(spec.input_size, round(height * scale)),
    )
    resized = image.resize(new_size, _INTERPOLATIONS[spec.interpolation])
    left = (new_size[0] - spec.input_size) // 2
    top = (new_size[1] - spec.input_size) // 2
    cropped = resized.crop((left, top, left + spec.input_size, top + spec.input_size))
    return np.asarray(cropped, dtype=np.uint8)


def prepare(data: bytes, spec: Preprocessing, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode encoded bytes and return the model input pixels (uint8 HWC, RGB)."""
    return resize_and_crop(decode_image(data, max_pixels, min_size=spec.resize_size), spec)
