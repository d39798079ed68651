"""The one path from a photo to an answer, shared by Classify, Capture and the camera triggers.

Callers read the served model once and pass it in, so a call finishes on the model it started
on even when a reload swaps in another one meanwhile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from PIL import Image

from edge_service.const import DEFAULT_CONFIDENCE_THRESHOLD
from edge_service.metrics import ServiceMetrics
from edge_service.unsure_store import UnsureStore
from smartbin.model import Prediction, TFLiteClassifier
from smartbin.preprocessing import resize_and_crop

logger = logging.getLogger(__name__)


class TopKError(ValueError):
    """top_k asks for more labels than the model has."""


@dataclass(frozen=True)
class Timings:
    """Seconds spent in each stage of one classification."""

    capture: float = 0.0
    decode: float = 0.0
    preprocess: float = 0.0
    inference: float = 0.0

    @property
    def total(self) -> float:
        return self.capture + self.decode + self.preprocess + self.inference


@dataclass(frozen=True)
class Answer:
    """Every label ranked best first, the model that gave them, and whether it is unsure."""

    predictions: tuple[Prediction, ...]
    model_version: str
    unsure: bool
    timings: Timings

    def top(self, top_k: int) -> tuple[Prediction, ...]:
        """The best ``top_k`` predictions; 0 keeps all."""
        return self.predictions[:top_k] if top_k else self.predictions


def check_top_k(classifier: TFLiteClassifier, top_k: int) -> None:
    """Raises TopKError, saying what to send instead, when top_k exceeds the model's labels."""
    labels = len(classifier.bundle.labels)
    if top_k > labels:
        raise TopKError(
            f"top_k is {top_k} but the model has {labels} labels: use 0 (all) to {labels}"
        )


class Pipeline:
    """Preprocesses, infers, ranks, judges confidence, records metrics and keeps unsure photos.

    Args:
        metrics: where each stage's time and each answer are counted.
        confidence_threshold: a best score below this marks the answer unsure; None: the
            served bundle's calibrated threshold, or DEFAULT_CONFIDENCE_THRESHOLD for a bundle
            without one.
        unsure_store: where unsure photos are kept, or None.
    """

    def __init__(
        self,
        metrics: ServiceMetrics,
        confidence_threshold: float | None = None,
        unsure_store: UnsureStore | None = None,
    ) -> None:
        self.metrics = metrics
        self.confidence_threshold = confidence_threshold
        self.unsure_store = unsure_store

    def threshold_for(self, classifier: TFLiteClassifier) -> float:
        """The best score under which ``classifier``'s answers are unsure: the config's, else
        its bundle's calibrated one, else the default."""
        if self.confidence_threshold is not None:
            return self.confidence_threshold
        calibration = classifier.bundle.manifest.calibration
        if calibration is not None:
            return calibration.unsure_below
        return DEFAULT_CONFIDENCE_THRESHOLD

    def answer(
        self,
        classifier: TFLiteClassifier,
        image: Image.Image,
        capture_seconds: float = 0.0,
        decode_seconds: float = 0.0,
        encoded: bytes | None = None,
    ) -> Answer:
        """Classify one upright RGB photo with ``classifier``.

        Args:
            classifier: the model to use, read once by the caller.
            image: the photo.
            capture_seconds: time the camera took to deliver it (0 for uploads).
            decode_seconds: time spent decoding uploaded bytes (0 for camera frames).
            encoded: the uploaded file, kept as is when the answer is unsure and it is a JPEG.
        """
        started = time.perf_counter()
        pixels = resize_and_crop(image, classifier.bundle.preprocessing)
        prepared = time.perf_counter()
        probabilities = classifier.probabilities(pixels)
        inferred = time.perf_counter()
        ranked = tuple(classifier.rank(probabilities))
        timings = Timings(capture_seconds, decode_seconds, prepared - started, inferred - prepared)
        best = ranked[0]
        unsure = best.score < self.threshold_for(classifier)
        self._record(best, unsure, timings)
        if unsure and self.unsure_store is not None:
            self.unsure_store.keep(image, best.label, encoded)
        return Answer(ranked, classifier.bundle.version, unsure, timings)

    def _record(self, best: Prediction, unsure: bool, timings: Timings) -> None:
        stage = self.metrics.stage_seconds
        if timings.capture:
            stage.labels("capture").observe(timings.capture)
        if timings.decode:
            stage.labels("decode").observe(timings.decode)
        stage.labels("preprocess").observe(timings.preprocess)
        stage.labels("inference").observe(timings.inference)
        self.metrics.inference_seconds.observe(timings.inference)
        self.metrics.classifications.labels(best.label).inc()
        self.metrics.confidence.observe(best.score)
        if unsure:
            self.metrics.unsure.inc()
