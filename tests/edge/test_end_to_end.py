"""The walking skeleton, end to end: train -> convert -> serve -> classify -> scrape."""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import scrape
from PIL import Image

from edge_service.server import RunningService
from smartbin.bundle import load_bundle
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((128, 128), 64).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()[:1500]


def first_image(data: Path) -> Path:
    return sorted(data.rglob("*.jpg"))[0]


def test_classify_answers_with_the_bundles_labels(
    channel: grpc.Channel, tiny_bundle: Path, tiny_data: Path
) -> None:
    labels = load_bundle(tiny_bundle).labels
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    reply = stub.Classify(
        classifier_pb2.ClassifyRequest(image=first_image(tiny_data).read_bytes()), timeout=10
    )
    assert sorted(p.label for p in reply.predictions) == sorted(labels)
    scores = [p.score for p in reply.predictions]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-3)
    assert reply.model_version == "tiny-test"
    assert reply.timings.inference_seconds > 0
    assert reply.timings.total_seconds >= reply.timings.inference_seconds


def test_top_k_limits_the_answer(channel: grpc.Channel, tiny_data: Path) -> None:
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    reply = stub.Classify(
        classifier_pb2.ClassifyRequest(image=first_image(tiny_data).read_bytes(), top_k=2),
        timeout=10,
    )
    assert len(reply.predictions) == 2


def test_health_is_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service_name in ("", "smartbin.v1.Classifier"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_count_the_request(
    service: RunningService, channel: grpc.Channel, tiny_data: Path
) -> None:
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    stub.Classify(
        classifier_pb2.ClassifyRequest(image=first_image(tiny_data).read_bytes()), timeout=10
    )
    text = scrape(service)
    assert 'smartbin_requests_total{code="OK",method="Classify"} 1.0' in text
    assert "smartbin_inference_seconds_count 1.0" in text
    assert "smartbin_model_info{" in text and 'version="tiny-test"' in text
    assert "_created" not in text  # one series per metric, not two, in every bin's Prometheus
    assert "smartbin_camera_up" not in text  # no camera configured: not counted as one down


def test_non_image_bytes_are_invalid_argument_and_server_keeps_serving(
    service: RunningService, channel: grpc.Channel, tiny_data: Path
) -> None:
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(classifier_pb2.ClassifyRequest(image=b"this is not a photo"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a recognised image format" in caught.value.details()
    reply = stub.Classify(
        classifier_pb2.ClassifyRequest(image=first_image(tiny_data).read_bytes()), timeout=10
    )
    assert reply.predictions
    assert 'smartbin_requests_total{code="INVALID_ARGUMENT",method="Classify"} 1.0' in scrape(
        service
    )


@pytest.mark.parametrize(
    "request_kwargs, fragment",
    [
        ({"image": b""}, "image is empty"),
        ({"image": truncated_jpeg()}, "could not be decoded"),
        ({"image": b"GIF89a", "top_k": 999}, "top_k is 999"),
    ],
)
def test_bad_arguments_say_what_to_fix(
    channel: grpc.Channel, request_kwargs: dict, fragment: str
) -> None:
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(classifier_pb2.ClassifyRequest(**request_kwargs), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in caught.value.details()


def test_model_info_describes_the_bundle(channel: grpc.Channel, tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    info = classifier_pb2_grpc.ClassifierStub(channel).GetModelInfo(
        classifier_pb2.GetModelInfoRequest(), timeout=5
    )
    assert list(info.labels) == list(bundle.labels)
    assert info.model_sha256 == bundle.sha256
    assert info.quantization == "int8"
    assert info.input_height == info.input_width == bundle.preprocessing.input_size
    assert json.loads(info.manifest_json)["version"] == "tiny-test"
    assert "int8.test.accuracy" in info.metrics
    assert info.api_version == "smartbin.v1"
    assert info.bundle_format_version == 1
