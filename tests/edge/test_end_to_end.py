"""The walking skeleton, end to end on the shipped default bundle: serve -> classify -> scrape."""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import PHOTOS, scrape
from PIL import Image

from edge_service.const import SAMPLES_DIR
from edge_service.server import RunningService
from smartbin.bundle import Bundle
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((128, 128), 64).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()[:1500]


def a_photo() -> bytes:
    return sorted(PHOTOS.rglob("*.jpg"))[0].read_bytes()


def sample_of(label: str) -> Path:
    """The sample photo of ``label``: the samples are named after their true category."""
    (path,) = (p for p in SAMPLES_DIR.glob("*.jpg") if p.stem.rstrip("0123456789") == label)
    return path


def test_classify_answers_with_the_bundles_labels(
    channel: grpc.Channel, default_loaded: Bundle
) -> None:
    labels = default_loaded.labels
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    photo = sample_of(labels[-1])
    reply = stub.Classify(classifier_pb2.ClassifyRequest(image=photo.read_bytes()), timeout=10)
    assert sorted(p.label for p in reply.predictions) == sorted(labels)
    assert reply.predictions[0].label == labels[-1], photo.name
    assert not reply.unsure
    scores = [p.score for p in reply.predictions]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-3)
    assert reply.model_version == default_loaded.version
    assert reply.timings.inference_seconds > 0
    assert reply.timings.total_seconds >= reply.timings.inference_seconds


def test_top_k_limits_the_answer(channel: grpc.Channel) -> None:
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    full = stub.Classify(classifier_pb2.ClassifyRequest(image=a_photo()), timeout=10)
    reply = stub.Classify(classifier_pb2.ClassifyRequest(image=a_photo(), top_k=2), timeout=10)
    assert list(reply.predictions) == list(full.predictions[:2])


def test_health_is_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service_name in ("", "smartbin.v1.Classifier"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_count_the_request(
    service: RunningService, channel: grpc.Channel, default_loaded: Bundle
) -> None:
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    reply = stub.Classify(classifier_pb2.ClassifyRequest(image=a_photo()), timeout=10)
    text = scrape(service)
    assert 'smartbin_requests_total{code="OK",method="Classify"} 1.0' in text
    assert "smartbin_inference_seconds_count 1.0" in text
    best = reply.predictions[0].label
    assert f'smartbin_classifications_total{{label="{best}"}} 1.0' in text
    assert "smartbin_model_info{" in text and f'version="{default_loaded.version}"' in text
    assert "_created" not in text  # one series per metric, not two, in every bin's Prometheus
    assert "smartbin_camera_up" not in text  # no camera configured: not counted as one down


def test_non_image_bytes_are_invalid_argument_and_server_keeps_serving(
    service: RunningService, channel: grpc.Channel
) -> None:
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(classifier_pb2.ClassifyRequest(image=b"this is not a photo"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a recognised image format" in caught.value.details()
    reply = stub.Classify(classifier_pb2.ClassifyRequest(image=a_photo()), timeout=10)
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


def test_model_info_describes_the_bundle(channel: grpc.Channel, default_loaded: Bundle) -> None:
    bundle = default_loaded
    info = classifier_pb2_grpc.ClassifierStub(channel).GetModelInfo(
        classifier_pb2.GetModelInfoRequest(), timeout=5
    )
    assert list(info.labels) == list(bundle.labels)
    assert info.model_sha256 == bundle.sha256
    assert info.quantization == bundle.quantization == "int8"
    assert info.input_height == info.input_width == bundle.preprocessing.input_size
    assert info.model_version == bundle.version
    assert json.loads(info.manifest_json) == json.loads(bundle.manifest.model_dump_json())
    accuracy = bundle.manifest.metrics["int8"]["test"]["accuracy"]
    assert info.metrics["int8.test.accuracy"] == pytest.approx(accuracy)
    assert info.api_version == "smartbin.v1"
    assert info.bundle_format_version == 1
