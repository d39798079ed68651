"""Runs a bundle's .tflite model with the LiteRT interpreter (tflite-runtime as a fallback)."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import queue
import time
from dataclasses import dataclass

import numpy as np

from smartbin.bundle import Bundle, BundleError, ModelFile

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # older Pis: the tflite-runtime wheel has the same API
    from tflite_runtime.interpreter import Interpreter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis."""
    scaled = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    exp = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    result: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return result


# A bundle with alternatives is timed as it loads: after one warm-up invoke each, its models
# take turns for this many invokes each, and the one with the lowest median serves.
CHOICE_INVOKES = 3
# The bundle's main model keeps serving unless an alternative's median is at least this much
# lower. A float32 model holds about 3.5 times the memory of its int8 one (28 MB more for
# EfficientNet-Lite0 at 320 px): worth it for a clear gain, not for a few per cent, which is
# also about the spread of three invokes on a busy machine.
CHOICE_MARGIN = 0.10


@dataclass(frozen=True)
class ModelTiming:
    """One of a bundle's models as timed when the bundle was loaded: the median CPU time of
    an invoke on the serving thread count (all its threads), or why it cannot run here
    (``cpu_ms`` NaN). CPU time, not wall time: other work on the machine stretches wall times
    by half and more from one invoke to the next, CPU times by a few per cent."""

    file: str
    quantization: str
    cpu_ms: float
    error: str = ""


@dataclass
class _Loaded:
    model: ModelFile
    content: bytes
    interpreter: Interpreter


class TFLiteClassifier:
    """One loaded bundle: turns prepared pixels into ranked label probabilities.

    Interpreters are built once. Each holds one set of tensors, so it runs one call at a time;
    with ``interpreters`` above 1, that many calls run side by side (about 10 MB each). The
    model is read into memory and its sha256 checked on those very bytes: a file mapped from
    disk could be overwritten under a running model by the next bundle.

    A bundle with ``alternatives`` (say its int8 model and the float32 one it came from) has
    each of its models timed here, on this CPU and thread count, and the fastest serves
    (:attr:`model`; :attr:`timings` says what was measured). An alternative the interpreter
    refuses is skipped with a warning.

    Raises:
        BundleError: a model file changed since the bundle was verified.
        ValueError: the interpreter refuses the main model, or its shapes contradict the
            manifest.
    """

    def __init__(
        self, bundle: Bundle, num_threads: int | None = None, interpreters: int = 1
    ) -> None:
        self.bundle = bundle
        threads = num_threads or os.cpu_count() or 1
        main, *others = bundle.models
        loaded = [self._load(main, threads)]
        refused: list[ModelTiming] = []
        for alternative in others:
            try:
                loaded.append(self._load(alternative, threads))
            except ValueError as err:
                logger.warning("alternative model %s skipped: %s", alternative.file, err)
                refused.append(
                    ModelTiming(alternative.file, alternative.quantization, math.nan, str(err))
                )
        chosen, timed = _choose(loaded) if len(loaded) > 1 else (loaded[0], ())
        self.model: ModelFile = chosen.model
        self.timings: tuple[ModelTiming, ...] = (*timed, *refused)
        if self.timings:
            logger.info(
                "serving %s (%s), the fastest of the bundle's models here: %s of CPU per invoke "
                "on %d thread%s",
                chosen.model.file,
                chosen.model.quantization,
                timings_text(self.timings),
                threads,
                "" if threads == 1 else "s",
            )
        if len(loaded) > 1:
            del loaded  # the other models' interpreters and bytes
            _return_freed_memory()
        pool = [chosen.interpreter]
        try:
            for _ in range(interpreters - 1):
                interpreter = Interpreter(model_content=chosen.content, num_threads=threads)
                interpreter.allocate_tensors()
                pool.append(interpreter)
        except (ValueError, RuntimeError) as err:
            raise ValueError(
                f"{bundle.path_of(chosen.model)} is not a model the TFLite interpreter can run: "
                f"{err}"
            ) from err
        self._input = pool[0].get_input_details()[0]
        self._output = pool[0].get_output_details()[0]
        # Last in, first out: a lone caller keeps the interpreter whose caches are warm.
        self._idle: queue.LifoQueue[Interpreter] = queue.LifoQueue()
        for interpreter in pool:
            self._idle.put(interpreter)

    def _load(self, model: ModelFile, threads: int) -> _Loaded:
        """One of the bundle's models read, checked against its sha256 and the manifest's
        shapes, in an interpreter with its tensors allocated.

        Raises:
            BundleError: the file changed since the bundle was verified.
            ValueError: the interpreter refuses it, or its shapes contradict the manifest.
        """
        bundle = self.bundle
        path = bundle.path_of(model)
        content = path.read_bytes()
        if hashlib.sha256(content).hexdigest() != model.sha256:
            raise BundleError(f"{path} changed since its sha256 was checked")
        try:
            interpreter = Interpreter(model_content=content, num_threads=threads)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            # The interpreter's own words ("Constant buffer 58 ...") do not say which file.
            raise ValueError(
                f"{path} is not a model the TFLite interpreter can run: {err}"
            ) from err
        shape = tuple(int(d) for d in interpreter.get_input_details()[0]["shape"])
        expected = (1, bundle.preprocessing.input_size, bundle.preprocessing.input_size, 3)
        if shape != expected:
            raise ValueError(
                f"{path.name}: model input shape {shape} does not match "
                f"the manifest's preprocessing {expected}"
            )
        classes = int(interpreter.get_output_details()[0]["shape"][-1])
        if classes != len(bundle.labels):
            raise ValueError(
                f"{path.name}: model has {classes} outputs but the manifest lists "
                f"{len(bundle.labels)} labels"
            )
        return _Loaded(model, content, interpreter)

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
        """Scores summing to 1: the softmax of the logits divided by the bundle's calibrated
        temperature (1 when its manifest has no ``calibration``)."""
        return softmax(self.logits(pixels), self.bundle.temperature)

    def rank(self, probabilities: np.ndarray, top_k: int = 0) -> list[Prediction]:
        """Labels ranked best first; ``top_k`` 0 keeps all."""
        order = np.argsort(-probabilities, kind="stable")
        if top_k:
            order = order[:top_k]
        return [Prediction(self.bundle.labels[i], float(probabilities[i])) for i in order]


def _return_freed_memory() -> None:
    """Hand the memory of the models not chosen back to the system: glibc's heaps keep the
    packed weights of a dropped interpreter otherwise (11 MB of a float32 EfficientNet-Lite0
    at 320 px stayed resident). Nothing to do elsewhere (musl, macOS)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def timings_text(timings: tuple[ModelTiming, ...]) -> str:
    """``"model.tflite int8 25.3 ms, model_float32.tflite float32 24.1 ms"`` (CPU time)."""
    return ", ".join(
        f"{t.file} {t.quantization} " + (f"{t.cpu_ms:.1f} ms" if not t.error else "cannot run")
        for t in timings
    )


def _choose(loaded: list[_Loaded]) -> tuple[_Loaded, tuple[ModelTiming, ...]]:
    """The fastest of ``loaded`` (the bundle's main model first) and each one's timing.

    The models take turns, one invoke each per round, each timed in CPU time of this process
    (the service serves nothing yet as it starts; on a reload, calls served meanwhile count
    alike for every model, as they take turns). An alternative serves only when its median
    beats the main model's by ``CHOICE_MARGIN``. A model that fails to invoke is left out.
    """
    times: list[list[float]] = [[] for _ in loaded]
    failed: dict[int, str] = {}
    for item in loaded:
        details = item.interpreter.get_input_details()[0]
        item.interpreter.set_tensor(details["index"], np.zeros(details["shape"], details["dtype"]))
    for round_ in range(CHOICE_INVOKES + 1):  # the first round warms up
        for i, item in enumerate(loaded):
            if i in failed:
                continue
            started = time.process_time()
            try:
                item.interpreter.invoke()
            except (ValueError, RuntimeError) as err:
                if i == 0:
                    raise ValueError(f"{item.model.file} fails to run: {err}") from err
                logger.warning("alternative model %s skipped: %s", item.model.file, err)
                failed[i] = str(err)
                continue
            if round_:
                times[i].append(time.process_time() - started)
    timings = tuple(
        ModelTiming(
            item.model.file,
            item.model.quantization,
            math.nan if i in failed else float(np.median(times[i])) * 1000,
            failed.get(i, ""),
        )
        for i, item in enumerate(loaded)
    )
    best = 0
    for i, timing in enumerate(timings):
        if not timing.error and timing.cpu_ms < timings[best].cpu_ms * (1 - CHOICE_MARGIN):
            best = i
    return loaded[best], timings
