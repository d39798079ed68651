"""Preprocessing is defined once: the trainer and the edge runtime see the same tensor."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_service.preprocess import ImageDecodeError, Preprocessing, decode_image, prepare
from trainer.data import load_source
from trainer.model import default_preprocessing
from trainer.train import eval_tensor


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
