"""What the service runs beside its gRPC handlers: the served model, the shared classification
pipeline, the event hub, the camera capture loop and the bundle folder watcher.

Health: the camera reports under its own health name, ``smartbin.v1.Camera`` (SERVING while
frames arrive, NOT_SERVING while it is down; unknown when no camera is configured). The overall
("") and ``smartbin.v1.Classifier`` statuses stay SERVING while the camera is down, because
Classify of uploaded photos, GetModelInfo and ReloadModel still work; only Capture answers
UNAVAILABLE. A load balancer or the bin's firmware checks the name it depends on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from edge_service.bundle_trust import BundleTrust
from edge_service.capture import CaptureLoop
from edge_service.classify import Pipeline
from edge_service.config import ServiceConfig
from edge_service.events import EventHub
from edge_service.labelled_store import LabelledStore
from edge_service.metrics import ServiceMetrics
from edge_service.recent import RecentAnswers
from edge_service.reload import BundleWatcher, ModelSlot
from edge_service.rollout import FleetPoller
from edge_service.unsure_store import UnsureStore
from smartbin.model import TFLiteClassifier

logger = logging.getLogger(__name__)

CAMERA_HEALTH_NAME = "smartbin.v1.Camera"


class BinRuntime:
    """Builds and runs the non-RPC parts of the service from its config.

    Args:
        config: the service config.
        classifier: the model loaded at startup.
        metrics: the service's metrics.
        set_health: called with ``(health name, serving)`` when the camera goes up or down.
        trust: the bundle_signing policy every reload passes; None: no signature check.

    Raises:
        TriggerError: a configured GPIO trigger cannot be set up.
    """

    def __init__(
        self,
        config: ServiceConfig,
        classifier: TFLiteClassifier,
        metrics: ServiceMetrics,
        set_health: Callable[[str, bool], None],
        trust: BundleTrust | None = None,
    ) -> None:
        self.config = config
        # Reloads pass the same bundle_signing policy as the bundle served at start.
        self.models = ModelSlot(classifier, config.num_threads, metrics, config.interpreters, trust)
        store = UnsureStore(config.unsure_images, metrics) if config.unsure_images else None
        # The review page's pieces: the last answers (only when the page is on: each costs a
        # JPEG in memory) and the labelled photos (also streamed by ExportLabelled).
        self.recent: RecentAnswers | None = None
        if config.web.enabled and config.web.review:
            self.recent = RecentAnswers(
                config.web.review_recent, config.web.review_recent_max_bytes
            )
        self.labelled: LabelledStore | None = None
        if config.labelled_images is not None:
            self.labelled = LabelledStore(config.labelled_images, config.bin_id)
        self.pipeline = Pipeline(metrics, config.confidence_threshold, store, self.recent)
        self.hub = EventHub(config.event_queue_size, config.max_watchers, metrics)
        self.capture: CaptureLoop | None = None
        if config.camera is not None:
            set_health(CAMERA_HEALTH_NAME, False)
            self.capture = CaptureLoop(
                config,
                self.models,
                self.pipeline,
                self.hub,
                metrics,
                on_camera_state=lambda up, _reason: set_health(CAMERA_HEALTH_NAME, up),
            )
        self.watcher: BundleWatcher | None = None
        if config.watch_bundle_seconds:
            self.watcher = BundleWatcher(
                config.bundle, config.watch_bundle_seconds, self.models.reload
            )
        # Fleet rollouts from a bundle store (edge_service/rollout.py).
        self.fleet: FleetPoller | None = None
        if config.fleet is not None:
            self.fleet = FleetPoller(config.fleet, self.models, metrics)

    def start(self) -> None:
        if self.capture is not None:
            self.capture.start()
        if self.watcher is not None:
            self.watcher.start()
        if self.fleet is not None:
            self.fleet.start()

    def end_streams(self) -> None:
        """End open WatchEvents streams so that they do not hold up the shutdown grace."""
        self.hub.close()

    def stop(self) -> None:
        """Stop the watcher and the capture loop; release the camera and the GPIO pin."""
        if self.watcher is not None:
            self.watcher.stop()
        if self.fleet is not None:
            self.fleet.stop()
        if self.capture is not None:
            self.capture.stop()
