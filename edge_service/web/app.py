"""The web port: one FastAPI app, served by uvicorn in a thread of the service.

The app holds what its routes need on ``app.state``: ``config`` (the ServiceConfig),
``runtime`` (the BinRuntime: the served model, the pipeline), ``uploads`` (the one
classification path every route shares), ``inference`` (the Open Inference Protocol's model)
and ``metrics``. FastAPI describes every route in ``/openapi.json`` and shows it at ``/docs``.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import threading
import time

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from edge_service.classify import Refused, UploadClassifier
from edge_service.config import ServiceConfig
from edge_service.const import service_version
from edge_service.metrics import ServiceMetrics
from edge_service.oip import OpenInferenceModel
from edge_service.runtime import BinRuntime
from edge_service.web import api, v2
from edge_service.web.errors import (
    CallCounter,
    http_error_handler,
    refused_handler,
    validation_handler,
)
from smartbin.channel import read_pem

logger = logging.getLogger(__name__)

DESCRIPTION = """\
The bin's HTTP API beside its gRPC one: classify a photo, describe the model, ask whether the
bin is serving (`/api/v1/...`), and the Open Inference Protocol's HTTP routes (`/v2/...`). The
answers, limits and refusals are those of the gRPC calls; an error is
`{"error": "what to fix", "code": "INVALID_ARGUMENT"}` with the HTTP status of its gRPC code.
"""
# How long start() waits for uvicorn to be serving.
START_TIMEOUT_SECONDS = 10.0


def create_app(
    config: ServiceConfig,
    runtime: BinRuntime,
    uploads: UploadClassifier,
    inference: OpenInferenceModel,
    metrics: ServiceMetrics,
) -> FastAPI:
    """The web port's app: the JSON API, the /v2 routes and, with ``web.review``, the review
    page."""
    app = FastAPI(title="smartbin", version=service_version(), description=DESCRIPTION)
    app.state.config = config
    app.state.runtime = runtime
    app.state.uploads = uploads
    app.state.inference = inference
    app.state.metrics = metrics
    app.add_exception_handler(Refused, refused_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    routers = [api.router, v2.router]
    if config.web.review:
        from edge_service.web import review

        routers.append(review.router)
    for router in routers:
        app.include_router(router)
    # The routers' own routes: what CallCounter matches a call against to name it.
    routes = [route for router in routers for route in router.routes]
    app.add_middleware(
        CallCounter, metrics=metrics, routes=routes, max_calls=config.max_concurrent_rpcs
    )
    return app


class WebServer:
    """uvicorn serving ``app`` on the configured address, in a thread of its own.

    Raises (from the constructor):
        OSError: the port cannot be bound.
        ValueError: the TLS files are unreadable or not a certificate and its key.
    """

    def __init__(self, app: FastAPI, config: ServiceConfig) -> None:
        web = config.web
        self.socket = bind(web.host, web.port)
        self.port: int = self.socket.getsockname()[1]
        try:
            self.server = uvicorn.Server(uvicorn_config(app, config))
            load_now(self.server.config, config)
        except BaseException:
            self.socket.close()
            raise
        self.scheme = "https" if web.tls else "http"
        self._thread = threading.Thread(target=self._run, name="web", daemon=True)

    def _run(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self) -> None:
        """Serve; returns once uvicorn is accepting calls."""
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise OSError(f"the web port did not start within {START_TIMEOUT_SECONDS:g} s")
            time.sleep(0.01)
        if not self.server.started:
            raise OSError("the web port stopped as it started: see the log")

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, give those in flight up to ``grace`` seconds, then close."""
        if grace is not None:  # uvicorn takes whole seconds
            self.server.config.timeout_graceful_shutdown = math.ceil(grace)
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join((grace or 0.0) + 2.0)
        self.socket.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (IPv4 or IPv6)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot bind web port {host}:{port}: {err.strerror or err}") from err
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: FastAPI, config: ServiceConfig) -> uvicorn.Config:
    """uvicorn's settings: the service's logging, no lifespan, HTTPS when ``web.tls`` is set."""
    web = config.web
    tls: dict[str, object] = {}
    if web.tls is not None:
        # Read first: a missing file gets a message naming the setting, as for the gRPC port.
        read_pem(web.tls.cert, "web.tls.cert")
        read_pem(web.tls.key, "web.tls.key")
        tls = {"ssl_certfile": str(web.tls.cert), "ssl_keyfile": str(web.tls.key)}
        if web.tls.client_ca is not None:
            read_pem(web.tls.client_ca, "web.tls.client_ca")
            tls |= {"ssl_ca_certs": str(web.tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return uvicorn.Config(
        app,
        log_config=None,  # the service's logging as it is
        access_log=False,
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=math.ceil(config.grace_seconds),
        **tls,  # type: ignore[arg-type]
    )


def load_now(settings: uvicorn.Config, config: ServiceConfig) -> None:
    """Let uvicorn read its settings (the TLS files) now, so that a bad file stops the start
    with a message naming the setting, not a thread's traceback later."""
    try:
        settings.load()
    except ssl.SSLError as err:
        tls = config.web.tls
        raise ValueError(
            f"web.tls.cert {tls and tls.cert} and web.tls.key {tls and tls.key} are not a valid "
            f"PEM certificate chain and its matching private key: {err}"
        ) from err
