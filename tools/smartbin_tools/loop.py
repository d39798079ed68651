"""The tools' load loop: threads calling back to back until a stop time, each call's latency and
outcome recorded. :class:`smartbin_tools.load.ClassifyLoad` makes it call Classify; the peers of
``smartbin-bench-peers`` make it POST over HTTP or run the pipeline in process. No gRPC here,
so that a process measuring its own memory need not load it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Call:
    """One Classify call: its latency and its status code's name ("OK" when it succeeded)."""

    seconds: float
    code: str


class CallLoad:
    """``concurrency`` threads calling back to back, thread ``i`` making calls ``i``, ``i + 1``...
    (:meth:`call`), until the stop time or ``stop()``.

    Times are ``time.perf_counter()`` seconds; ``calls`` grows in the order calls end. A call
    that raises one of ``failures`` is recorded under :meth:`code`'s name for the error; any
    other exception ends its thread.
    """

    failures: tuple[type[BaseException], ...] = (Exception,)

    def __init__(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError("a load needs at least one thread")
        self.calls: list[Call] = []
        self.started = self.deadline = float("nan")
        self._seconds = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Barrier(concurrency + 1, action=self._start_clock)
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"load-{i}", daemon=True)
            for i in range(concurrency)
        ]

    def call(self, index: int) -> None:
        """Make call number ``index`` of a thread; raise to fail it."""
        raise NotImplementedError

    def code(self, error: BaseException) -> str:
        """The name a failed call is recorded under."""
        return type(error).__name__

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

    def _run(self, index: int) -> None:
        self._ready.wait()
        while not self._stop.is_set() and time.perf_counter() < self.deadline:
            started = time.perf_counter()
            try:
                self.call(index)
                code = "OK"
            except self.failures as err:
                code = self.code(err)
            index += 1
            call = Call(time.perf_counter() - started, code)
            with self._lock:
                self.calls.append(call)
