"""Prometheus metrics of one service instance, in a registry of its own.

Names follow Prometheus conventions: a ``smartbin_`` prefix, base units, ``_total`` on counters,
``_info`` for metadata, and only low-cardinality labels.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client import Enum as StateEnum

from smartbin.v1 import classifier_pb2

# Latency buckets from 1 ms to 10 s: a Pi 4 runs an int8 MobileNet in ~20 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# Every labelled child below is created at 0 when the service starts (and each model label when
# a model is loaded), so a fresh bin shows zeros rather than "No data" and increase() sees the
# first event of each kind instead of a series that appears already at 1.
RPC_METHODS = tuple(
    method.name for method in classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].methods
)
# The status codes the service's handlers and its overload guard answer with.
SERVED_CODES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "UNAVAILABLE",
)
REFUSAL_REASONS = (
    "max_concurrent_rpcs",
    "message_too_large",
    "request_timeout",
    "ended_before_request",
    "no_request",
    "bad_request",
    "request_memory",
    "worker_wait",
    "decode_budget_busy",
    "decode_budget_exceeded",
)
STAGES = ("capture", "decode", "preprocess", "inference")
TRIGGER_SOURCES = ("gpio", "motion", "rpc")
TRIGGER_OUTCOMES = ("accepted", "debounced", "camera_down", "dropped")
RELOAD_OUTCOMES = ("success", "failed", "untrusted")
# Fleet rollouts (edge_service/rollout.py): why a bin swapped back, what a poll of the bundle
# store found, what became of a downloaded bundle, and where the bin stands ("idle": no rollout).
ROLLBACK_REASONS = ("manual", "regression", "fleet")
ROLLOUT_POLL_OUTCOMES = ("ok", "unreachable", "invalid")
ROLLOUT_DOWNLOAD_OUTCOMES = ("verified", "corrupt", "failed")
ROLLOUT_STATES = (
    "idle",
    "waiting",
    "held",
    "halted",
    "watching",
    "serving",
    "rolled_back",
    "refused",
)
# Why an unsure photo was not kept (smartbin_unsure_photo_write_failures_total{reason}).
UNSURE_WRITE_FAILURE_REASONS = ("too_large", "disk_full", "not_writable", "io_error")


class ServiceMetrics:
    """All metrics the service exports."""

    def __init__(self, camera: bool = True, unsure_store: bool = True) -> None:
        """``camera``: whether this service has a camera; without one ``smartbin_camera_up`` is
        not exported, so a fleet's "cameras down" count does not include camera-less services.
        ``unsure_store``: whether it keeps unsure photos (``unsure_images``); without a store
        its ``smartbin_unsure_photo*`` metrics are not exported."""
        # A `_created` timestamp beside every counter and histogram would be a third of each
        # bin's series in Prometheus, and no dashboard or alert reads it (a process-wide switch).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, process_start_time_seconds,
        # process_open_fds...: the default registry has them, a registry of our own must ask.
        ProcessCollector(registry=r)
        self.requests = Counter(
            "smartbin_requests",
            "gRPC calls by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "smartbin_request_seconds",
            "gRPC call latency in the server",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "smartbin_stage_seconds",
            "time per classification stage (capture, decode, preprocess, inference)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "smartbin_inference_seconds",
            "model invoke latency",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.classifications = Counter(
            "smartbin_classifications", "answers by best label", ["label"], registry=r
        )
        self.unsure = Counter(
            "smartbin_unsure", "answers below the confidence threshold", registry=r
        )
        self.confidence = Histogram(
            "smartbin_confidence",
            "best score of each answer",
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.model_info = Info("smartbin_model", "the model bundle being served", registry=r)
        self.model_loaded_timestamp = Gauge(
            "smartbin_model_loaded_timestamp_seconds",
            "when the served model was loaded",
            registry=r,
        )
        self.camera_up = Gauge(
            "smartbin_camera_up",
            "1 while the camera delivers frames",
            registry=r if camera else None,
        )
        self.camera_errors = Counter(
            "smartbin_camera_errors", "failed camera opens or reads", registry=r
        )
        self.triggers = Counter(
            "smartbin_triggers",
            "capture triggers by source (gpio, motion, rpc) and outcome "
            "(accepted, debounced, camera_down, dropped)",
            ["source", "outcome"],
            registry=r,
        )
        self.events_dropped = Counter(
            "smartbin_events_dropped", "events a slow watcher lost", registry=r
        )
        self.watchers = Gauge("smartbin_watchers", "open WatchEvents streams", registry=r)
        self.reloads = Counter(
            "smartbin_model_reloads", "model reloads by outcome", ["outcome"], registry=r
        )
        self.in_flight = Gauge("smartbin_in_flight_requests", "gRPC calls being served", registry=r)
        # Overload and misbehaving callers (edge_service/guard.py, edge_service/memory.py).
        self.open_calls = Gauge(
            "smartbin_open_calls",
            "gRPC calls holding one of the max_concurrent_rpcs places, streams and calls "
            "still waiting for their request message included",
            registry=r,
        )
        self.refusals = Counter(
            "smartbin_refusals",
            "calls refused before or instead of being served, by method and reason "
            f"({', '.join(REFUSAL_REASONS)})",
            ["method", "reason"],
            registry=r,
        )
        self.decode_budget_bytes = Gauge(
            "smartbin_decode_budget_bytes",
            "memory all photo decodes may hold at once (decode_budget_bytes)",
            registry=r,
        )
        self.decode_reserved_bytes = Gauge(
            "smartbin_decode_reserved_bytes",
            "memory reserved by the photos being decoded or classified now",
            registry=r,
        )
        self.build_info = Info(
            "smartbin_build", "versions of the service, API and bundle format", registry=r
        )
        self.rollbacks = Counter(
            "smartbin_rollout_rollbacks",
            "swaps back to the previous bundle, by reason (manual: RollbackModel; regression: "
            "a canary whose unsure or error rate regressed; fleet: a rollout of that bundle)",
            ["reason"],
            registry=r,
        )
        self.rollout_polls = Counter(
            "smartbin_rollout_polls",
            "polls of the fleet's bundle store by outcome (ok, unreachable, invalid)",
            ["outcome"],
            registry=r,
        )
        self.rollout_downloads = Counter(
            "smartbin_rollout_downloads",
            "bundles downloaded from the store by outcome (verified, corrupt: a sha256 or size "
            "differs from the rollout's, failed: the download broke off)",
            ["outcome"],
            registry=r,
        )
        self.rollout_state = StateEnum(
            "smartbin_rollout_state",
            "where the bin stands in the fleet's current rollout",
            states=list(ROLLOUT_STATES),
            registry=r,
        )
        self._create_children_at_zero()
        # The unsure-photo store (edge_service/unsure_store.py): how full it is, and photos it
        # could not keep. Every reason starts at 0 so that increase() sees the first failure.
        store_registry = r if unsure_store else None
        self.unsure_photos = Gauge(
            "smartbin_unsure_photos", "unsure photos kept on disk", registry=store_registry
        )
        self.unsure_photo_bytes = Gauge(
            "smartbin_unsure_photo_bytes",
            "bytes the kept unsure photos take on disk",
            registry=store_registry,
        )
        self.unsure_photo_write_failures = Counter(
            "smartbin_unsure_photo_write_failures",
            "unsure photos that could not be kept, by reason (too_large, disk_full, "
            "not_writable, io_error)",
            ["reason"],
            registry=store_registry,
        )
        for reason in UNSURE_WRITE_FAILURE_REASONS:
            self.unsure_photo_write_failures.labels(reason)

    def _create_children_at_zero(self) -> None:
        """Every method, status code, refusal reason, stage, trigger and reload outcome at 0."""
        for method in RPC_METHODS:
            for code in SERVED_CODES:
                self.requests.labels(method, code)
            for reason in REFUSAL_REASONS:
                self.refusals.labels(method, reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for source in TRIGGER_SOURCES:
            for outcome in TRIGGER_OUTCOMES:
                self.triggers.labels(source, outcome)
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome)
        for reason in ROLLBACK_REASONS:
            self.rollbacks.labels(reason)
        for outcome in ROLLOUT_POLL_OUTCOMES:
            self.rollout_polls.labels(outcome)
        for outcome in ROLLOUT_DOWNLOAD_OUTCOMES:
            self.rollout_downloads.labels(outcome)

    def start_model_labels(self, labels: Sequence[str]) -> None:
        """Create ``smartbin_classifications_total{label}`` at 0 for each of a model's labels.

        Called whenever a model is loaded, so a label that a new model adds appears at 0 before
        its first answer; a label the old model had keeps its count (counters never go back).
        """
        for label in labels:
            self.classifications.labels(label)
