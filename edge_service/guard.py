"""Guards around every call: how many may be open, how long one may take to send its request,
how many are computed at once, requests that do not parse, callers that gave up.

gRPC's sync server gives each call a worker thread before its request message has arrived, and
that thread waits for the message without a time limit: a client that opens calls and never
sends their messages would hold every worker, and no other caller (health checks included) would
be answered. So here:

- every admitted call gets a thread at once (the pool has a thread for each of the
  ``max_concurrent_rpcs`` places, and a few more for health checks), and :class:`CallGuard`
  admits calls itself: beyond ``max_concurrent_rpcs`` a call is refused RESOURCE_EXHAUSTED on
  threads of its own, which never wait, and the refusal is counted;
- a call must deliver its request message within ``request_timeout_seconds``, or it is cancelled
  (the caller sees CANCELLED);
- only ``max_workers`` Classifier calls are computed at once; the others wait, up to their
  deadline, for one to finish;
- health Check and List have places of their own, so they are answered while the others are
  all taken; the server also caps the calls one connection may hold (``grpc.max_concurrent_
  streams``, set from ``max_calls_per_connection`` in server.py), so one client cannot take
  every place.

Every refusal is counted in ``smartbin_refusals_total{method, reason}``, and, for the Classifier
calls, in ``smartbin_requests_total{method, code}`` with the code the caller gets, which the
error-rate alert reads: the refusals gRPC would make unseen (its concurrency limit, a message
over ``max_message_bytes``) are made here instead, so that they are counted too.

gRPC's own parsing answers a malformed request with INTERNAL, which tells a caller nothing; here it
gets INVALID_ARGUMENT with the parser's reason. A classification stops between its stages once
its caller has given up (``edge_service.classify.check_still_wanted``).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from edge_service.memory import DecodeBudget, megabytes
from edge_service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Health calls that answer at once; they have places of their own beside max_concurrent_rpcs.
HEALTH_CALLS = frozenset(f"/{HEALTH_SERVICE}/{name}" for name in ("Check", "List"))
HEALTH_PLACES = 4
# Threads that answer refused calls: a refusal neither reads the request nor waits.
REFUSAL_THREADS = 2
# After a call's request stream ends without a message: how long to wait to see whether gRPC
# ended the call (it does when the caller cancels, or when the message is over gRPC's limit).
GRPC_END_GRACE_SECONDS = 0.25
# Request messages from this size up count in the photo memory; smaller ones are noise.
COUNTED_REQUEST_BYTES = 64 * 1024
T = TypeVar("T")


def counted(method: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Count a unary handler's calls by final status code and time them (the servicer holds
    the service's ``metrics``)."""

    def wrap(handler: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(handler)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> T:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return handler(self, request, context)
            except Exception:
                # grpcio has had ServicerContext.code() since 1.38; types-grpcio lacks it.
                code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
                raise
            finally:
                self.metrics.requests.labels(method, code.name).inc()
                self.metrics.request_seconds.labels(method).observe(time.perf_counter() - start)

        return wrapper

    return wrap


@dataclass(frozen=True)
class CallLimits:
    """What :class:`CallGuard` enforces; None: no limit.

    Attributes:
        max_calls: calls open at once (max_concurrent_rpcs), streams included.
        max_message_bytes: the largest request message; give gRPC twice as much, so that the
            refusals of messages just over it are counted here.
        max_working: calls of ``working_methods`` computed at once (max_workers).
        request_timeout: seconds a call may take to deliver its request message.
        working_methods: the full method names that need a worker.
        counted_service: calls of this service are counted in smartbin_requests_total.
        memory: where the request messages of calls being served are counted.
        also_counted: further services whose calls are counted there (the Open Inference
            Protocol's, served on the same port).
        workers: the ``max_working`` places, when they are shared with another port (the web
            port's classifications take the same ones); None: places of the guard's own.
    """

    max_calls: int | None = None
    max_message_bytes: int | None = None
    max_working: int | None = None
    request_timeout: float | None = None
    working_methods: frozenset[str] = field(default_factory=frozenset)
    counted_service: str = "smartbin.v1.Classifier"
    memory: DecodeBudget | None = None
    also_counted: frozenset[str] = field(default_factory=frozenset)
    workers: threading.BoundedSemaphore | None = None


class _Places:
    """A count of places taken, refused beyond ``limit`` (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.taken = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.limit is not None and self.taken >= self.limit:
                return False
            self.taken += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.taken -= 1


class _Timer:
    __slots__ = ("action", "cancelled", "fired")

    def __init__(self, action: Callable[[], object]) -> None:
        self.action = action
        self.cancelled = False
        self.fired = False

    def cancel(self) -> None:
        self.cancelled = True


class Watchdog:
    """Runs an action after a delay unless cancelled first; one thread for every timer."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, _Timer]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def schedule(self, delay: float, action: Callable[[], object]) -> _Timer:
        timer = _Timer(action)
        with self._changed:
            due = time.monotonic() + delay
            heapq.heappush(self._due, (due, next(self._order), timer))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
                self._thread.start()
            self._changed.notify()
        return timer

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._ready():
                    self._changed.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, timer = heapq.heappop(self._due)
            if not timer.cancelled:
                timer.fired = True
                with contextlib.suppress(Exception):
                    timer.action()

    def _ready(self) -> bool:
        """Whether the first timer is due or cancelled (it can go)."""
        if not self._due:
            return False
        due, _, timer = self._due[0]
        return timer.cancelled or due <= time.monotonic()


class CallGuard(grpc.ServerInterceptor):
    """Admits calls, bounds the wait for their request, parses it, keeps the call gauges and
    counts every refusal (see the module's docstring).

    Every call is served by a handler that takes its requests as a stream, so that its thread
    never waits for a request without a time limit. Calls with a stream of requests (reflection)
    are admitted and counted, and otherwise pass through.
    """

    def __init__(self, metrics: ServiceMetrics, limits: CallLimits | None = None) -> None:
        self.metrics = metrics
        self.limits = limits or CallLimits()
        self._places = _Places(self.limits.max_calls)
        self._health_places = _Places(HEALTH_PLACES)
        self._workers = self.limits.workers or (
            threading.BoundedSemaphore(self.limits.max_working)
            if self.limits.max_working is not None
            else None
        )
        self._watchdog = Watchdog() if self.limits.request_timeout is not None else None
        self._refusers = futures.ThreadPoolExecutor(REFUSAL_THREADS, thread_name_prefix="refuse")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # gRPC answers UNIMPLEMENTED; no label for a name a caller made up
        call = _Call(handler_call_details.method)
        release = self._take_place(call.full)
        if release is None:
            self._refused(call, "max_concurrent_rpcs", grpc.StatusCode.RESOURCE_EXHAUSTED)
            return self._refusal(
                handler,
                f"Concurrent RPC limit exceeded: {self.limits.max_calls} calls are open already "
                "(max_concurrent_rpcs); retry later",
            )
        self.metrics.open_calls.inc()
        try:
            return self._guarded(handler, call, release)
        except BaseException:
            release()
            raise

    def _take_place(self, full: str) -> Callable[[], None] | None:
        """Take a place for the call; the function that gives it back, or None when full."""
        places = self._places
        if full in HEALTH_CALLS and self._health_places.take():
            places = self._health_places
        elif not places.take():
            return None
        released = threading.Lock()

        def release() -> None:
            if released.acquire(blocking=False):  # once only
                places.give_back()
                self.metrics.open_calls.dec()

        return release

    def _refused(self, call: _Call, reason: str, code: grpc.StatusCode) -> None:
        self.metrics.refusals.labels(call.name, reason).inc()
        if call.service == self.limits.counted_service or call.service in self.limits.also_counted:
            self.metrics.requests.labels(call.name, code.name).inc()

    def _refusal(self, handler: grpc.RpcMethodHandler, details: str) -> grpc.RpcMethodHandler:
        """A handler that refuses the call with RESOURCE_EXHAUSTED at once, on the refusal
        threads: it reads nothing, so it never waits."""

        def refuse(_requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, details)

        # gRPC runs a behaviour with an experimental_thread_pool on that pool.
        setattr(refuse, "experimental_thread_pool", self._refusers)  # noqa: B010
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                refuse, response_serializer=handler.response_serializer
            )
        return grpc.stream_unary_rpc_method_handler(
            refuse, response_serializer=handler.response_serializer
        )

    def _guarded(
        self, handler: grpc.RpcMethodHandler, call: _Call, release: Callable[[], None]
    ) -> grpc.RpcMethodHandler:
        if handler.request_streaming:
            return self._passed_through(handler, release)
        parse = handler.request_deserializer
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            def stream_out(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
                try:
                    with (
                        self._request(call, requests, context, parse) as request,
                        self._working(call, context),
                    ):
                        yield from stream(request, context)
                finally:
                    release()

            return grpc.stream_stream_rpc_method_handler(
                stream_out, response_serializer=handler.response_serializer
            )
        unary = handler.unary_unary
        if unary is None:
            raise TypeError(f"{call.full}: a handler of no kind gRPC knows")

        def unary_out(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            try:
                with (
                    self._request(call, requests, context, parse) as request,
                    self._working(call, context),
                ):
                    return unary(request, context)
            finally:
                release()

        return grpc.stream_unary_rpc_method_handler(
            unary_out, response_serializer=handler.response_serializer
        )

    @staticmethod
    def _passed_through(
        handler: grpc.RpcMethodHandler, release: Callable[[], None]
    ) -> grpc.RpcMethodHandler:
        if handler.stream_stream is not None:
            streams = handler.stream_stream

            def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                try:
                    yield from streams(requests, context)
                finally:
                    release()

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, handler.request_deserializer, handler.response_serializer
            )
        stream_unary = handler.stream_unary
        if stream_unary is None:
            raise TypeError("a handler of no kind gRPC knows")

        def one_answer(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            try:
                return stream_unary(requests, context)
            finally:
                release()

        return grpc.stream_unary_rpc_method_handler(
            one_answer, handler.request_deserializer, handler.response_serializer
        )

    @contextlib.contextmanager
    def _request(
        self,
        call: _Call,
        requests: Iterator[bytes],
        context: grpc.ServicerContext,
        parse: Callable[[bytes], Any] | None,
    ) -> Iterator[Any]:
        """The call's one request message, parsed, counted in the photo memory while the block
        runs; aborts the call when the message does not come in time, does not come at all,
        does not parse or does not fit."""
        raw = self._receive(call, requests, context)
        memory = self.limits.memory
        held = None
        if memory is not None and len(raw) >= COUNTED_REQUEST_BYTES:
            held = memory.hold_request(len(raw))
            if held is None:
                self._refused(call, "request_memory", grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this {megabytes(len(raw))} request does not fit beside the "
                    f"{megabytes(memory.requests_held)} of requests being served in this bin's "
                    f"{megabytes(memory.capacity)} photo memory (decode_budget_bytes): retry later",
                )
        try:
            try:
                request = parse(raw) if parse else raw
            except DecodeError as err:
                self._refused(call, "bad_request", grpc.StatusCode.INVALID_ARGUMENT)
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request is not a valid {call.name} request message ({err}): "
                    "send the message type the .proto names",
                )
            del raw
            yield request
        finally:
            if held is not None and memory is not None:
                memory.release_request(held)

    def _receive(
        self, call: _Call, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> bytes:
        """The call's one request message, as bytes; aborts the call when it does not come in
        time, does not come at all, or is larger than ``max_message_bytes``.

        gRPC itself is given twice that limit, so that the service sees, counts and refuses the
        messages just over it; a call that ends before its message has arrived, neither by our
        timeout nor by its deadline, was cancelled by its caller, or ended by gRPC refusing a
        message over twice the limit: the service cannot tell which (ended_before_request).
        """
        timeout = self.limits.request_timeout
        timer = None
        if self._watchdog is not None and timeout is not None:
            timer = self._watchdog.schedule(timeout, context.cancel)
        ended: grpc.RpcError | None = None
        try:
            raw = next(requests, None)
        except grpc.RpcError as err:  # the call is over
            raw, ended = None, err
        finally:
            if timer is not None:
                timer.cancel()
        if raw is not None:
            most = self.limits.max_message_bytes
            if most is not None and len(raw) > most:
                self._refused(call, "message_too_large", grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"Received message larger than max ({len(raw)} vs. {most}): "
                    "send a smaller photo (max_message_bytes)",
                )
            return raw
        if timer is not None and timer.fired:
            self._refused(call, "request_timeout", grpc.StatusCode.CANCELLED)
        elif context.time_remaining() <= 0:
            pass  # the caller's deadline passed first: gRPC told it so
        elif ended is not None or _ended_by_grpc(context):
            self._refused(call, "ended_before_request", grpc.StatusCode.CANCELLED)
        else:
            self._refused(call, "no_request", grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the call ended without a request message: {call.name} takes exactly one",
            )
        if ended is not None:
            raise ended  # gRPC knows this error: it ends the call without a word
        context.abort(grpc.StatusCode.CANCELLED, "the call ended before its request arrived")

    @contextlib.contextmanager
    def _working(self, call: _Call, context: grpc.ServicerContext) -> Iterator[None]:
        """A worker for the call while the block runs, if its method needs one, waited for up
        to the call's deadline; the in-flight gauge counts it meanwhile."""
        workers = self._workers
        if workers is None or call.full not in self.limits.working_methods:
            workers = None
        elif not workers.acquire(timeout=min(context.time_remaining(), threading.TIMEOUT_MAX)):
            self._refused(call, "worker_wait", grpc.StatusCode.DEADLINE_EXCEEDED)
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline passed while the call waited for one of the {self.limits.max_working} "
                "workers (max_workers)",
            )
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.metrics.in_flight.dec()
            if workers is not None:
                workers.release()


@dataclass(frozen=True)
class _Call:
    full: str  # "/smartbin.v1.Classifier/Classify"

    @property
    def service(self) -> str:
        return self.full.strip("/").split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.full.rsplit("/", 1)[-1]


def _ended_by_grpc(context: grpc.ServicerContext) -> bool:
    """Whether gRPC ends the call within a moment, as it does after refusing its message."""
    ended = threading.Event()
    if not context.add_callback(ended.set):
        return True  # over already
    return ended.wait(GRPC_END_GRACE_SECONDS)


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

    def List(  # noqa: N802 (the gRPC method name)
        self, request: health_pb2.HealthListRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """Every health name set and its status, as Check would answer each (grpcio's servicer
        leaves List unimplemented, though reflection lists it)."""
        with self._lock:  # the lock under which grpcio's Check reads the same statuses
            statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in statuses.items()
            }
        )

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
