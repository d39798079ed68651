"""The one definition of how a photo becomes the model's input.

The trainer's evaluation, the converter's calibration and the edge runtime all call these
functions, so the model sees the same pixels everywhere. Normalisation (mean/std) happens inside
the model itself, which keeps the runtime's job to decode, resize, crop.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

logger = logging.getLogger(__name__)

# Pillow's own bomb check only warns below twice its limit; we enforce our own limit instead.
Image.MAX_IMAGE_PIXELS = None

# Formats a camera or an operator sends (JPEG covers the MPO files some cameras write). Pillow
# opens many more (EPS even runs Ghostscript); each is decoder code exposed to whatever reaches
# the port, so the rest are refused.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

_INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ImageDecodeError(ValueError):
    """The bytes are not an image we can classify; the message says why."""


class Preprocessing(BaseModel):
    """How pixels are prepared for a model: resize the shorter side, centre-crop a square, put
    the channels in the model's order.

    ``mean`` and ``std`` are applied by the model on 0..255 pixels; they travel here so that the
    trainer and converter build the model with the same values the bundle records. Unknown keys
    and unsupported values are refused: a bundle that asks for something this code does not do
    must not be served as if it asked for the default.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: int = Field(224, gt=0)
    resize_size: int = Field(256, gt=0)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (0.229, 0.224, 0.225)
    color: Literal["RGB", "BGR"] = "RGB"

    @model_validator(mode="after")
    def _crop_fits(self) -> Preprocessing:
        if self.input_size > self.resize_size:
            raise ValueError(
                f"input_size {self.input_size} is larger than resize_size {self.resize_size}: "
                "the centre crop must fit in the resized photo"
            )
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Read a manifest's or checkpoint's ``preprocessing``.

        Raises:
            pydantic.ValidationError: a missing, unknown or unsupported key.
        """
        return cls.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def decode_image(data: bytes, max_pixels: int = 40_000_000, min_size: int = 0) -> Image.Image:
    """Decode encoded image bytes into an upright RGB image.

    Args:
        data: the encoded file, one of ``ACCEPTED_FORMATS``.
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
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} = {width * height} pixels, more than the "
                    f"limit of {max_pixels}: send a smaller image"
                )
            if min_size and image.format in ("JPEG", "MPO"):
                image.draft("RGB", (min_size, min_size))
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as err:
        raise ImageDecodeError(
            "bytes are not a recognised image format: send a JPEG, PNG, WebP, BMP, GIF or TIFF file"
        ) from err
    except Exception as err:
        # Pillow's decoders meet hostile bytes with many exception types (OSError, SyntaxError,
        # struct.error, IndexError, ...): each one means this file cannot be classified.
        raise ImageDecodeError(
            f"image could not be decoded ({type(err).__name__}: {err}): the file may be "
            "truncated or corrupt"
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
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
        low, peak = min(float(array.min()), 0.0), max(float(array.max()), 1.0)
        image = Image.fromarray(((array - low) * (255.0 / (peak - low))).astype(np.uint8))
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """Resize the shorter side to ``resize_size`` and centre-crop ``input_size`` square.

    Returns:
        uint8 array of shape (input_size, input_size, 3), channels in ``spec.color`` order.
    """
    width, height = image.size
    scale = spec.resize_size / min(width, height)
    new_width = max(spec.input_size, round(width * scale))
    new_height = max(spec.input_size, round(height * scale))
    left = (new_width - spec.input_size) // 2
    top = (new_height - spec.input_size) // 2
    # Only the crop is resampled, from the source region it covers: resizing the whole image
    # first would turn a 290-byte 2x20000 PNG into a 256x2560000 image (gigabytes).
    to_source_x, to_source_y = width / new_width, height / new_height
    box = (
        left * to_source_x,
        top * to_source_y,
        (left + spec.input_size) * to_source_x,
        (top + spec.input_size) * to_source_y,
    )
    size = (spec.input_size, spec.input_size)
    cropped = np.asarray(
        image.resize(size, _INTERPOLATIONS[spec.interpolation], box=box), dtype=np.uint8
    )
    return cropped[..., ::-1].copy() if spec.color == "BGR" else cropped


def prepare(data: bytes, spec: Preprocessing, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode encoded bytes and return the model input pixels (uint8 HWC, ``spec.color``)."""
    return resize_and_crop(decode_image(data, max_pixels, min_size=spec.resize_size), spec)
