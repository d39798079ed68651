"""What the web port shares with the gRPC port: the status a refusal maps to, the request size
limit, and the counting of every call in the same metrics.

A refusal is the classification path's :class:`~edge_service.classify.Refused`, with its gRPC
status code; the web port answers the HTTP status :data:`HTTP_STATUS` maps that code to and the
body ``{"error": message, "code": "INVALID_ARGUMENT"}`` (the Open Inference Protocol's error
body, with the code beside it). :class:`CallCounter` counts each call of a route named
``HTTP ...`` in ``smartbin_requests_total{method="HTTP ...", code}`` with the gRPC code of its
answer, refusals made before the route runs included, and bounds the calls open at once by
``max_concurrent_rpcs`` as the gRPC port does.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence

import anyio
import grpc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_service.classify import Refused
from edge_service.config import ServiceConfig
from edge_service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

Code = grpc.StatusCode
# The HTTP status of each gRPC code (as Google's API design guide pairs them, with 409 for
# FAILED_PRECONDITION: the bin's state, not the request, is what stands in the way).
HTTP_STATUS = {
    Code.OK: 200,
    Code.INVALID_ARGUMENT: 400,
    Code.OUT_OF_RANGE: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.ABORTED: 409,
    Code.FAILED_PRECONDITION: 409,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INTERNAL: 500,
    Code.DATA_LOSS: 500,
    Code.UNIMPLEMENTED: 501,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}
# The code counted for an HTTP status (the first code of each status above, and the statuses
# the web port answers besides: 405 for a method a route lacks, 408 for a body that comes too
# slowly, 413 for a body over the limit, 422 for parameters that do not validate).
CODE_OF_STATUS = {status: code for code, status in reversed(HTTP_STATUS.items())} | {
    405: Code.UNIMPLEMENTED,
    408: Code.CANCELLED,
    413: Code.RESOURCE_EXHAUSTED,
    422: Code.INVALID_ARGUMENT,
}
# The routes counted in the metrics have names that start so ("HTTP Classify").
COUNTED_PREFIX = "HTTP "
# Paths under these prefixes that match no route are counted too, under one method name.
API_PREFIXES = ("/api/", "/v2")
UNKNOWN_ROUTE = "HTTP unknown route"


def code_of(status: int) -> grpc.StatusCode:
    """The gRPC code an HTTP status is counted as."""
    if status in CODE_OF_STATUS:
        return CODE_OF_STATUS[status]
    if status < 400:
        return Code.OK
    return Code.INVALID_ARGUMENT if status < 500 else Code.INTERNAL


def error_response(code: grpc.StatusCode, message: str, status: int | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": message, "code": code.name}, status_code=status or HTTP_STATUS[code]
    )


async def refused_handler(_request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, Refused)
    return error_response(err.code, err.message, err.http_status)


async def validation_handler(_request: Request, err: Exception) -> JSONResponse:
    """A parameter that does not validate: 400 INVALID_ARGUMENT, naming it (not FastAPI's 422)."""
    assert isinstance(err, RequestValidationError)
    problems = "; ".join(
        f"{' '.join(str(part) for part in error['loc'])}: {error['msg']}" for error in err.errors()
    )
    return error_response(Code.INVALID_ARGUMENT, f"invalid request: {problems}")


async def http_error_handler(_request: Request, err: Exception) -> JSONResponse:
    """Starlette's own refusals (404, 405...) in the same body as every other error."""
    assert isinstance(err, HTTPException)
    code = code_of(err.status_code)
    response = error_response(code, str(err.detail), err.status_code)
    if err.headers:
        response.headers.update(err.headers)
    return response


def too_large(size: int, limit: int) -> Refused:
    return Refused(
        Code.RESOURCE_EXHAUSTED,
        f"request body larger than max ({size} vs. {limit} bytes): send a smaller photo "
        "(max_message_bytes)",
        http_status=413,
    )


async def read_body(request: Request, method: str) -> bytes:
    """The request's body, within the gRPC port's limits: refused (413, message_too_large) once
    it passes ``max_message_bytes``, without reading it to its end, and (408,
    request_timeout) when it has not all come within ``request_timeout_seconds``; a caller that
    leaves before sending it all is counted as ended_before_request."""
    config: ServiceConfig = request.app.state.config
    metrics: ServiceMetrics = request.app.state.metrics
    limit = config.max_message_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        metrics.refusals.labels(method, "message_too_large").inc()
        raise too_large(int(declared), limit)
    chunks = []
    size = 0
    try:
        with anyio.fail_after(config.request_timeout_seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    metrics.refusals.labels(method, "message_too_large").inc()
                    raise too_large(size, limit)
                chunks.append(chunk)
    except TimeoutError as err:
        metrics.refusals.labels(method, "request_timeout").inc()
        raise Refused(
            Code.CANCELLED,
            f"the request body did not all arrive within {config.request_timeout_seconds:g} s "
            "(request_timeout_seconds)",
            http_status=408,
        ) from err
    except ClientDisconnect as err:
        metrics.refusals.labels(method, "ended_before_request").inc()
        raise Refused(Code.CANCELLED, "the caller left before sending its request") from err
    return b"".join(chunks)


def bad_request(method: str, metrics: ServiceMetrics, message: str) -> Refused:
    """INVALID_ARGUMENT for a request that does not parse, counted as bad_request."""
    metrics.refusals.labels(method, "bad_request").inc()
    return Refused(Code.INVALID_ARGUMENT, message)


class CallCounter:
    """ASGI middleware: counts and times each call of a counted route, and refuses calls beyond
    ``max_calls`` open at once (429, counted as max_concurrent_rpcs).

    Args:
        app: the application it wraps.
        metrics: the service's metrics.
        routes: the routes a call is matched against to name it (those of the routers the app
            includes; a route named ``HTTP ...`` is counted).
        max_calls: calls open at once on the web port (max_concurrent_rpcs).
    """

    def __init__(
        self, app: ASGIApp, metrics: ServiceMetrics, routes: Sequence[BaseRoute], max_calls: int
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.max_calls = max_calls
        self._open = 0
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = self.method_of(scope) if scope["type"] == "http" else None
        if method is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        if not self._take():
            self.metrics.refusals.labels(method, "max_concurrent_rpcs").inc()
            self._count(method, 429, started)
            await self._refuse(send)
            return
        answered = False

        async def counting_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                # Counted before the caller can see the answer, so a caller that reads the
                # metrics next finds its call there.
                answered = True
                self._count(method, message["status"], started)
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            with self._lock:
                self._open -= 1
            if not answered:  # the app failed before answering: the caller gets a 500
                self._count(method, 500, started)

    def method_of(self, scope: Scope) -> str | None:
        """The metrics' name of the route the call is for; None: not counted."""
        partial = None  # a route of that path for another HTTP method (405)
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                partial = route
                break
            if match == Match.PARTIAL and partial is None:
                partial = route
        if partial is None:
            return UNKNOWN_ROUTE if scope["path"].startswith(API_PREFIXES) else None
        name = getattr(partial, "name", "")
        return name if name.startswith(COUNTED_PREFIX) else None

    def _take(self) -> bool:
        with self._lock:
            if self._open >= self.max_calls:
                return False
            self._open += 1
            return True

    def _count(self, method: str, status: int, started: float) -> None:
        self.metrics.requests.labels(method, code_of(status).name).inc()
        self.metrics.request_seconds.labels(method).observe(time.perf_counter() - started)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {
                "error": f"Concurrent call limit exceeded: {self.max_calls} calls are open "
                "already (max_concurrent_rpcs); retry later",
                "code": Code.RESOURCE_EXHAUSTED.name,
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
