"""tritonclient, the Open Inference Protocol's best-known client, against a real bin over both
of its transports: gRPC on the bin's port and HTTP on its web port. It gets Classify's top
labels and scores for every sample photo, and a refusal it can read for a bad one.

tritonclient needs an older protobuf than the contract's, so it lives in .venv-clients (made by
`make test` from the `clients` dependency group) and runs as a child process
(oip_client.py beside this file)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import local_config, metric

from edge_service.const import DEFAULT_BUNDLE_DIR
from edge_service.server import RunningService, create_server
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
CLIENT = Path(__file__).with_name("oip_client.py")
PHOTOS = sorted((ROOT / "tests" / "data" / "photos").rglob("*.jpg"))


@pytest.fixture(scope="module")
def bin_service() -> Iterator[RunningService]:
    if not CLIENTS_PYTHON.exists():
        pytest.fail(f"{CLIENTS_PYTHON} is missing: `make .venv-clients/.installed` makes it")
    running = create_server(local_config(DEFAULT_BUNDLE_DIR, web={"enabled": True, "port": 0}))
    yield running
    running.stop(grace=1)


def ask(transport: str, service: RunningService, *args: str) -> dict:
    """What oip_client.py reports, run with tritonclient in .venv-clients."""
    port = service.port if transport == "grpc" else service.web_port
    done = subprocess.run(
        [str(CLIENTS_PYTHON), str(CLIENT), transport, f"127.0.0.1:{port}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def classify_answers(service: RunningService) -> list[classifier_pb2.ClassifyResponse]:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        return [stub.Classify(classifier_pb2.ClassifyRequest(image=p.read_bytes())) for p in PHOTOS]


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_infer_gets_classify_s_labels_and_scores_for_every_sample(
    bin_service: RunningService, transport: str
) -> None:
    report = ask(transport, bin_service, *map(str, PHOTOS))
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["metadata"]["inputs"][0]["name"] == "image"
    for i, answer in enumerate(classify_answers(bin_service)):
        assert report["labels"][i] == [p.label for p in answer.predictions], PHOTOS[i]
        assert report["scores"][i] == [p.score for p in answer.predictions], PHOTOS[i]
        assert report["unsure"][i] == answer.unsure
    assert report["model_version"] == answer.model_version


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_top_k_is_a_request_parameter(bin_service: RunningService, transport: str) -> None:
    report = ask(transport, bin_service, str(PHOTOS[0]), "--top-k", "2")
    best = classify_answers(bin_service)[0].predictions[:2]
    assert report["labels"] == [[p.label for p in best]]


@pytest.mark.parametrize(
    ("transport", "method", "status"),
    [("grpc", "ModelInfer", "StatusCode.INVALID_ARGUMENT"), ("http", "HTTP ModelInfer", "400")],
)
def test_a_file_that_is_no_photo_is_refused_and_counted(
    bin_service: RunningService, tmp_path: Path, transport: str, method: str, status: str
) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a photo")
    counted = f'smartbin_requests_total{{code="INVALID_ARGUMENT",method="{method}"}}'
    before = metric(bin_service, counted)
    report = ask(transport, bin_service, str(junk))
    assert str(report["error"]["status"]) == status
    assert "not a recognised image format" in report["error"]["message"]
    assert metric(bin_service, counted) == before + 1


@pytest.mark.parametrize(
    ("transport", "status"), [("grpc", "StatusCode.NOT_FOUND"), ("http", "404")]
)
def test_an_unknown_model_is_not_ready_and_not_found(
    bin_service: RunningService, transport: str, status: str
) -> None:
    report = ask(transport, bin_service, "--model", "resnet")
    assert report["live"] and not report["model_ready"]
    assert str(report["error"]["status"]) == status
    assert "this bin serves one model, 'smartbin'" in report["error"]["message"]
