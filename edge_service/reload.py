"""Swapping the served model without a restart: checked load, atomic swap, optional folder watch.

A new bundle must pass ``load_bundle`` (manifest, sha256 of the model file) and, where the config
asks, carry a trusted signature (edge_service/bundle_trust.py), build an interpreter
whose shapes match the manifest, and answer a smoke inference with finite probabilities over its
labels; only then does it replace the served model. Calls already running keep the classifier
object they read, so they finish on the model they started on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edge_service.bundle_trust import BundleTrust
from edge_service.metrics import ServiceMetrics
from smartbin.bundle import BundleError, load_bundle
from smartbin.model import TFLiteClassifier, timings_text
from smartbin.preprocessing import resize_and_crop
from smartbin.signing import SignatureError

logger = logging.getLogger(__name__)


class ReloadError(Exception):
    """A bundle was refused; the message says why. The served model is unchanged."""


class UntrustedBundle(ReloadError):
    """A bundle was refused for its signature (bundle_signing in the config)."""


class OutsideReloadDirs(Exception):
    """A reload named a folder the service does not load bundles from."""


class NothingToRollBack(ReloadError):
    """RollbackModel on a bin that has served no other bundle since it started."""


@dataclass(frozen=True)
class ServedBundle:
    """A bundle the bin served: where it lies and what it held, so that a rollback can tell
    whether the folder still holds the same model."""

    path: Path
    version: str
    model_sha256: str

    @classmethod
    def of(cls, classifier: TFLiteClassifier) -> ServedBundle:
        bundle = classifier.bundle
        return cls(bundle.path, bundle.version, bundle.manifest.model.sha256)

    def to_json(self) -> dict[str, str]:
        return {"path": str(self.path), "version": self.version, "sha256": self.model_sha256}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> ServedBundle:
        return cls(Path(data["path"]), data["version"], data["sha256"])


# Called after every swap with (the bundle served before, the bundle served now).
SwapListener = Callable[[ServedBundle, ServedBundle], None]


def reload_target(requested: str, served: Path, reload_dirs: Sequence[Path] = ()) -> Path:
    """The bundle folder a reload names: ``served`` when empty; a relative name is taken from
    the folder holding ``served``.

    Only that folder and ``reload_dirs`` are open to callers, so a caller cannot make the
    service open arbitrary files or probe which exist. Links are resolved first.

    Raises:
        OutsideReloadDirs: the folder lies elsewhere; the message says which folders are open
            without naming the bin's own paths (it goes back to the caller).
    """
    if not requested:
        return served
    home = served.parent
    target = (home / requested).resolve()
    roots = [root.resolve() for root in (home, *reload_dirs)]
    if not any(target.is_relative_to(root) for root in roots):
        raise OutsideReloadDirs(
            f"{requested} is outside the folders this bin loads bundles from (the one holding "
            "the served bundle, and those in reload_dirs): copy the bundle next to the served "
            "one and name it by its folder name, or add its folder to reload_dirs in the "
            "service config"
        )
    return target


def smoke_test(classifier: TFLiteClassifier) -> None:
    """Run one mid-grey photo through the model and check the answer is a distribution.

    Raises:
        ReloadError: the model fails to run or answers with something other than probabilities.
    """
    spec = classifier.bundle.preprocessing
    grey = Image.new("RGB", (spec.resize_size, spec.resize_size), (128, 128, 128))
    try:
        probabilities = classifier.probabilities(resize_and_crop(grey, spec))
    except Exception as err:  # the interpreter raises RuntimeError/ValueError on bad models
        raise ReloadError(f"smoke inference failed: {err}") from err
    if probabilities.shape != (len(classifier.bundle.labels),):
        raise ReloadError(
            f"smoke inference gave {probabilities.shape} outputs for "
            f"{len(classifier.bundle.labels)} labels"
        )
    if not np.isfinite(probabilities).all():
        raise ReloadError("smoke inference gave NaN or infinite scores")


def load_checked(
    path: Path, num_threads: int | None, interpreters: int = 1, trust: BundleTrust | None = None
) -> TFLiteClassifier:
    """Load, verify (its signature too, under ``trust``) and smoke-test the bundle at ``path``.

    Raises:
        ReloadError: with the reason the bundle cannot be served; UntrustedBundle when it is
            its signature.
    """
    try:
        bundle = trust.load(path) if trust is not None else load_bundle(path)
    except SignatureError as err:
        raise UntrustedBundle(str(err)) from err
    except BundleError as err:
        raise ReloadError(str(err)) from err
    try:
        classifier = TFLiteClassifier(bundle, num_threads, interpreters)
    except BundleError as err:
        raise ReloadError(str(err)) from err
    except (ValueError, RuntimeError) as err:  # the interpreter refuses the model file
        raise ReloadError(f"{path}: model cannot be loaded: {err}") from err
    smoke_test(classifier)
    return classifier


class ModelSlot:
    """Holds the served classifier; ``reload`` replaces it only with a bundle that passes.

    Readers take ``slot.current`` once per call. Swapping is one reference assignment. The slot
    remembers the bundle served before the last swap (``previous``, a folder that stays on
    disk) so that ``rollback`` can swap back to it without a download.
    """

    def __init__(
        self,
        classifier: TFLiteClassifier,
        num_threads: int | None,
        metrics: ServiceMetrics,
        interpreters: int = 1,
        trust: BundleTrust | None = None,
    ) -> None:
        self.current = classifier
        self._num_threads = num_threads
        self._interpreters = interpreters
        self._trust = trust
        self._metrics = metrics
        self._lock = threading.Lock()  # one reload at a time
        self.previous: ServedBundle | None = None
        self.swap_listeners: list[SwapListener] = []
        self._publish(classifier)

    def reload(self, path: Path) -> TFLiteClassifier:
        """Load the bundle at ``path`` and serve it.

        Raises:
            ReloadError: the bundle was refused and the old model keeps serving.
        """
        with self._lock:
            try:
                classifier = load_checked(path, self._num_threads, self._interpreters, self._trust)
            except ReloadError as err:
                # "untrusted": refused for its signature, which may be someone's attempt.
                outcome = "untrusted" if isinstance(err, UntrustedBundle) else "failed"
                self._metrics.reloads.labels(outcome).inc()
                logger.error("model reload from %s refused: %s", path, err)
                raise
            old = self._swap(classifier)
        self._after_swap(old, classifier)
        return classifier

    def rollback(self, reason: str = "manual") -> TFLiteClassifier:
        """Serve the bundle served before the last swap again; the one served now becomes the
        previous one, so a second rollback swaps forward.

        Args:
            reason: why, for ``smartbin_rollout_rollbacks_total`` ("manual" or "regression").

        Raises:
            NothingToRollBack: no other bundle was served since the service started.
            ReloadError: the previous bundle is gone, changed or fails its checks; the model
                keeps serving.
        """
        with self._lock:
            previous = self.previous
            if previous is None:
                raise NothingToRollBack(
                    "this bin has served no other bundle since it started: there is nothing "
                    "to roll back to (ReloadModel serves a bundle by its folder)"
                )
            classifier = self._load_previous(previous)
            old = self._swap(classifier)
            self._metrics.rollbacks.labels(reason).inc()
        self._after_swap(old, classifier)
        return classifier

    @property
    def previous_version(self) -> str:
        return self.previous.version if self.previous is not None else ""

    def _load_previous(self, previous: ServedBundle) -> TFLiteClassifier:
        """The previous bundle, loaded and checked, and still the model it was."""
        try:
            classifier = load_checked(
                previous.path, self._num_threads, self._interpreters, self._trust
            )
        except ReloadError as err:
            self._metrics.reloads.labels("failed").inc()
            raise ReloadError(
                f"the previous bundle ({previous.version}) at {previous.path} cannot be served: "
                f"{err}"
            ) from err
        found = ServedBundle.of(classifier)
        if (found.version, found.model_sha256) != (previous.version, previous.model_sha256):
            self._metrics.reloads.labels("failed").inc()
            raise ReloadError(
                f"the previous bundle's folder {previous.path} now holds {found.version} "
                f"(model sha256 {found.model_sha256[:12]}), not {previous.version} "
                f"({previous.model_sha256[:12]}): it changed after the swap; serve a bundle by "
                "its folder with ReloadModel instead"
            )
        return classifier

    def _swap(self, classifier: TFLiteClassifier) -> TFLiteClassifier:
        """Serve ``classifier`` (under the lock); returns the one it replaced."""
        old, self.current = self.current, classifier
        self.previous = ServedBundle.of(old)
        self._metrics.reloads.labels("success").inc()
        self._publish(classifier)
        return old

    def _after_swap(self, old: TFLiteClassifier, new: TFLiteClassifier) -> None:
        logger.info(
            "model %s (%d labels) replaced %s",
            new.bundle.version,
            len(new.bundle.labels),
            old.bundle.version,
        )
        for listener in self.swap_listeners:
            listener(ServedBundle.of(old), ServedBundle.of(new))

    def _publish(self, classifier: TFLiteClassifier) -> None:
        bundle = classifier.bundle
        self._metrics.start_model_labels(bundle.labels)
        self._metrics.model_info.info(
            {
                "version": bundle.version,
                "sha256": classifier.model.sha256[:12],
                "architecture": bundle.architecture,
                "quantization": classifier.model.quantization,
                "labels": str(len(bundle.labels)),
                # A bundle with alternatives: each model's invoke as timed when it was loaded.
                **({"timed": timings_text(classifier.timings)} if classifier.timings else {}),
            }
        )
        self._metrics.model_loaded_timestamp.set_to_current_time()


def folder_fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times of a folder's files; () when it is missing."""
    try:
        entries = [(p.name, p.stat()) for p in folder.iterdir() if p.is_file()]
    except OSError:
        return ()
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in entries))


class BundleWatcher:
    """Polls a bundle folder and reloads once its files have changed and then held still.

    Waiting one quiet poll lets a copy finish before the load; a bundle refused mid-copy is tried
    again when its files change again.
    """

    def __init__(self, folder: Path, interval: float, reload: Callable[[Path], object]) -> None:
        self.folder = folder
        self.interval = interval
        self._reload = reload
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bundle-watch", daemon=True)
        self._served: tuple[tuple[str, int, int], ...] = ()

    def start(self) -> None:
        # What is served now, read before returning: a change made once start() has returned
        # is a change, however late the thread first runs.
        self._served = folder_fingerprint(self.folder)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        tried = self._served
        previous = tried
        while not self._stop.wait(self.interval):
            current = folder_fingerprint(self.folder)
            settled = current == previous
            previous = current
            if not settled or current == tried or not current:
                continue
            tried = current
            logger.info("bundle folder %s changed: reloading", self.folder)
            # A refusal is logged and counted by the slot; the old model keeps serving.
            with contextlib.suppress(ReloadError):
                self._reload(self.folder)
