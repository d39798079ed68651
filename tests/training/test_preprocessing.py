"""Preprocessing is defined once: the trainer and the edge runtime see the same tensor."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smartbin.preprocessing import (
    ImageDecodeError,
    Preprocessing,
    decode_image,
    prepare,
    resize_and_crop,
)
from trainer.data import load_source
from trainer.evaluate import eval_tensor
from trainer.model import default_preprocessing


def test_trainer_and_edge_see_the_same_tensor(tiny_data: Path) -> None:
    spec = default_preprocessing("mobilenetv2_100")
    samples = load_source(str(tiny_data)).samples[:3]
    trainer_inputs, _ = eval_tensor(samples, spec)
    for sample, tensor in zip(samples, trainer_inputs, strict=True):
        edge = prepare(sample.data, spec)
        assert edge.shape == (224, 224, 3) and edge.dtype == np.uint8
        np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), edge.astype(np.float32))


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_every_image_mode_becomes_rgb(mode: str) -> None:
    image = Image.new(mode, (50, 40))
    data = encode(image, "TIFF" if mode in ("CMYK", "I;16") else "PNG")
    decoded = decode_image(data)
    assert decoded.mode == "RGB" and decoded.size == (50, 40)


def test_oversized_images_are_refused_before_decoding() -> None:
    data = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageDecodeError, match="more than the limit"):
        decode_image(data, max_pixels=1_000_000)


def test_crop_is_square_and_centred() -> None:
    spec = Preprocessing(input_size=4, resize_size=4)
    image = Image.new("RGB", (8, 4), (0, 0, 0))
    image.paste((255, 255, 255), (2, 0, 6, 4))
    pixels = prepare(encode(image, "PNG"), spec)
    assert pixels.shape == (4, 4, 3)
    assert (pixels == 255).all()


def resize_whole_then_crop(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """The textbook way: resize the whole image, then cut the centre square out."""
    scale = spec.resize_size / min(image.size)
    size = tuple(max(spec.input_size, round(side * scale)) for side in image.size)
    left, top = ((side - spec.input_size) // 2 for side in size)
    resized = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized.crop((left, top, left + spec.input_size, top + spec.input_size)))


def test_resampling_only_the_crop_matches_resizing_the_whole_photo(tiny_data: Path) -> None:
    spec = Preprocessing()
    for path in sorted(tiny_data.rglob("*.jpg"))[:6]:
        photo = decode_image(path.read_bytes())
        for image in (photo, photo.resize((photo.width // 3, photo.height // 3))):
            expected = resize_whole_then_crop(image, spec).astype(int)
            actual = resize_and_crop(image, spec).astype(int)
            # Same source region and filter; float rounding moves a few values by one.
            assert np.abs(actual - expected).max() <= 1
            assert (actual != expected).mean() < 0.01


def test_an_elongated_image_is_prepared() -> None:
    # Its memory cost is checked against a live server in test_fuzz_classify.py.
    image = Image.new("RGB", (2, 20_000), (10, 200, 30))
    pixels = resize_and_crop(image, Preprocessing())
    assert pixels.shape == (224, 224, 3)
    assert (pixels == (10, 200, 30)).all()
