"""The one Classify load of the tools and the one percentile function: what each thread sends,
what is recorded, and when the threads stop. A stand-in stub answers, so no service is needed."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter

import grpc
import pytest

from smartbin.v1 import classifier_pb2
from smartbin_tools.load import ClassifyLoad
from smartbin_tools.stats import percentiles_ms, stats_ms

GOOD = classifier_pb2.ClassifyRequest(image=b"good")
BAD = classifier_pb2.ClassifyRequest(image=b"bad")


class Refused(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT


class Stub:
    """Answers Classify after ``seconds``; refuses BAD. Records who sent what, and when."""

    def __init__(self, seconds: float = 0.005) -> None:
        self.seconds = seconds
        self.sent: list[tuple[str, bytes, float, float]] = []
        self.lock = threading.Lock()

    def Classify(
        self, request: classifier_pb2.ClassifyRequest, timeout: float
    ) -> classifier_pb2.ClassifyResponse:
        with self.lock:
            self.sent.append(
                (threading.current_thread().name, request.image, timeout, time.perf_counter())
            )
        time.sleep(self.seconds)
        if request == BAD:
            raise Refused()
        return classifier_pb2.ClassifyResponse()


def test_threads_take_the_requests_in_turn_and_record_every_call() -> None:
    stub = Stub()
    load = ClassifyLoad(stub, [GOOD, BAD], concurrency=2, timeout=7.0)  # type: ignore[arg-type]
    load.start(0.3)
    load.join(5)
    by_thread: dict[str, list[bytes]] = {}
    for thread, image, timeout, _ in stub.sent:
        by_thread.setdefault(thread, []).append(image)
        assert timeout == 7.0
    assert by_thread["load-0"][:3] == [b"good", b"bad", b"good"]
    assert by_thread["load-1"][:3] == [b"bad", b"good", b"bad"]
    codes = Counter(call.code for call in load.calls)
    assert set(codes) == {"OK", "INVALID_ARGUMENT"}
    assert sum(codes.values()) == len(stub.sent)
    assert all(call.seconds >= stub.seconds for call in load.calls)


def test_no_call_starts_after_the_stop_time() -> None:
    stub = Stub()
    load = ClassifyLoad(stub, [GOOD], concurrency=3)  # type: ignore[arg-type]
    started = load.start(0.25)
    elapsed = load.join(5)
    assert load.deadline == pytest.approx(started + 0.25)
    # A thread checks the time just before it calls; the stub notes it just after.
    assert max(sent for *_, sent in stub.sent) < load.deadline + 0.05
    assert 0.25 <= elapsed < 0.25 + 1.0
    assert len(load.calls) == len(stub.sent) > 3


def test_stop_ends_the_load_early_and_calls_since_gives_the_new_calls() -> None:
    load = ClassifyLoad(Stub(), [GOOD], concurrency=2)  # type: ignore[arg-type]
    load.start(60)
    time.sleep(0.1)
    first = load.calls_since(0)
    load.stop()
    assert load.join(5) < 5
    assert first and load.calls[: len(first)] == first
    assert load.calls_since(len(first)) == load.calls[len(first) :]


def test_a_load_needs_a_request_and_a_thread() -> None:
    with pytest.raises(ValueError):
        ClassifyLoad(Stub(), [], concurrency=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ClassifyLoad(Stub(), [GOOD], concurrency=0)  # type: ignore[arg-type]


def test_percentiles_in_milliseconds() -> None:
    seconds = [n / 1000 for n in range(1, 101)]  # 1 to 100 ms
    figures = stats_ms(seconds)
    assert figures["p50_ms"] == pytest.approx(50.5)
    assert figures["p95_ms"] == pytest.approx(95.05)
    assert figures["p99_ms"] == pytest.approx(99.01)
    assert figures["mean_ms"] == pytest.approx(50.5)
    assert figures["count"] == 100
    assert all(math.isnan(v) for v in percentiles_ms([]).values())
