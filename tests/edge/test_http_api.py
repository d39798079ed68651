"""The web port's HTTP/JSON API and the Open Inference Protocol's /v2 routes, called with httpx
against a real service: they answer what gRPC Classify answers, and refuse bad input with the
right status, the gRPC call's message, and a count in the same metrics."""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from helpers import Authority, local_config, metric, wait_for

from edge_service.server import RunningService, create_server
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

PHOTOS = sorted(Path(__file__).parents[1].joinpath("data", "photos").rglob("*.jpg"))
MAX_MESSAGE_BYTES = 512 * 1024


@pytest.fixture(scope="module")
def web(default_bundle: Path) -> Iterator[RunningService]:
    running = create_server(
        local_config(
            default_bundle,
            max_message_bytes=MAX_MESSAGE_BYTES,
            web={"enabled": True, "port": 0},
        )
    )
    yield running
    running.stop(grace=1)


@pytest.fixture(scope="module")
def http(web: RunningService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{web.web_port}", timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def classifier(web: RunningService) -> Iterator[classifier_pb2_grpc.ClassifierStub]:
    with grpc.insecure_channel(f"127.0.0.1:{web.port}") as channel:
        yield classifier_pb2_grpc.ClassifierStub(channel)


def grpc_answer(stub: classifier_pb2_grpc.ClassifierStub, photo: bytes) -> list[tuple[str, float]]:
    response = stub.Classify(classifier_pb2.ClassifyRequest(image=photo))
    return [(p.label, p.score) for p in response.predictions]


def grpc_error(stub: classifier_pb2_grpc.ClassifierStub, photo: bytes, top_k: int = 0) -> str:
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(classifier_pb2.ClassifyRequest(image=photo, top_k=top_k))
    return err.value.details()


def requests(web: RunningService, method: str, code: str) -> float:
    return metric(web, f'smartbin_requests_total{{code="{code}",method="{method}"}}')


def refusals(web: RunningService, method: str, reason: str) -> float:
    return metric(web, f'smartbin_refusals_total{{method="{method}",reason="{reason}"}}')


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
def test_classify_as_body_and_as_multipart_answers_what_grpc_classify_answers(
    http: httpx.Client, classifier: classifier_pb2_grpc.ClassifierStub, photo: Path
) -> None:
    data = photo.read_bytes()
    expected = grpc_answer(classifier, data)
    as_body = http.post(
        "/api/v1/classify", content=data, headers={"content-type": "image/jpeg"}
    ).json()
    as_field = http.post(
        "/api/v1/classify", files={"image": (photo.name, data, "image/jpeg")}
    ).json()
    for answer in (as_body, as_field):
        assert [(p["label"], p["score"]) for p in answer["predictions"]] == expected
    assert as_body["model_version"] and as_body["timings"]["inference_seconds"] > 0


def test_top_k_keeps_the_best_labels(
    http: httpx.Client, classifier: classifier_pb2_grpc.ClassifierStub
) -> None:
    data = PHOTOS[0].read_bytes()
    answer = http.post("/api/v1/classify", params={"top_k": 2}, content=data).json()
    assert [(p["label"], p["score"]) for p in answer["predictions"]] == grpc_answer(
        classifier, data
    )[:2]


def test_model_info_and_health_describe_the_served_model(
    http: httpx.Client, classifier: classifier_pb2_grpc.ClassifierStub
) -> None:
    info = classifier.GetModelInfo(classifier_pb2.GetModelInfoRequest())
    model = http.get("/api/v1/model").json()
    assert model["labels"] == list(info.labels)
    assert (model["model_version"], model["model_sha256"]) == (
        info.model_version,
        info.model_sha256,
    )
    assert model["manifest"]["version"] == info.model_version
    health = http.get("/api/v1/health")
    assert health.status_code == 200
    assert health.json() == {"status": "SERVING", "model_version": info.model_version}


def test_a_file_that_is_no_photo_gets_400_with_classify_s_message_and_is_counted(
    web: RunningService, http: httpx.Client, classifier: classifier_pb2_grpc.ClassifierStub
) -> None:
    before = requests(web, "HTTP Classify", "INVALID_ARGUMENT")
    response = http.post("/api/v1/classify", content=b"not a photo at all")
    assert response.status_code == 400
    assert response.json() == {
        "error": grpc_error(classifier, b"not a photo at all"),
        "code": "INVALID_ARGUMENT",
    }
    assert requests(web, "HTTP Classify", "INVALID_ARGUMENT") == before + 1


@pytest.mark.parametrize(
    ("send", "says"),
    [
        ({"params": {"top_k": 7}}, "top_k is 7 but the model has 6 labels"),
        ({"params": {"top_k": -1}}, "top_k: Input should be greater than or equal to 0"),
        ({"params": {"top_k": "many"}}, "top_k: Input should be a valid integer"),
        ({"content": b""}, "the request has no photo"),
        ({"files": {"photo": ("a.jpg", b"x")}}, "the multipart body has no file field 'image'"),
        (
            {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}},
            "the multipart body does not parse",
        ),
    ],
    ids=["top_k over labels", "negative top_k", "top_k not a number", "empty", "no image", "bad"],
)
def test_bad_requests_get_400_saying_what_to_fix_and_are_counted(
    web: RunningService, http: httpx.Client, send: dict, says: str
) -> None:
    before = requests(web, "HTTP Classify", "INVALID_ARGUMENT")
    if "files" not in send:
        send.setdefault("content", PHOTOS[0].read_bytes())
    response = http.post("/api/v1/classify", **send)
    assert response.status_code == 400
    assert says in response.json()["error"]
    assert requests(web, "HTTP Classify", "INVALID_ARGUMENT") == before + 1


def test_a_body_over_max_message_bytes_gets_413_and_is_counted(
    web: RunningService, http: httpx.Client
) -> None:
    before = refusals(web, "HTTP Classify", "message_too_large")
    too_large = b"\xff" * (MAX_MESSAGE_BYTES + 1)
    for body in (too_large, iter([too_large])):  # with a Content-Length, and chunked
        response = http.post("/api/v1/classify", content=body)
        assert response.status_code == 413
        assert response.json()["code"] == "RESOURCE_EXHAUSTED"
        assert "max_message_bytes" in response.json()["error"]
    assert refusals(web, "HTTP Classify", "message_too_large") == before + 2
    assert requests(web, "HTTP Classify", "RESOURCE_EXHAUSTED") >= 2


def test_an_unknown_route_is_404_and_counted(web: RunningService, http: httpx.Client) -> None:
    before = requests(web, "HTTP unknown route", "NOT_FOUND")
    response = http.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["code"] == "NOT_FOUND"
    assert requests(web, "HTTP unknown route", "NOT_FOUND") == before + 1


def v2_request(photos: list[bytes], **extra: object) -> dict:
    return {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [len(photos)],
                "data": [base64.b64encode(p).decode() for p in photos],
            }
        ],
        **extra,
    }


def test_v2_infer_in_json_answers_what_classify_answers(
    http: httpx.Client, classifier: classifier_pb2_grpc.ClassifierStub
) -> None:
    photos = [p.read_bytes() for p in PHOTOS]
    answer = http.post("/v2/models/smartbin/infer", json=v2_request(photos, id="7")).json()
    outputs = {o["name"]: o for o in answer["outputs"]}
    labels = len(outputs["labels"]["data"]) // len(photos)
    assert outputs["scores"]["shape"] == [len(photos), labels]
    assert answer["id"] == "7"
    for i, photo in enumerate(photos):
        row = slice(i * labels, (i + 1) * labels)
        got = list(zip(outputs["labels"]["data"][row], outputs["scores"]["data"][row], strict=True))
        assert got == grpc_answer(classifier, photo)


def test_v2_metadata_and_readiness(http: httpx.Client) -> None:
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get("/v2").json()["name"] == "smartbin"
    metadata = http.get("/v2/models/smartbin").json()
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in metadata["outputs"]] == ["labels", "scores", "unsure"]
    version = metadata["versions"][0]
    assert http.get(f"/v2/models/smartbin/versions/{version}/ready").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v2/models/other/infer", v2_request([b"x"]), 404, "this bin serves one model"),
        ("/v2/models/smartbin/versions/old/infer", v2_request([b"x"]), 404, "has no version"),
        ("/v2/models/smartbin/infer", {"inputs": "no"}, 400, "not an inference request"),
        ("/v2/models/smartbin/infer", b"{", 400, "is not JSON"),
        (
            "/v2/models/smartbin/infer",
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]},
            400,
            "is not a photo in base64",
        ),
        (
            "/v2/models/smartbin/infer",
            {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}]},
            400,
            "the model has no input 'pixels'",
        ),
        (
            "/v2/models/smartbin/infer",
            {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": ["eA=="]}]},
            400,
            "is BYTES",
        ),
        ("/v2/models/smartbin/infer", v2_request([b"no photo"]), 400, "not a recognised image"),
        (
            "/v2/models/smartbin/infer",
            v2_request([b"x"], outputs=[{"name": "logits"}]),
            400,
            "the model has no output 'logits'",
        ),
    ],
    ids=[
        "model",
        "version",
        "schema",
        "json",
        "base64",
        "input name",
        "datatype",
        "no photo",
        "output",
    ],
)
def test_v2_infer_refuses_bad_requests_with_a_status_and_a_count(
    web: RunningService, http: httpx.Client, path: str, body: object, status: int, says: str
) -> None:
    code = "NOT_FOUND" if status == 404 else "INVALID_ARGUMENT"
    before = requests(web, "HTTP ModelInfer", code)
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status
    assert says in response.json()["error"]
    assert requests(web, "HTTP ModelInfer", code) == before + 1


def test_openapi_describes_every_route(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/classify", "/api/v1/model", "/api/v1/health", "/v2/models/{name}/infer"):
        assert path in paths
    assert "multipart/form-data" in paths["/api/v1/classify"]["post"]["requestBody"]["content"]
    assert http.get("/docs").status_code == 200


def test_the_web_port_is_off_unless_configured(service: RunningService) -> None:
    assert service.web is None and service.web_port is None


def test_the_web_port_serves_https_with_the_configured_certificate(
    default_bundle: Path, tmp_path: Path
) -> None:
    ca = Authority(tmp_path, "web-ca")
    server = ca.issue("bin", server=True)
    running = create_server(
        local_config(
            default_bundle,
            web={"enabled": True, "port": 0, "tls": {"cert": server.cert, "key": server.key}},
        )
    )
    try:
        url = f"https://127.0.0.1:{running.web_port}/api/v1/health"
        trusted = ssl.create_default_context(cafile=ca.cert_path)
        assert httpx.get(url, verify=trusted).json()["status"] == "SERVING"
        with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer
            httpx.get(url.replace("https:", "http:"), timeout=5)
    finally:
        running.stop(grace=1)
    with pytest.raises(httpx.ConnectError):  # stopped with the service
        httpx.get(url, verify=trusted, timeout=5)


def test_unusable_web_tls_files_stop_the_start_with_a_message(
    default_bundle: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    config = local_config(
        default_bundle, web={"enabled": True, "port": 0, "tls": {"cert": bad, "key": bad}}
    )
    with pytest.raises(ValueError, match="web.tls.cert .* are not a valid PEM certificate"):
        create_server(config)
    with pytest.raises(ValueError, match="cannot read web.tls.key"):
        create_server(
            local_config(
                default_bundle,
                web={"enabled": True, "port": 0, "tls": {"cert": bad, "key": tmp_path / "none"}},
            )
        )


@pytest.fixture
def tight(default_bundle: Path, request: pytest.FixtureRequest) -> Iterator[RunningService]:
    """A service with one worker and one open web call allowed; request_timeout_seconds is the
    test's parameter (0.5 s unless given)."""
    running = create_server(
        local_config(
            default_bundle,
            max_workers=1,
            max_watchers=0,
            max_health_watchers=0,
            max_concurrent_rpcs=1,
            request_timeout_seconds=getattr(request, "param", 0.5),
            web={"enabled": True, "port": 0},
        )
    )
    yield running
    running.stop(grace=1)


def test_the_web_port_waits_for_the_workers_grpc_calls_hold(tight: RunningService) -> None:
    """max_workers counts gRPC and HTTP classifications together: with the one worker held by a
    gRPC call, an HTTP call waits request_timeout_seconds, then gets 503, counted."""
    photo = PHOTOS[0].read_bytes()
    interpreters = tight.runtime.models.current._idle
    held = interpreters.get()  # the gRPC call below stops just before inference
    with (
        grpc.insecure_channel(f"127.0.0.1:{tight.port}") as channel,
        futures.ThreadPoolExecutor(1) as caller,
    ):
        try:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            call = caller.submit(stub.Classify, classifier_pb2.ClassifyRequest(image=photo))
            wait_for(lambda: metric(tight, "smartbin_in_flight_requests") == 1)
            url = f"http://127.0.0.1:{tight.web_port}/api/v1/classify"
            response = httpx.post(url, content=photo, timeout=30)
        finally:
            interpreters.put(held)
        assert call.result(timeout=30).predictions
    assert response.status_code == 503
    assert "all 1 workers (max_workers) stayed busy for 0.5 s" in response.json()["error"]
    assert refusals(tight, "HTTP Classify", "worker_wait") == 1
    assert requests(tight, "HTTP Classify", "UNAVAILABLE") == 1


@pytest.mark.parametrize("tight", [30.0], indirect=True)
def test_calls_beyond_max_concurrent_rpcs_get_429_and_are_counted(tight: RunningService) -> None:
    with socket.create_connection(("127.0.0.1", tight.web_port)) as slow:
        # A call that sends half its photo and waits: it holds the one place.
        slow.sendall(
            b"POST /api/v1/classify HTTP/1.1\r\nHost: bin\r\nContent-Length: 1000\r\n\r\nhalf"
        )
        url = f"http://127.0.0.1:{tight.web_port}/api/v1/model"
        wait_for(lambda: httpx.get(url).status_code == 429)
        response = httpx.get(url)
    assert response.json()["code"] == "RESOURCE_EXHAUSTED"
    assert "max_concurrent_rpcs" in response.json()["error"]
    assert refusals(tight, "HTTP GetModelInfo", "max_concurrent_rpcs") >= 2
    assert requests(tight, "HTTP GetModelInfo", "RESOURCE_EXHAUSTED") >= 2
    wait_for(lambda: httpx.get(url).status_code == 200)  # the place is free once it leaves


def test_a_body_that_comes_too_slowly_gets_408_and_is_counted(tight: RunningService) -> None:
    with socket.create_connection(("127.0.0.1", tight.web_port)) as slow:
        slow.sendall(
            b"POST /api/v1/classify HTTP/1.1\r\nHost: bin\r\nContent-Length: 1000\r\n\r\nhalf"
        )
        slow.settimeout(10)
        answer = b""
        while not answer.endswith(b"}"):  # the answer, after request_timeout_seconds (0.5 s)
            chunk = slow.recv(4096)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"request_timeout_seconds" in answer
    assert refusals(tight, "HTTP Classify", "request_timeout") == 1
    assert requests(tight, "HTTP Classify", "CANCELLED") == 1
