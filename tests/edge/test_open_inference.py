"""The Open Inference Protocol's gRPC service on the bin's port, called through its generated
stubs (tests/clients drives it with tritonclient): the same answers as Classify, the protocol's
metadata, and bad requests refused with a message and counted."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import metric

from edge_service.server import RunningService
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

PHOTOS = sorted(Path(__file__).parents[1].joinpath("data", "photos").rglob("*.jpg"))


@pytest.fixture
def oip(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
def classify(channel: grpc.Channel) -> Iterator[classifier_pb2_grpc.ClassifierStub]:
    yield classifier_pb2_grpc.ClassifierStub(channel)


def raw_bytes(*items: bytes) -> bytes:
    """A BYTES tensor's raw contents: each element's 4-byte little-endian length, then it."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def infer_request(*photos: bytes, **fields: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(**({"model_name": "smartbin"} | fields))
    request.inputs.add(name="image", datatype="BYTES", shape=[len(photos)])
    request.raw_input_contents.append(raw_bytes(*photos))
    return request


def outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The response's raw outputs as arrays (labels as lists of strings)."""
    arrays: dict[str, np.ndarray] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.datatype == "FP32":
            arrays[tensor.name] = np.frombuffer(raw, np.float32).reshape(tensor.shape)
        elif tensor.datatype == "BOOL":
            arrays[tensor.name] = np.frombuffer(raw, np.bool_).reshape(tensor.shape)
        else:
            items, offset = [], 0
            while offset < len(raw):
                (size,) = struct.unpack_from("<I", raw, offset)
                items.append(raw[offset + 4 : offset + 4 + size].decode())
                offset += 4 + size
            arrays[tensor.name] = np.array(items, dtype=object).reshape(tensor.shape)
    return arrays


def test_model_infer_answers_what_classify_answers_for_every_sample(
    oip: pb_grpc.GRPCInferenceServiceStub, classify: classifier_pb2_grpc.ClassifierStub
) -> None:
    photos = [p.read_bytes() for p in PHOTOS]
    response = oip.ModelInfer(infer_request(*photos, id="batch"))
    got = outputs(response)
    assert response.id == "batch"
    for i, photo in enumerate(photos):
        answer = classify.Classify(classifier_pb2.ClassifyRequest(image=photo))
        assert list(got["labels"][i]) == [p.label for p in answer.predictions]
        assert got["scores"][i].tolist() == [p.score for p in answer.predictions]
        assert bool(got["unsure"][i]) == answer.unsure
        assert response.model_version == answer.model_version


def test_bytes_contents_and_top_k_work_too(
    oip: pb_grpc.GRPCInferenceServiceStub, classify: classifier_pb2_grpc.ClassifierStub
) -> None:
    photo = PHOTOS[0].read_bytes()
    request = pb.ModelInferRequest(model_name="smartbin")
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        photo
    )
    request.parameters["top_k"].int64_param = 2
    request.outputs.add(name="labels")
    got = outputs(oip.ModelInfer(request))
    answer = classify.Classify(classifier_pb2.ClassifyRequest(image=photo, top_k=2))
    assert list(got) == ["labels"]
    assert got["labels"].tolist() == [[p.label for p in answer.predictions]]


def test_metadata_and_readiness_describe_the_served_bundle(
    oip: pb_grpc.GRPCInferenceServiceStub, classify: classifier_pb2_grpc.ClassifierStub
) -> None:
    info = classify.GetModelInfo(classifier_pb2.GetModelInfoRequest())
    assert oip.ServerLive(pb.ServerLiveRequest()).live
    assert oip.ServerReady(pb.ServerReadyRequest()).ready
    assert oip.ModelReady(pb.ModelReadyRequest(name="smartbin")).ready
    assert not oip.ModelReady(pb.ModelReadyRequest(name="other")).ready
    server = oip.ServerMetadata(pb.ServerMetadataRequest())
    assert server.name == "smartbin" and server.version == info.service_version
    metadata = oip.ModelMetadata(pb.ModelMetadataRequest(name="smartbin"))
    assert list(metadata.versions) == [info.model_version]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("image", "BYTES", [-1])
    ]
    labels = len(info.labels)
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("labels", "BYTES", [-1, labels]),
        ("scores", "FP32", [-1, labels]),
        ("unsure", "BOOL", [-1]),
    ]


def broken_raw() -> pb.ModelInferRequest:
    request = infer_request(b"x")
    request.raw_input_contents[0] = struct.pack("<I", 99) + b"short"
    return request


def two_inputs() -> pb.ModelInferRequest:
    request = infer_request(b"x")
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    return request


def wrong_shape() -> pb.ModelInferRequest:
    request = infer_request(b"x")
    request.inputs[0].shape[:] = [3]
    return request


def string_top_k() -> pb.ModelInferRequest:
    request = infer_request(b"x")
    request.parameters["top_k"].string_param = "two"
    return request


@pytest.mark.parametrize(
    ("request_of", "code", "says"),
    [
        (lambda: infer_request(b"not a photo"), "INVALID_ARGUMENT", "not a recognised image"),
        (lambda: pb.ModelInferRequest(model_name="smartbin"), "INVALID_ARGUMENT", "0 inputs"),
        (two_inputs, "INVALID_ARGUMENT", "2 inputs sent"),
        (broken_raw, "INVALID_ARGUMENT", "runs past the"),
        (wrong_shape, "INVALID_ARGUMENT", "has shape [3] but 1 photo(s)"),
        (string_top_k, "INVALID_ARGUMENT", "top_k is an int64"),
        (lambda: infer_request(b"x", model_name="other"), "NOT_FOUND", "serves one model"),
        (lambda: infer_request(b"x", model_version="v0"), "NOT_FOUND", "has no version 'v0'"),
    ],
    ids=["no photo", "no input", "two inputs", "raw", "shape", "top_k", "model", "version"],
)
def test_bad_requests_are_refused_saying_what_to_fix_and_counted(
    service: RunningService, oip: pb_grpc.GRPCInferenceServiceStub, request_of, code, says
) -> None:
    counted = f'smartbin_requests_total{{code="{code}",method="ModelInfer"}}'
    before = metric(service, counted)
    with pytest.raises(grpc.RpcError) as err:
        oip.ModelInfer(request_of())
    assert err.value.code().name == code
    assert says in err.value.details()
    assert metric(service, counted) == before + 1


def test_model_metadata_of_an_unknown_model_is_not_found(
    oip: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        oip.ModelMetadata(pb.ModelMetadataRequest(name="resnet"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'smartbin'" in err.value.details()
