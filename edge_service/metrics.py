"""Prometheus metrics of one service instance, in a registry of its own.

Names follow Prometheus conventions: a ``smartbin_`` prefix, base units, ``_total`` on counters,
``_info`` for metadata, and only low-cardinality labels.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)

# Latency buckets from 1 ms to 10 s: a Pi 4 runs an int8 MobileNet in ~20 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServiceMetrics:
    """All metrics the service exports."""

    def __init__(self, camera: bool = True) -> None:
        """``camera``: whether this service has a camera; without one ``smartbin_camera_up`` is
        not exported, so a fleet's "cameras down" count does not include camera-less services."""
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
            "(max_concurrent_rpcs, message_too_large, request_timeout, ended_before_request, "
            "no_request, bad_request, request_memory, worker_wait, decode_budget_busy, "
            "decode_budget_exceeded)",
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
