"""What the peers classify a photo with: the contract's preprocessing, then the bundle's TFLite
model (as the service runs it) or the float32 model in ONNX Runtime."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from smartbin.bundle import Bundle
from smartbin.model import Prediction, TFLiteClassifier, softmax
from smartbin.preprocessing import prepare

ENGINES = ("tflite", "onnxruntime")


class Engine(Protocol):
    bundle: Bundle

    def classify(self, photo: bytes) -> list[Prediction]: ...


class TFLiteEngine:
    """The service's own classifier: the contract's TFLiteClassifier on the bundle's model."""

    def __init__(self, bundle: Bundle, threads: int | None = None, interpreters: int = 1) -> None:
        self.bundle = bundle
        self.classifier = TFLiteClassifier(bundle, threads, interpreters)

    def classify(self, photo: bytes) -> list[Prediction]:
        pixels = prepare(photo, self.bundle.preprocessing)
        return self.classifier.rank(self.classifier.probabilities(pixels))


class OnnxEngine:
    """ONNX Runtime on the float32 model exported to ONNX (peers.onnx_export), with ONNX
    Runtime's defaults but its thread pool sized to ``threads`` (all cores by default)."""

    def __init__(self, bundle: Bundle, onnx_model: Path, threads: int | None = None) -> None:
        import onnxruntime

        self.bundle = bundle
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        self.session = onnxruntime.InferenceSession(
            str(onnx_model), options, providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name

    def classify(self, photo: bytes) -> list[Prediction]:
        pixels = prepare(photo, self.bundle.preprocessing).astype(np.float32)[np.newaxis]
        (logits,) = self.session.run(None, {self.input: pixels})
        probabilities = softmax(np.asarray(logits)[0], self.bundle.temperature)
        order = np.argsort(-probabilities, kind="stable")
        return [Prediction(self.bundle.labels[i], float(probabilities[i])) for i in order]


def make_engine(
    name: str, bundle: Bundle, onnx_model: Path | None = None, threads: int | None = None
) -> Engine:
    if name == "tflite":
        return TFLiteEngine(bundle, threads)
    if name == "onnxruntime":
        if onnx_model is None:
            raise ValueError("the onnxruntime engine needs the model as ONNX")
        return OnnxEngine(bundle, onnx_model, threads)
    raise ValueError(f"engine {name!r}: one of {', '.join(ENGINES)}")
