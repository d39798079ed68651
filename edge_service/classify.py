"""The one path from a photo to an answer, shared by Classify, Capture and the camera triggers,
and by every route that classifies an uploaded photo: gRPC ``Classify`` and ``ModelInfer``, and
the web port's ``/api/v1/classify`` and ``/v2/.../infer`` (:class:`UploadClassifier`).

Callers read the served model once and pass it in, so a call finishes on the model it started
on even when a reload swaps in another one meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from PIL import Image

from edge_service.const import DEFAULT_CONFIDENCE_THRESHOLD
from edge_service.memory import BudgetBusy, DecodeBudget, Lease, TooLargeForBudget, megabytes
from edge_service.metrics import ServiceMetrics
from edge_service.recent import RecentAnswers, guesses_from
from edge_service.unsure_store import UnsureStore, jpeg_bytes
from smartbin.model import Prediction, TFLiteClassifier
from smartbin.preprocessing import ImageDecodeError, decode_image, resize_and_crop

if TYPE_CHECKING:
    from edge_service.runtime import BinRuntime

logger = logging.getLogger(__name__)


class TopKError(ValueError):
    """top_k asks for more labels than the model has."""


class Refused(Exception):
    """A call the service will not answer: the gRPC status code its caller gets and a message
    that says what to fix. gRPC aborts the call with both; the web port answers the HTTP status
    that matches the code (edge_service/web/errors.py) and the same message.

    Attributes:
        code: the gRPC status code.
        message: what went wrong and what to send instead.
        http_status: the HTTP status when it says more than the code's usual one (413 for a
            body over the size limit); None: the usual one.
    """

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


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
        recent: where the last answers and their photos are kept for the review page, or None.
    """

    def __init__(
        self,
        metrics: ServiceMetrics,
        confidence_threshold: float | None = None,
        unsure_store: UnsureStore | None = None,
        recent: RecentAnswers | None = None,
    ) -> None:
        self.metrics = metrics
        self.confidence_threshold = confidence_threshold
        self.unsure_store = unsure_store
        self.recent = recent

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
        trigger: str = "upload",
        taken_at: float | None = None,
    ) -> Answer:
        """Classify one upright RGB photo with ``classifier``.

        Args:
            classifier: the model to use, read once by the caller.
            image: the photo.
            capture_seconds: time the camera took to deliver it (0 for uploads).
            decode_seconds: time spent decoding uploaded bytes (0 for camera frames).
            encoded: the uploaded file, kept as is when the answer is unsure and it is a JPEG.
            trigger: what took the photo ("upload", or the camera trigger), kept with it.
            taken_at: Unix time the photo was taken; None: now.
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
        answer = Answer(ranked, classifier.bundle.version, unsure, timings)
        keep = unsure and self.unsure_store is not None
        if keep or self.recent is not None:
            taken = time.time() if taken_at is None else taken_at
            self._keep_photo(image, encoded, answer, keep, trigger, taken)
        return answer

    def _keep_photo(
        self,
        image: Image.Image,
        encoded: bytes | None,
        answer: Answer,
        keep_unsure: bool,
        trigger: str,
        taken_at: float,
    ) -> None:
        """Keep the photo where it is wanted: the unsure store (with what the model said beside
        it) and the recent answers; encoded to JPEG once for both."""
        jpeg = jpeg_bytes(image, encoded)
        guesses = guesses_from(answer.predictions)
        if keep_unsure and self.unsure_store is not None:
            path = self.unsure_store.keep(image, guesses[0].label, jpeg)
            if path is not None:
                details = {
                    "taken_at": taken_at,
                    "trigger": trigger,
                    "model_version": answer.model_version,
                    "guesses": [{"label": g.label, "score": g.score} for g in guesses],
                }
                self.unsure_store.describe(path, details)
        if self.recent is not None:
            self.recent.add(image, jpeg, answer, trigger, taken_at)

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


# Request messages from this size up count in the photo memory, as on the gRPC port (guard.py).
COUNTED_REQUEST_BYTES = 64 * 1024


class UploadClassifier:
    """Classifies uploaded photos for every route that takes one, whatever its transport.

    It decodes within the decode budget all calls share, checks top_k and the caller's deadline,
    asks the pipeline for the answer and counts the refusals it makes; a refusal is raised as
    :class:`Refused`. The routes only unpack their request and pack the :class:`Answer`.

    Args:
        runtime: the served model and the pipeline.
        max_pixels: the largest decoded image (width x height) accepted.
        decode_budget: the memory for photos all calls share.
        metrics: where refusals are counted.
        max_workers: classifications computed at once, by the gRPC port and the web port
            together (``workers`` is the semaphore both take).
    """

    def __init__(
        self,
        runtime: BinRuntime,
        max_pixels: int,
        decode_budget: DecodeBudget,
        metrics: ServiceMetrics,
        max_workers: int,
    ) -> None:
        self.runtime = runtime
        self.max_pixels = max_pixels
        self.decode_budget = decode_budget
        self.metrics = metrics
        self.max_workers = max_workers
        self.workers = threading.BoundedSemaphore(max_workers)

    def classify(
        self,
        data: bytes,
        top_k: int,
        method: str,
        time_left: Callable[[], float | None] = lambda: None,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Answer:
        """Classify the encoded photo ``data`` with the served model.

        Args:
            data: the uploaded file (JPEG, PNG, WebP, BMP...).
            top_k: how many predictions the caller wants (0: all); checked against the labels.
            method: the route's name in the metrics (``Classify``, ``HTTP Classify``...).
            time_left: the caller's remaining deadline in seconds, None for none.
            is_active: whether the caller is still waiting for the answer.

        Raises:
            Refused: top_k is too large, the bytes are not a photo it can classify, the decode
                budget has no room for it, or the caller gave up before the model ran.
        """
        # One read of the reference: a call finishes on the model it started with.
        classifier = self.runtime.models.current
        try:
            check_top_k(classifier, top_k)
        except TopKError as err:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        started = time.perf_counter()
        # The photo's decode reserves its memory from the budget all calls share, and its RGB
        # image stays reserved until the answer is made (edge_service/memory.py).
        with self.decode_budget.lease(time_left(), len(data)) as lease:
            image = self._decode(data, classifier, lease, method)
            try:
                # A large photo can outlast its caller's deadline; then the model need not run.
                check_still_wanted(time_left(), is_active(), "inference")
                return self.runtime.pipeline.answer(
                    classifier, image, decode_seconds=time.perf_counter() - started, encoded=data
                )
            finally:
                image.close()

    def _decode(
        self, data: bytes, classifier: TFLiteClassifier, lease: Lease, method: str
    ) -> Image.Image:
        """The upright RGB photo, within the decode budget."""
        try:
            image = decode_image(
                data,
                self.max_pixels,
                min_size=classifier.bundle.preprocessing.resize_size,
                admit=lease.admit,
            )
        except ImageDecodeError as err:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        except TooLargeForBudget as err:  # it would never fit: the caller must send another
            self.metrics.refusals.labels(method, "decode_budget_exceeded").inc()
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        except BudgetBusy as err:  # the bin is busy: a retry may find room
            self.metrics.refusals.labels(method, "decode_budget_busy").inc()
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from err
        lease.settle()
        return image

    @contextlib.contextmanager
    def working(self, wait: float, method: str) -> Iterator[None]:
        """One of the ``max_workers`` places while the block runs, waited for up to ``wait``
        seconds (the gRPC port's CallGuard takes the same places)."""
        if not self.workers.acquire(timeout=wait):
            self.metrics.refusals.labels(method, "worker_wait").inc()
            raise Refused(
                grpc.StatusCode.UNAVAILABLE,
                f"all {self.max_workers} workers (max_workers) stayed busy for {wait:g} s: "
                "retry later",
            )
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.metrics.in_flight.dec()
            self.workers.release()

    @contextlib.contextmanager
    def holding_request(self, size: int, method: str) -> Iterator[None]:
        """Count a received request of ``size`` bytes in the photo memory while the block runs,
        as the gRPC port does with its request messages."""
        held = None
        if size >= COUNTED_REQUEST_BYTES:
            held = self.decode_budget.hold_request(size)
            if held is None:
                self.metrics.refusals.labels(method, "request_memory").inc()
                budget = self.decode_budget
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this {megabytes(size)} request does not fit beside the "
                    f"{megabytes(budget.requests_held)} of requests being served in this bin's "
                    f"{megabytes(budget.capacity)} photo memory (decode_budget_bytes): retry later",
                )
        try:
            yield
        finally:
            if held is not None:
                self.decode_budget.release_request(held)


def check_still_wanted(time_left: float | None, active: bool, work: str) -> None:
    """Raises Refused (DEADLINE_EXCEEDED or CANCELLED) when the caller has given up before
    ``work``."""
    if time_left is not None and time_left <= 0:
        raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline passed before {work}")
    if not active:
        raise Refused(grpc.StatusCode.CANCELLED, f"call cancelled before {work}")
