"""Runs a bundle's .tflite model with the LiteRT interpreter (tflite-runtime as a fallback)."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
from dataclasses import dataclass

import numpy as np

from smartbin.bundle import Bundle, BundleError

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # older Pis: the tflite-runtime wheel has the same API
    from tflite_runtime.interpreter import Interpreter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


class TFLiteClassifier:
    """One loaded bundle: turns prepared pixels into ranked label probabilities.

    Interpreters are built once. Each holds one set of tensors, so it runs one call at a time;
    with ``interpreters`` above 1, that many calls run side by side (about 10 MB each). The
    model is read into memory and its sha256 checked on those very bytes: a file mapped from
    disk could be overwritten under a running model by the next bundle.

    Raises:
        BundleError: the model file changed since the bundle was verified.
        ValueError: the interpreter refuses the model, or its shapes contradict the manifest.
    """

    def __init__(
        self, bundle: Bundle, num_threads: int | None = None, interpreters: int = 1
    ) -> None:
        self.bundle = bundle
        threads = num_threads or os.cpu_count() or 1
        content = bundle.model_path.read_bytes()
        if hashlib.sha256(content).hexdigest() != bundle.sha256:
            raise BundleError(f"{bundle.model_path} changed since its sha256 was checked")
        try:
            pool = [
                Interpreter(model_content=content, num_threads=threads) for _ in range(interpreters)
            ]
            for interpreter in pool:
                interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            # The interpreter's own words ("Constant buffer 58 ...") do not say which file.
            raise ValueError(
                f"{bundle.model_path} is not a model the TFLite interpreter can run: {err}"
            ) from err
        self._input = pool[0].get_input_details()[0]
        self._output = pool[0].get_output_details()[0]
        # Last in, first out: a lone caller keeps the interpreter whose caches are warm.
        self._idle: queue.LifoQueue[Interpreter] = queue.LifoQueue()
        for interpreter in pool:
            self._idle.put(interpreter)
        expected = (1, bundle.preprocessing.input_size, bundle.preprocessing.input_size, 3)
        if tuple(self._input["shape"]) != expected:
            raise ValueError(
                f"model input shape {tuple(self._input['shape'])} does not match "
                f"the manifest's preprocessing {expected}"
            )
        classes = int(self._output["shape"][-1])
        if classes != len(bundle.labels):
            raise ValueError(
                f"model has {classes} outputs but the manifest lists {len(bundle.labels)} labels"
            )

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self._input["dtype"])

    def _quantize_input(self, pixels: np.ndarray) -> np.ndarray:
        scale, zero_point = self._input["quantization"]
        if self.input_dtype == np.float32:
            return pixels.astype(np.float32)[np.newaxis]
        if self.input_dtype == np.int8 and scale == 1.0 and zero_point == -128:
            # The converter's models: pixel - 128 as int8 is the pixel with its top bit flipped,
            # 10 µs in one pass instead of 1-2 ms for the float round trip below at 320 px.
            return np.bitwise_xor(pixels, 0x80).view(np.int8)[np.newaxis]
        info = np.iinfo(self.input_dtype)
        quantized = np.round(pixels.astype(np.float32) / scale) + zero_point
        return np.clip(quantized, info.min, info.max).astype(self.input_dtype)[np.newaxis]

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Raw (dequantised) model outputs for one uint8 HWC image."""
        tensor = self._quantize_input(pixels)
        interpreter = self._idle.get()
        try:
            interpreter.set_tensor(self._input["index"], tensor)
            interpreter.invoke()
            raw = interpreter.get_tensor(self._output["index"])[0].copy()
        finally:
            self._idle.put(interpreter)
        scale, zero_point = self._output["quantization"]
        if scale:
            return (raw.astype(np.float32) - zero_point) * scale
        return raw.astype(np.float32)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        logits = self.logits(pixels)
        exp = np.exp(logits - logits.max())
        return exp / exp.sum()

    def rank(self, probabilities: np.ndarray, top_k: int = 0) -> list[Prediction]:
        """Labels ranked best first; ``top_k`` 0 keeps all."""
        order = np.argsort(-probabilities, kind="stable")
        if top_k:
            order = order[:top_k]
        return [Prediction(self.bundle.labels[i], float(probabilities[i])) for i in order]
