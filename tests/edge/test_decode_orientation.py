"""Camera photos tagged with an EXIF orientation decode upright, the way a person sees them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from smartbin.preprocessing import decode_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def tagged_jpeg(orientation: int) -> bytes:
    """A 60x30 photo, red left half and blue right half, saved with an orientation tag."""
    image = Image.new("RGB", (60, 30), RED)
    image.paste(BLUE, (30, 0, 60, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "orientation, size, first",
    [(1, (60, 30), RED), (3, (60, 30), BLUE), (6, (30, 60), RED), (8, (30, 60), BLUE)],
)
def test_orientation_tag_is_applied(orientation: int, size: tuple[int, int], first: tuple) -> None:
    image = decode_image(tagged_jpeg(orientation))
    assert image.size == size
    # Orientation 6 turns the photo clockwise (red ends on top), 8 anticlockwise, 3 upside down.
    pixels = np.asarray(image, dtype=np.int16)
    corner = pixels[2, 2]
    assert np.abs(corner - np.array(first)).max() < 40, (orientation, corner)
