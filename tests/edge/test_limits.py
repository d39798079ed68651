"""The service's limits hold: message size, concurrent calls, deadlines, malformed requests."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import local_config, metric, slow_png, wait_for
from PIL import Image

from edge_service.server import RunningService, create_server
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

CLASSIFY = "/smartbin.v1.Classifier/Classify"


def photo(size: tuple[int, int] = (160, 120)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def limited(default_bundle: Path, request: pytest.FixtureRequest) -> Iterator[RunningService]:
    """A service with the config overrides the test names in ``@pytest.mark.parametrize``."""
    running = create_server(local_config(default_bundle, **request.param))
    yield running
    running.stop(grace=0)


def classify_stub(
    service: RunningService,
) -> tuple[grpc.Channel, classifier_pb2_grpc.ClassifierStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    return channel, classifier_pb2_grpc.ClassifierStub(channel)


def assert_still_answers(stub: classifier_pb2_grpc.ClassifierStub) -> None:
    reply = stub.Classify(classifier_pb2.ClassifyRequest(image=photo()), timeout=10)
    assert reply.predictions


def answers_or_is_busy(stub: classifier_pb2_grpc.ClassifierStub) -> bool:
    """True when a call is answered; False when it is refused only for the concurrency limit."""
    try:
        assert_still_answers(stub)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return False
    return True


@pytest.mark.parametrize("limited", [{"max_message_bytes": 64 * 1024}], indirect=True)
def test_oversized_message_is_resource_exhausted(limited: RunningService) -> None:
    channel, stub = classify_stub(limited)
    with channel, pytest.raises(grpc.RpcError) as caught:
        stub.Classify(classifier_pb2.ClassifyRequest(image=b"\xff" * 100_000), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in caught.value.details()
    assert "65536" in caught.value.details()
    with grpc.insecure_channel(f"127.0.0.1:{limited.port}") as fresh:
        assert_still_answers(classifier_pb2_grpc.ClassifierStub(fresh))


@pytest.mark.parametrize("limited", [{"max_concurrent_rpcs": 1}], indirect=True)
def test_calls_beyond_the_concurrency_limit_are_resource_exhausted(
    limited: RunningService,
) -> None:
    channel, stub = classify_stub(limited)
    with channel:
        with a_call_waiting_to_infer(limited, stub) as first:  # it takes the one slot
            with pytest.raises(grpc.RpcError) as caught:
                stub.Classify(classifier_pb2.ClassifyRequest(image=photo()), timeout=10)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "Concurrent RPC limit exceeded" in caught.value.details()
        assert first.result(timeout=10).predictions
        # The slot frees once the first call's answer has gone out.
        wait_for(lambda: answers_or_is_busy(stub), timeout=5)


@pytest.mark.parametrize(
    "limited", [{"max_workers": 1, "max_watchers": 0, "max_health_watchers": 0}], indirect=True
)
def test_call_that_queued_past_its_deadline_is_not_computed(limited: RunningService) -> None:
    channel, stub = classify_stub(limited)
    with channel:
        with a_call_waiting_to_infer(limited, stub) as first:  # it holds the only worker
            with pytest.raises(grpc.RpcError) as caught:
                stub.Classify(classifier_pb2.ClassifyRequest(image=photo()), timeout=0.5)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert first.result(timeout=10).predictions
        assert_still_answers(stub)
    assert metric(limited, "smartbin_inference_seconds_count") == 2.0
    assert metric(limited, 'smartbin_requests_total{code="OK",method="Classify"}') == 2.0


@pytest.mark.parametrize(
    "limited", [{"max_workers": 2, "max_watchers": 0, "max_health_watchers": 1}], indirect=True
)
def test_health_watchers_beyond_their_limit_are_refused_and_calls_go_on(
    limited: RunningService,
) -> None:
    channel, stub = classify_stub(limited)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        first = health.Watch(health_pb2.HealthCheckRequest(), timeout=20)
        assert next(first).status == health_pb2.HealthCheckResponse.SERVING
        second = health.Watch(health_pb2.HealthCheckRequest(), timeout=20)
        with pytest.raises(grpc.RpcError) as caught:
            next(second)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_health_watchers" in caught.value.details()
        assert_still_answers(stub)  # the one worker left is free for calls
        first.cancel()
        # The slot frees once the server has seen the cancel.
        wait_for(lambda: opens_a_watch(health))


def test_a_stop_ends_health_watches_after_not_serving(default_bundle: Path) -> None:
    running = create_server(local_config(default_bundle, grace_seconds=60))
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with futures.ThreadPoolExecutor(1) as stopper:
            stopping = stopper.submit(running.stop, 60)
            # The watcher hears NOT_SERVING, then the stream ends as a completed call: it is
            # not left open until the grace runs out and then cut.
            assert [reply.status for reply in watch] == [health_pb2.HealthCheckResponse.NOT_SERVING]
            assert watch.code() == grpc.StatusCode.OK
            stopping.result(timeout=30)


def opens_a_watch(health: health_pb2_grpc.HealthStub) -> bool:
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=20)
    try:
        return next(watch).status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return False
    finally:
        watch.cancel()


@contextlib.contextmanager
def a_call_waiting_to_infer(
    service: RunningService, stub: classifier_pb2_grpc.ClassifierStub
) -> Iterator[futures.Future]:
    """A Classify call in progress, held just before inference until the block ends (the
    service has one interpreter); yields its future, done once the block has ended."""
    pool = service.runtime.models.current._idle
    with futures.ThreadPoolExecutor(1) as caller:
        interpreter = pool.get()
        try:
            call = caller.submit(
                stub.Classify, classifier_pb2.ClassifyRequest(image=photo()), timeout=30
            )
            wait_for(lambda: metric(service, "smartbin_in_flight_requests") == 1)
            yield call
        finally:
            pool.put(interpreter)


def test_call_whose_deadline_passes_while_decoding_is_not_inferred(
    service: RunningService, channel: grpc.Channel
) -> None:
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        # 20 megapixels: within the default decode budget, and slower to decode than 0.05 s.
        stub.Classify(classifier_pb2.ClassifyRequest(image=slow_png(5000, 4000)), timeout=0.05)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: metric(service, "smartbin_in_flight_requests") == 0)
    assert metric(service, "smartbin_inference_seconds_count") == 0.0


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xff\xff", b"\x0a\x05abc", b"\x10\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"],
    ids=["garbage", "field-shorter-than-its-length", "varint-too-long"],
)
def test_a_request_that_does_not_parse_is_invalid_argument(
    service: RunningService, channel: grpc.Channel, raw: bytes
) -> None:
    call = channel.unary_unary(CLASSIFY)  # raw bytes on the wire, no serializer
    with pytest.raises(grpc.RpcError) as caught:
        call(raw, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid Classify request" in caught.value.details()
    assert (
        metric(service, 'smartbin_requests_total{code="INVALID_ARGUMENT",method="Classify"}') == 1
    )
    assert_still_answers(classifier_pb2_grpc.ClassifierStub(channel))


def test_unknown_fields_are_ignored_as_proto3_says(channel: grpc.Channel) -> None:
    request = classifier_pb2.ClassifyRequest(image=photo()).SerializeToString()
    reply = channel.unary_unary(
        CLASSIFY, response_deserializer=classifier_pb2.ClassifyResponse.FromString
    )(
        request + b"\x98\x06\x01",
        timeout=10,  # field 99, a varint the service does not know
    )
    assert reply.predictions
