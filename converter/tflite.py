"""PyTorch -> float TFLite (litert-torch) -> full-integer int8 TFLite (ai-edge-quantizer)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)


class NHWCPixels(nn.Module):
    """Takes NHWC float pixels (the TFLite layout) and feeds the NCHW model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels.permute(0, 3, 1, 2))


def export_float(model: nn.Module, input_size: int) -> bytes:
    """Convert an eval-mode PixelClassifier to a float32 .tflite taking NHWC 0..255 pixels."""
    import litert_torch

    sample = torch.zeros(1, input_size, input_size, 3)
    edge_model = litert_torch.convert(NHWCPixels(model).eval(), (sample,))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "float.tflite"
        edge_model.export(str(path))
        return path.read_bytes()


def calibration_frame(pixels: np.ndarray) -> np.ndarray:
    """One calibration input with a 0 and a 255 pixel.

    The calibrator averages per-frame min/max, so without both extremes in every frame the
    input scale comes out below 1 and bright pixels clip. Two pixels barely move the
    activation ranges.
    """
    frame = pixels.astype(np.float32).copy()
    frame[0, 0, :] = 0.0
    frame[0, 1, :] = 255.0
    return frame[np.newaxis]


def quantize_int8(float_model: bytes, calibration: Iterable[np.ndarray]) -> bytes:
    """Full-integer int8 (weights and activations, int8 input and output), calibrated on
    real prepared images (uint8 HWC)."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    signatures = Interpreter(model_content=float_model).get_signature_list()
    key = next(iter(signatures))
    input_name = signatures[key]["inputs"][0]
    frames = [{input_name: calibration_frame(p)} for p in calibration]
    if not frames:
        raise ValueError("int8 calibration needs at least one image")
    quant = quantizer.Quantizer(float_model, recipe.static_wi8_ai8())
    result = quant.quantize(quant.calibrate({key: frames}))
    logger.info(
        "int8 model: %.2f MB from %d calibration images",
        len(result.quantized_model) / 1e6,
        len(frames),
    )
    return bytes(result.quantized_model)
