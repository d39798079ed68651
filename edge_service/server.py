"""The gRPC Classifier service: Classify, GetModelInfo, Capture, WatchEvents, ReloadModel,
RollbackModel, health, reflection and /metrics."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from pydantic import ValidationError

from edge_service import oip
from edge_service.admin import (
    ADMIN_METHODS,
    AdminGate,
    admin_address,
    admin_port,
    start_admin_listener,
)
from edge_service.bundle_trust import BundleTrust
from edge_service.capture import CameraUnavailable
from edge_service.classify import Refused, Timings, TopKError, UploadClassifier, check_top_k
from edge_service.config import ServiceConfig, load_config
from edge_service.const import API_VERSION, service_version
from edge_service.events import Event, TooManyWatchers
from edge_service.export import serve_export
from edge_service.guard import HEALTH_PLACES, BoundedHealth, CallGuard, CallLimits, counted
from edge_service.logs import rate_limit_repeats
from edge_service.memory import DecodeBudget, tune_malloc
from edge_service.metrics import ServiceMetrics
from edge_service.oip import OpenInferenceModel
from edge_service.reload import OutsideReloadDirs, ReloadError, reload_target
from edge_service.rollout import load_startup_bundle
from edge_service.runtime import BinRuntime
from edge_service.tls import server_credentials
from edge_service.web.app import WebServer, create_app
from smartbin.bundle import BUNDLE_FORMAT_VERSION, BundleError
from smartbin.model import Prediction, TFLiteClassifier
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
# How often an idle WatchEvents stream checks that its caller is still there.
WATCH_POLL_SECONDS = 1.0


def predictions_pb(predictions: tuple[Prediction, ...]) -> list[classifier_pb2.Prediction]:
    return [classifier_pb2.Prediction(label=p.label, score=p.score) for p in predictions]


def timings_pb(timings: Timings) -> classifier_pb2.StageTimings:
    return classifier_pb2.StageTimings(
        capture_seconds=timings.capture,
        decode_seconds=timings.decode,
        preprocess_seconds=timings.preprocess,
        inference_seconds=timings.inference,
        total_seconds=timings.total,
    )


def event_pb(event: Event, top_k: int = 0, missed: int = 0) -> classifier_pb2.ClassificationEvent:
    answer = event.answer
    return classifier_pb2.ClassificationEvent(
        event_id=event.event_id,
        timestamp=event.timestamp,
        trigger=event.trigger,
        predictions=predictions_pb(answer.top(top_k)),
        model_version=answer.model_version,
        unsure=answer.unsure,
        timings=timings_pb(answer.timings),
        missed_events=missed,
    )


class ClassifierServicer(classifier_pb2_grpc.ClassifierServicer):
    """Answers the smartbin.v1.Classifier RPCs from the served bundle and the bin's camera."""

    def __init__(self, runtime: BinRuntime, config: ServiceConfig, metrics: ServiceMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.runtime = runtime
        self.decode_budget = DecodeBudget(config.decode_budget_bytes, config.decode_wait_seconds)
        # The one classification path of every route that takes an uploaded photo.
        self.uploads = UploadClassifier(
            runtime, config.max_pixels, self.decode_budget, metrics, config.max_workers
        )
        # The Open Inference Protocol's model, on this port (oip.py) and the web port's /v2.
        self.inference = OpenInferenceModel(self.uploads)
        metrics.decode_budget_bytes.set(config.decode_budget_bytes)
        metrics.decode_reserved_bytes.set_function(lambda: self.decode_budget.used)

    @property
    def classifier(self) -> TFLiteClassifier:
        """The served model; a handler reads it once so a reload cannot change it mid-call."""
        return self.runtime.models.current

    @counted("Classify")
    def Classify(
        self, request: classifier_pb2.ClassifyRequest, context: grpc.ServicerContext
    ) -> classifier_pb2.ClassifyResponse:
        try:
            answer = self.uploads.classify(
                request.image,  # each read of the field is a copy of the photo: read once
                request.top_k,
                "Classify",
                context.time_remaining,
                context.is_active,
            )
        except Refused as err:
            context.abort(err.code, err.message)
        return classifier_pb2.ClassifyResponse(
            predictions=predictions_pb(answer.top(request.top_k)),
            model_version=answer.model_version,
            timings=timings_pb(answer.timings),
            unsure=answer.unsure,
        )

    @staticmethod
    def _check_top_k(
        classifier: TFLiteClassifier, top_k: int, context: grpc.ServicerContext
    ) -> None:
        try:
            check_top_k(classifier, top_k)
        except TopKError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    @counted("GetModelInfo")
    def GetModelInfo(
        self, request: classifier_pb2.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> classifier_pb2.ModelInfo:
        return model_info_pb(self.classifier, self.runtime.models.previous_version)

    @counted("Capture")
    def Capture(
        self, request: classifier_pb2.CaptureRequest, context: grpc.ServicerContext
    ) -> classifier_pb2.ClassificationEvent:
        capture = self.runtime.capture
        if capture is None:
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "this bin has no camera configured: add a camera: section to its config",
            )
        self._check_top_k(self.classifier, request.top_k, context)
        timeout = capture.camera_config.capture_timeout_seconds
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)
        try:
            event = capture.capture_now(timeout)
        except CameraUnavailable as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        return event_pb(event, top_k=request.top_k)

    def WatchEvents(
        self, request: classifier_pb2.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[classifier_pb2.ClassificationEvent]:
        code = grpc.StatusCode.OK
        try:
            with self.runtime.hub.subscribe() as watcher:
                context.add_callback(watcher.close)  # wake up as soon as the caller leaves
                while context.is_active():
                    item = watcher.get(WATCH_POLL_SECONDS)
                    if item is not None:
                        yield event_pb(item[0], missed=item[1])
                    elif watcher.closed:
                        return
        except TooManyWatchers as err:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            context.abort(code, str(err))
        finally:
            if code == grpc.StatusCode.OK and not context.is_active():
                code = grpc.StatusCode.CANCELLED  # the caller left
            self.metrics.requests.labels("WatchEvents", code.name).inc()

    @counted("ReloadModel")
    def ReloadModel(
        self, request: classifier_pb2.ReloadModelRequest, context: grpc.ServicerContext
    ) -> classifier_pb2.ModelInfo:
        try:
            path = reload_target(request.bundle_path, self.config.bundle, self.config.reload_dirs)
        except OutsideReloadDirs as err:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        serving = self.classifier.bundle.version
        try:
            classifier = self.runtime.models.reload(path)
        except ReloadError as err:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"bundle {path} refused, model {serving} keeps serving: {err}",
            )
        return model_info_pb(classifier, self.runtime.models.previous_version)

    @counted("RollbackModel")
    def RollbackModel(
        self, request: classifier_pb2.RollbackModelRequest, context: grpc.ServicerContext
    ) -> classifier_pb2.ModelInfo:
        serving = self.classifier.bundle.version
        try:
            classifier = self.runtime.models.rollback()
        except ReloadError as err:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no rollback, model {serving} keeps serving: {err}",
            )
        return model_info_pb(classifier, self.runtime.models.previous_version)

    def ExportLabelled(
        self, request: classifier_pb2.ExportLabelledRequest, context: grpc.ServicerContext
    ) -> Iterator[classifier_pb2.LabelledPhoto]:
        # The photos filed on the review page (edge_service/export.py); an admin call.
        return serve_export(self.runtime.labelled, self.metrics, request, context)


def model_info_pb(
    classifier: TFLiteClassifier, previous_version: str = ""
) -> classifier_pb2.ModelInfo:
    bundle = classifier.bundle
    size = bundle.preprocessing.input_size
    return classifier_pb2.ModelInfo(
        labels=list(bundle.labels),
        input_height=size,
        input_width=size,
        # The model serving: the bundle's fastest on this CPU when it carries alternatives.
        quantization=classifier.model.quantization,
        model_version=bundle.version,
        model_sha256=classifier.model.sha256,
        metrics=bundle.flat_metrics(),
        manifest_json=bundle.manifest.model_dump_json(),
        service_version=service_version(),
        bundle_format_version=BUNDLE_FORMAT_VERSION,
        api_version=API_VERSION,
        previous_model_version=previous_version,
    )


@dataclass
class RunningService:
    """A started service; ``stop()`` shuts it down in order."""

    server: grpc.Server
    port: int
    metrics_port: int
    health: BoundedHealth
    servicer: ClassifierServicer
    metrics: ServiceMetrics
    _http: WSGIServer
    runtime: BinRuntime
    # The loopback admin listener (edge_service/admin.py) and its port; None when it is off.
    admin_server: grpc.Server | None = None
    admin_port: int | None = None
    # The web port (edge_service/web/) and its port; None when web.enabled is off.
    web: WebServer | None = None
    web_port: int | None = None

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, end event streams and health watches, let calls in flight finish,
        then stop the camera, triggers and bundle watcher and close the ports."""
        self.health.enter_graceful_shutdown()
        self.servicer.inference.serving.clear()
        self.health.end_watches()
        self.runtime.end_streams()
        admin_stopped = self.admin_server.stop(grace) if self.admin_server else None
        # The web port drains its calls in the same grace, beside the gRPC port.
        web_stopping = None
        if self.web is not None:
            web_stopping = threading.Thread(target=self.web.stop, args=(grace,), name="web-stop")
            web_stopping.start()
        self.server.stop(grace).wait()
        if admin_stopped is not None:
            admin_stopped.wait()
        if web_stopping is not None:
            web_stopping.join()
        self.runtime.stop()
        self._http.shutdown()
        self._http.server_close()


def create_server(config: ServiceConfig) -> RunningService:
    """Load the bundle, bind the gRPC and metrics ports and start serving.

    Raises:
        BundleError: the configured bundle cannot be served (SignatureError: its signature is
            not one bundle_signing accepts, or a trusted key file is unusable).
        ValueError: the TLS files are unreadable or not a certificate and its key.
        OSError: a port is already taken.
    """
    trust = BundleTrust.from_config(config.bundle_signing)
    # A fleet bin starts on the bundle its last rollout swapped in (edge_service/rollout.py).
    bundle = load_startup_bundle(config, trust)
    classifier = TFLiteClassifier(bundle, config.num_threads, config.interpreters)
    credentials = server_credentials(config.tls) if config.tls else None
    metrics = ServiceMetrics(
        camera=config.camera is not None, unsure_store=config.unsure_images is not None
    )
    metrics.build_info.info(
        {
            "version": service_version(),
            "api_version": API_VERSION,
            "bundle_format": str(BUNDLE_FORMAT_VERSION),
        }
    )
    health_servicer = BoundedHealth(config.max_health_watchers)
    runtime = BinRuntime(
        config, classifier, metrics, functools.partial(set_health, health_servicer), trust
    )
    # What is started is undone, last first, if a later step fails.
    with contextlib.ExitStack() as undo:
        undo.callback(runtime.stop)
        http_server = start_metrics_http(config, metrics)
        undo.callback(http_server.server_close)
        undo.callback(http_server.shutdown)
        servicer = ClassifierServicer(runtime, config, metrics)
        admin = start_admin_listener(config, metrics, servicer)
        admin_server, bound_admin_port = admin if admin else (None, None)
        if admin_server is not None:
            undo.callback(admin_server.stop, None)
        # Refusals on the public port name the admin listener, with the port it got.
        gate = AdminGate(
            config, metrics, admin_address(config, bound_admin_port) if admin else None
        )
        server = grpc_server(config, metrics, servicer, health_servicer, gate)
        port = bind_grpc(server, config, credentials)
        web = bind_web(config, servicer, metrics)
        if web is not None:
            undo.callback(web.stop, 0.0)
            web.start()
        undo.pop_all()
    metrics_port = http_server.server_address[1]
    server.start()
    if admin_server is not None:
        admin_server.start()
        # Before the "serving" line: whoever waits for that line finds this one too.
        logger.info(
            "admin calls (%s) on %s, plaintext, for this machine only",
            ", ".join(sorted(name.rsplit("/", 1)[1] for name in ADMIN_METHODS)),
            admin_address(config, bound_admin_port),
        )
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    servicer.inference.serving.set()
    if web is not None:
        logger.info(
            "web port (HTTP/JSON API, /v2 Open Inference Protocol) on %s://%s:%d",
            web.scheme,
            config.web.host,
            web.port,
        )
    runtime.start()
    logger.info(
        "serving model %s (%s) on gRPC port %d (%s), metrics on port %d",
        bundle.version,
        bundle.architecture,
        port,
        tls_mode(config),
        metrics_port,
    )
    return RunningService(
        server,
        port,
        metrics_port,
        health_servicer,
        servicer,
        metrics,
        http_server,
        runtime,
        admin_server=admin_server,
        admin_port=bound_admin_port,
        web=web,
        web_port=web.port if web is not None else None,
    )


def bind_web(
    config: ServiceConfig, servicer: ClassifierServicer, metrics: ServiceMetrics
) -> WebServer | None:
    """The web port (edge_service/web/), bound but not started; None when web.enabled is off.

    Raises:
        OSError: the port cannot be bound.
        ValueError: the web.tls files are unusable.
    """
    if not config.web.enabled:
        return None
    app = create_app(config, servicer.runtime, servicer.uploads, servicer.inference, metrics)
    return WebServer(app, config)


def start_metrics_http(config: ServiceConfig, metrics: ServiceMetrics) -> WSGIServer:
    """The /metrics endpoint Prometheus scrapes, on its own port."""
    try:
        http_server, _ = start_http_server(
            config.metrics_port, config.metrics_host, registry=metrics.registry
        )
    except OSError as err:
        raise OSError(
            f"cannot bind metrics port {config.metrics_host}:{config.metrics_port}: "
            f"{err.strerror or err}"
        ) from err
    return http_server


def grpc_server(
    config: ServiceConfig,
    metrics: ServiceMetrics,
    servicer: ClassifierServicer,
    health_servicer: BoundedHealth,
    admin_gate: AdminGate | None = None,
) -> grpc.Server:
    """The gRPC server with the classifier, health and reflection services, not yet bound.

    ``admin_gate`` (default: one for ``config``) refuses admin calls (ReloadModel) to all but
    allowed mutual-TLS clients."""
    gate = admin_gate or AdminGate(config, metrics, None)
    server = grpc.server(
        # A thread for every call CallGuard admits, so that none waits for one (a call that
        # holds its thread waiting for its request message holds no other caller up); the
        # computing is bounded by max_workers, and CallGuard refuses beyond max_concurrent_rpcs.
        futures.ThreadPoolExecutor(max_workers=config.max_concurrent_rpcs + HEALTH_PLACES),
        interceptors=[
            CallGuard(
                metrics, call_limits(config, servicer.decode_budget, servicer.uploads.workers)
            ),
            gate,
        ],
        options=[
            # Twice the limit: CallGuard refuses and counts the messages just over it.
            ("grpc.max_receive_message_length", 2 * config.max_message_bytes),
            ("grpc.max_concurrent_streams", config.max_calls_per_connection),
            ("grpc.so_reuseport", 0),
        ],
    )
    classifier_pb2_grpc.add_ClassifierServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    oip.add_to_server(servicer.inference, metrics, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            oip.SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server


def call_limits(
    config: ServiceConfig,
    memory: DecodeBudget | None = None,
    workers: threading.BoundedSemaphore | None = None,
) -> CallLimits:
    """What the public port's CallGuard enforces: the Classifier's unary calls and ModelInfer
    need a worker (one of ``workers``, shared with the web port), and request messages count in
    ``memory``, the photo memory. The Open Inference Protocol's calls are counted beside the
    Classifier's."""
    service = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"]
    return CallLimits(
        max_calls=config.max_concurrent_rpcs,
        max_message_bytes=config.max_message_bytes,
        max_working=config.max_workers,
        request_timeout=config.request_timeout_seconds,
        working_methods=frozenset(
            f"/{SERVICE_NAME}/{method.name}"
            for method in service.methods
            if not method.server_streaming
        )
        | {f"/{oip.SERVICE_NAME}/ModelInfer"},
        counted_service=SERVICE_NAME,
        also_counted=frozenset({oip.SERVICE_NAME}),
        workers=workers,
        memory=memory,
    )


def bind_grpc(
    server: grpc.Server, config: ServiceConfig, credentials: grpc.ServerCredentials | None
) -> int:
    """Bind the configured address, with TLS when credentials are given; returns the port."""
    address = f"{config.host}:{config.port}"
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as err:
        raise OSError(f"cannot bind gRPC port {config.host}:{config.port}: {err}") from err


def set_health(servicer: health.HealthServicer, name: str, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse
    servicer.set(name, status.SERVING if serving else status.NOT_SERVING)


def tls_mode(config: ServiceConfig) -> str:
    if config.tls is None:
        return "plaintext"
    return "mutual TLS" if config.tls.client_ca else "TLS"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve a smartbin model bundle over gRPC.")
    parser.add_argument("--config", type=Path, help="YAML file of settings (see ServiceConfig)")
    parser.add_argument("--bundle", type=Path, help="model bundle folder")
    parser.add_argument("--host", help="gRPC bind address")
    parser.add_argument("--port", type=int, help="gRPC port")
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port")
    parser.add_argument("--num-threads", type=int, help="interpreter threads")
    parser.add_argument(
        "--validate-config",
        action="store_true",
        help="check the configuration and bundle, then exit 0 or 1",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


# glibc's mallopt parameter number for the most malloc arenas (malloc.h).
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas for the threads that decode images.

    By default every gRPC worker thread can get its own arena (up to eight per core), and each
    keeps the image buffers it freed: 12 MB more resident after a burst of concurrent calls.
    Two arenas keep that under 9 MB at no throughput cost we could measure (docs/benchmarks.md).
    Elsewhere (musl, macOS) there is no mallopt and nothing to do.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas)


def exit_by(deadline: float) -> None:
    """End the process at ``deadline`` (time.monotonic) if it has not ended by then.

    After the grace, gRPC cancels the calls still running, but their threads go on until their
    work is done (a 40-megapixel PNG decodes for seconds) and the interpreter waits for them
    before it exits: without this the service outlived its grace by 4-6 s.
    """

    def watch() -> None:
        time.sleep(max(0.0, deadline - time.monotonic()))
        logger.warning("calls still running after the grace: exiting without them")
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(0)

    threading.Thread(target=watch, name="exit-by", daemon=True).start()


# How long after the grace the process may take to end; then it is ended.
STOP_MARGIN_SECONDS = 0.5


def main(argv: list[str] | None = None) -> None:
    limit_malloc_arenas()  # before any worker thread allocates
    tune_malloc()
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    rate_limit_repeats()  # a repeated error is logged once a minute, with a count
    # Handlers go in first so a SIGTERM during start-up still ends in an orderly stop.
    stop_requested = threading.Event()
    received: list[tuple[int, float]] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append((signum, time.monotonic()))
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        config = load_config(
            args.config,
            bundle=args.bundle,
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            num_threads=args.num_threads,
        )
        if args.validate_config:
            BundleTrust.from_config(config.bundle_signing).load(config.bundle)
            admin_port(config)
            if config.tls:
                server_credentials(config.tls)
            print("configuration and bundle are valid")
            return
        service = create_server(config)
    except (ValidationError, ValueError, BundleError) as err:
        sys.exit(f"smartbin-serve: {err}")
    except OSError as err:
        logger.error("%s", err)
        sys.exit(f"smartbin-serve: port in use or not available: {err}")
    # A timed wait: the main thread runs signal handlers only when it runs Python code, and
    # a wait with no timeout was seen to miss a SIGTERM for good while calls were running.
    while not stop_requested.wait(timeout=0.5):
        pass
    # Health turns NOT_SERVING first, then calls in flight get the grace period to finish.
    signum, signalled = received[0]
    exit_by(signalled + config.grace_seconds + STOP_MARGIN_SECONDS)
    logger.info(
        "signal %d: draining calls in flight for up to %.1f s", signum, config.grace_seconds
    )
    service.stop(config.grace_seconds)
    logger.info("stopped")


if __name__ == "__main__":
    main()
