"""Guards around every call: requests that do not parse, callers that gave up, calls in flight.

gRPC's own parsing answers a malformed request with INTERNAL, which tells a caller nothing; here it
gets INVALID_ARGUMENT with the parser's reason. gRPC itself drops a call whose deadline passed while
it queued for a worker; ``abort_if_expired`` lets a handler stop between its stages too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from edge_service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)


def abort_if_expired(context: grpc.ServicerContext, work: str) -> None:
    """End the call before ``work`` when its caller has given up on it.

    Raises:
        Exception: gRPC's abort, with DEADLINE_EXCEEDED or CANCELLED.
    """
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline passed before {work}")
    if not context.is_active():
        context.abort(grpc.StatusCode.CANCELLED, f"call cancelled before {work}")


class CallGuard(grpc.ServerInterceptor):
    """Parses requests itself and keeps the in-flight gauge.

    Calls with a stream of requests (reflection) pass through untouched.
    """

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        admit = self._admitter(method, handler.request_deserializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(admit, handler.unary_stream),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(admit, handler.unary_unary),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _admitter(
        self, method: str, parse: Callable[[bytes], Any] | None
    ) -> Callable[[bytes, grpc.ServicerContext], Any]:
        def admit(raw: bytes, context: grpc.ServicerContext) -> Any:
            try:
                return parse(raw) if parse else raw
            except DecodeError as err:
                self.metrics.requests.labels(method, "INVALID_ARGUMENT").inc()
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request is not a valid {method} request message ({err}): "
                    "send the message type the .proto names",
                )

        return admit

    def _unary(
        self,
        admit: Callable[[bytes, grpc.ServicerContext], Any],
        behaviour: Callable[[Any, grpc.ServicerContext], Any],
    ) -> Callable[[bytes, grpc.ServicerContext], Any]:
        def unary_unary(raw: bytes, context: grpc.ServicerContext) -> Any:
            request = admit(raw, context)
            self.metrics.in_flight.inc()
            try:
                return behaviour(request, context)
            finally:
                self.metrics.in_flight.dec()

        return unary_unary

    def _stream(
        self,
        admit: Callable[[bytes, grpc.ServicerContext], Any],
        behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
    ) -> Callable[[bytes, grpc.ServicerContext], Iterator[Any]]:
        def unary_stream(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
            request = admit(raw, context)
            self.metrics.in_flight.inc()
            try:
                yield from behaviour(request, context)
            finally:
                self.metrics.in_flight.dec()

        return unary_stream


class BoundedHealth(health.HealthServicer):
    """grpc's health service with a cap on open Watch streams.

    Each open watch holds a gRPC worker thread, so unbounded watchers could take every worker
    and stop all other calls. grpc's callback-based (non-blocking) Watch would hold none, but it
    sends while holding the servicer's lock, and a watcher leaving at that moment needs the same
    lock on gRPC's polling thread: the service can then hang, at shutdown most often.
    """

    def __init__(self, max_watchers: int) -> None:
        super().__init__(experimental_non_blocking=False)
        self.max_watchers = max_watchers
        self._open = threading.BoundedSemaphore(max_watchers)
        self._watchers: set[Any] = set()
        self._watchers_lock = threading.Lock()
        self._ending = False

    def end_watches(self) -> None:
        """End every open watch once it has sent the statuses already set (NOT_SERVING, at
        shutdown), so that watchers do not hold up the shutdown grace; later watches end at once.
        """
        with self._watchers_lock:
            self._ending = True
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.close()

    def Watch(  # noqa: N802 (the gRPC method name)
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: None = None,
    ) -> Iterator[health_pb2.HealthCheckResponse]:
        if not self._open.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_watchers} health watches are open already (max_health_watchers): "
                "poll with Check instead",
            )
        try:
            watcher = super().Watch(request, context)  # an iterator of the statuses as they are set
            with self._watchers_lock:
                self._watchers.add(watcher)
                if self._ending:
                    watcher.close()
            try:
                yield from watcher
            finally:
                with self._watchers_lock:
                    self._watchers.discard(watcher)
        finally:
            self._open.release()
