"""The one definition of how a photo becomes the model's input.

The trainer's evaluation, the converter's calibration and the edge runtime all call these
functions, so the model sees the same pixels everywhere. Normalisation (mean/std) happens inside
the model itself, which keeps the runtime's job to decode, resize, crop.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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

EXIF_ORIENTATION = 0x0112

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


@dataclass(frozen=True)
class DecodeCost:
    """What decoding one photo will take, worked out from its header before any pixel is
    decoded: the most memory its decoding and its conversion to RGB hold at once, and the RGB
    image that is left.

    The model follows what :func:`decode_image` does (Pillow's storage of each mode, the
    decoder's own buffers, every copy on the way to RGB); ``docs/hardening.md`` compares it
    with measured peaks.
    """

    format: str
    width: int  # as decoded: a JPEG is decoded reduced when the caller allows it
    height: int
    mode: str
    peak_bytes: int
    result_bytes: int
    size_in_file: tuple[int, int] = (0, 0)  # before any reduction

    def describe(self) -> str:
        width, height = self.size_in_file
        if (width, height) in ((0, 0), (self.width, self.height)):
            return f"a {self.width}x{self.height} {self.mode} {self.format}"
        return (
            f"a {width}x{height} {self.format} (decoded reduced, to "
            f"{self.width}x{self.height} {self.mode})"
        )


def decode_image(
    data: bytes,
    max_pixels: int = 40_000_000,
    min_size: int = 0,
    admit: Callable[[DecodeCost], object] | None = None,
) -> Image.Image:
    """Decode encoded image bytes into an upright RGB image.

    Args:
        data: the encoded file, one of ``ACCEPTED_FORMATS``.
        max_pixels: refuse images with more pixels than this before decoding them (bomb guard).
        min_size: for JPEG, let the decoder scale down by a power of two while both sides stay
            at least this large (much faster for camera-sized photos, and far less memory).
        admit: called with the image's :class:`DecodeCost` once its header is read, before any
            pixel is decoded; it may raise to refuse the image (its exception passes through
            unchanged) or wait until that much memory is free.

    Raises:
        ImageDecodeError: empty, unreadable, truncated or oversized input.
    """
    if not data:
        raise ImageDecodeError("image is empty: send the bytes of an encoded image file")
    image, full_size = _open(data, max_pixels, min_size)
    try:
        cost = _decode_cost(image, data, full_size)
    except Exception as err:  # an unreadable EXIF block, say
        raise _undecodable(err) from err
    if admit is not None:
        admit(cost)
    try:
        image.load()
        if image.format == "WEBP":
            # libwebp's decoder keeps two canvases of the whole frame until the file object
            # goes; the pixels are loaded, so let it go now.
            vars(image).pop("_decoder", None)
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)
    except Exception as err:
        raise _undecodable(err) from err


def _undecodable(err: Exception) -> ImageDecodeError:
    # Pillow's decoders meet hostile bytes with many exception types (OSError, SyntaxError,
    # struct.error, IndexError, ...): each one means this file cannot be classified.
    return ImageDecodeError(
        f"image could not be decoded ({type(err).__name__}: {err}): the file may be "
        "truncated or corrupt"
    )


def _open(data: bytes, max_pixels: int, min_size: int) -> tuple[Image.Image, tuple[int, int]]:
    """The image with its header read, checked against ``max_pixels`` and, for a JPEG, set to
    decode reduced (no pixel decoded yet); and its size before any reduction."""
    try:
        # libwebp allocates its canvases as the file is opened: check the size before.
        _check_pixels(_webp_size(data), max_pixels)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        full_size = image.size
        _check_pixels(full_size, max_pixels)
        if min_size and image.format in ("JPEG", "MPO"):
            image.draft("RGB", (min_size, min_size))
        return image, full_size
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as err:
        raise ImageDecodeError(
            "bytes are not a recognised image format: send a JPEG, PNG, WebP, BMP, GIF or TIFF file"
        ) from err
    except Exception as err:
        raise _undecodable(err) from err


def _check_pixels(size: tuple[int, int] | None, max_pixels: int) -> None:
    if size is not None and size[0] * size[1] > max_pixels:
        width, height = size
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels, more than the "
            f"limit of {max_pixels}: send a smaller image"
        )


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size a WebP file declares (RFC 9649); None for anything else."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 ":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, (
            int.from_bytes(data[28:30], "little") & 0x3FFF
        )
    return None


# Bytes Pillow keeps per pixel of each mode: 1 for bilevel, grey and palette, 2 for 16-bit
# grey, 4 for everything else (RGB is stored as RGBX).
def _pixel_bytes(mode: str) -> int:
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Rows of a 16-bit or float image converted to 8 bits at a time: a band of float32 and its
# temporaries, a few megabytes, instead of copies of the whole image.
_BAND_PIXELS = 1 << 19
# libwebp's two canvases, its own frame and Pillow's copy: 12.1 bytes a pixel measured.
_WEBP_DECODER_BYTES_PER_PIXEL = 13
# What a decode holds beside its pixels: Python objects, a decoder's row buffers and tables.
_DECODE_OVERHEAD_BYTES = 6 * 2**20


def _decode_cost(image: Image.Image, data: bytes, full_size: tuple[int, int]) -> DecodeCost:
    """The memory decoding the opened (not yet loaded) ``image`` will take, by
    :func:`decode_image`'s steps; ``data`` is its file and ``full_size`` its size before a JPEG
    was set to decode reduced.

    Steps, each with what is alive at once: the decoder fills the decoded image while holding
    its own buffers; an EXIF orientation turns it (a second copy for a moment); the conversion
    to RGB makes its copies (see :func:`_to_rgb`), each step freeing the one before.
    """
    width, height = image.size
    pixels = width * height
    mode = image.mode
    decoded = pixels * _pixel_bytes(mode)
    rgb = pixels * 4
    stages = [decoded + _decoder_bytes(image, len(data), full_size)]
    if _has_orientation(image, data):
        stages.append(2 * decoded)
    if mode == "RGB":
        pass
    elif mode in ("RGBA", "LA"):
        stages.append(decoded + rgb)  # the white background, the photo pasted on it
    elif mode == "PA" or (mode == "P" and "transparency" in image.info):
        stages += [decoded + rgb, 2 * rgb]  # to RGBA, then the background
    elif mode in _HIGH_DEPTH:
        band = 4 * _BAND_PIXELS * 4  # float32 band and its temporaries
        stages += [decoded + pixels + band, pixels + rgb]  # to 8-bit grey, then to RGB
    else:
        stages.append(decoded + rgb)
    peak = max(stages) + _DECODE_OVERHEAD_BYTES
    return DecodeCost(str(image.format), width, height, mode, peak, rgb, full_size)


def _has_orientation(image: Image.Image, data: bytes) -> bool:
    """Whether the image may have to be turned. A PNG's EXIF may come after its pixels, where
    Pillow reads it only as it decodes them: a PNG that carries EXIF anywhere is counted."""
    if image.format == "PNG":
        return b"eXIf" in data or b"Raw profile type exif" in data
    return image.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1)


def _decoder_bytes(image: Image.Image, encoded_bytes: int, full_size: tuple[int, int]) -> int:
    """Memory a format's decoder holds beside the decoded image while it decodes."""
    pixels = image.size[0] * image.size[1]
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        # A progressive JPEG is decoded from the coefficients of the whole, unreduced image:
        # two bytes per sample of each component at its sampling.
        full_width, full_height = full_size
        layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * 3
        most_h = max(layer[1] for layer in layers)
        most_v = max(layer[2] for layer in layers)
        share = sum(layer[1] * layer[2] for layer in layers) / (most_h * most_v)
        return int(2 * share * (full_width + 15) * (full_height + 15))
    if image.format == "WEBP":
        return _WEBP_DECODER_BYTES_PER_PIXEL * pixels
    if image.format == "TIFF":
        # libtiff is handed a copy of the whole file, and may decode a strip or tile as large
        # as the image into a buffer of its own.
        return encoded_bytes + pixels * _pixel_bytes(image.mode)
    if image.format == "BMP" and image.info.get("compression") in (1, 2):
        # Pillow's run-length decoder builds the pixels in Python, then copies them.
        return encoded_bytes + 3 * pixels
    return encoded_bytes  # a decoder may hold a copy of the file


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten any mode (palette, alpha, greyscale, 16-bit, CMYK) to 8-bit RGB.

    Each step closes the image it came from, so that no more than two full copies are alive
    at once (:func:`decode_cost` counts them).
    """
    if image.mode == "RGB":
        return image
    if image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        image = _replace(image, image.convert("RGBA"))
    if image.mode in ("RGBA", "LA"):
        # Transparent areas become white, like the background of the training photos.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image)
        return _replace(image, background)
    if image.mode in _HIGH_DEPTH:
        image = _replace(image, _to_8bit(image))
    return _replace(image, image.convert("RGB"))


def _replace(old: Image.Image, new: Image.Image) -> Image.Image:
    """``new``, with ``old``'s pixels freed now rather than whenever the last reference goes."""
    if new is not old:
        old.close()
    return new


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float greyscale image stretched to 8-bit grey: 0 (or the lowest value,
    if negative) becomes black and the highest (at least 1) white; NaN and infinities count as
    0. Done in bands of rows, so that no float copy of the whole image is made."""
    width, height = image.size
    rows = max(1, _BAND_PIXELS // max(width, 1))
    bands = [(top, min(top + rows, height)) for top in range(0, height, rows)]

    def band(top: int, bottom: int) -> np.ndarray:
        values = np.asarray(image.crop((0, top, width, bottom)), dtype=np.float32)
        return np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)

    low, peak = 0.0, 1.0
    for top, bottom in bands:
        values = band(top, bottom)
        low, peak = min(low, float(values.min())), max(peak, float(values.max()))
    grey = np.empty((height, width), dtype=np.uint8)
    for top, bottom in bands:
        grey[top:bottom] = ((band(top, bottom) - low) * (255.0 / (peak - low))).astype(np.uint8)
    return Image.fromarray(grey)


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
