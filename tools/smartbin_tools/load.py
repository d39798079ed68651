"""The one Classify load of the tools: threads calling Classify back to back until a stop time,
each call's latency and status code recorded. ``smartbin-load`` reports intervals and samples
memory on top of it; ``smartbin-bench`` accounts CPU time around it."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from smartbin.v1 import classifier_pb2, classifier_pb2_grpc


@dataclass(frozen=True)
class Call:
    """One Classify call: its latency and its status code's name ("OK" when it succeeded)."""

    seconds: float
    code: str


class ClassifyLoad:
    """``concurrency`` threads calling Classify back to back, thread ``i`` sending
    ``requests[i]``, ``requests[i + 1]``... in turn, until the stop time or ``stop()``.

    Times are ``time.perf_counter()`` seconds; ``calls`` grows in the order calls end.
    """

    def __init__(
        self,
        stub: classifier_pb2_grpc.ClassifierStub,
        requests: Sequence[classifier_pb2.ClassifyRequest],
        concurrency: int,
        timeout: float = 30.0,
    ) -> None:
        if not requests or concurrency < 1:
            raise ValueError("a load needs a request and at least one thread")
        self.stub = stub
        self.requests = list(requests)
        self.timeout = timeout
        self.calls: list[Call] = []
        self.started = self.deadline = float("nan")
        self._seconds = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Barrier(concurrency + 1, action=self._start_clock)
        self._threads = [
            threading.Thread(target=self._call, args=(i,), name=f"load-{i}", daemon=True)
            for i in range(concurrency)
        ]

    def start(self, seconds: float) -> float:
        """Start the threads and return the start time, once every thread is ready to call;
        they make no new call ``seconds`` after it."""
        self._seconds = seconds
        for thread in self._threads:
            thread.start()
        self._ready.wait()
        return self.started

    def stop(self) -> None:
        """Make no new call (the calls in flight finish)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> float:
        """Wait for the threads to end (at most ``timeout`` seconds each); the seconds from the
        start until now."""
        for thread in self._threads:
            thread.join(timeout)
        return time.perf_counter() - self.started

    def calls_since(self, seen: int) -> list[Call]:
        """The calls that ended after the first ``seen``."""
        with self._lock:
            return self.calls[seen:]

    def _start_clock(self) -> None:
        self.started = time.perf_counter()
        self.deadline = self.started + self._seconds

    def _call(self, index: int) -> None:
        self._ready.wait()
        while not self._stop.is_set() and time.perf_counter() < self.deadline:
            request = self.requests[index % len(self.requests)]
            index += 1
            started = time.perf_counter()
            try:
                self.stub.Classify(request, timeout=self.timeout)
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name if err.code() else "UNKNOWN"
            call = Call(time.perf_counter() - started, code)
            with self._lock:
                self.calls.append(call)
