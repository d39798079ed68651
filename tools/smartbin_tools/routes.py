"""The bin's routes that classify a photo, as calls to time side by side: gRPC ``Classify``, the
web port's ``POST /api/v1/classify``, and the Open Inference Protocol's ``ModelInfer`` over gRPC
and ``/v2/models/smartbin/infer`` over HTTP (its binary tensor extension, as tritonclient
sends it). Each call checks its answer, so a route that fails stops the measurement.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import yaml

from inference import grpc_predict_v2_pb2 as oip_pb2
from inference import grpc_predict_v2_pb2_grpc as oip_grpc
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

# The service's log line that names its web port.
WEB_PORT_LINE = re.compile(r"web port .* on https?://\S+:(\d+)")
# The routes, in the order the table shows them.
ROUTE_NAMES = {
    "grpc_classify": "gRPC Classify",
    "http_classify": "HTTP POST /api/v1/classify",
    "v2_grpc_infer": "v2 gRPC ModelInfer",
    "v2_http_infer": "v2 HTTP /v2/models/smartbin/infer",
}


@contextmanager
def web_config(config: Path | None) -> Iterator[Path]:
    """A smartbin-serve config file: ``config`` (if any) with the web port on, on a free
    loopback port."""
    settings = yaml.safe_load(config.read_text()) if config else {}
    settings = settings or {}
    settings["web"] = {**settings.get("web", {}), "enabled": True, "host": "127.0.0.1", "port": 0}
    with tempfile.TemporaryDirectory(prefix="smartbin-bench-") as folder:
        path = Path(folder) / "serve.yaml"
        path.write_text(yaml.safe_dump(settings))
        yield path


def web_port(log: list[str]) -> int:
    """The web port the service logged.

    Raises:
        RuntimeError: it logged none (the web port is off).
    """
    for line in log:
        match = WEB_PORT_LINE.search(line)
        if match:
            return int(match.group(1))
    raise RuntimeError("the service logged no web port: is web.enabled on in its config?")


class HttpRoute:
    """POSTs to one path of the web port over one kept-alive connection."""

    def __init__(self, port: int, path: str, headers: dict[str, str], body: bytes) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.connection.connect()
        # http.client sends a large body apart from its headers: without this, Nagle's
        # algorithm and the server's delayed ACK would add tens of ms to some calls.
        self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.path = path
        self.headers = headers
        self.body = body

    def __call__(self) -> bytes:
        self.connection.request("POST", self.path, self.body, self.headers)
        response = self.connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {self.path}: {response.status} {answer[:200]!r}")
        return answer

    def close(self) -> None:
        self.connection.close()


def v2_binary_body(jpeg: bytes) -> tuple[bytes, dict[str, str]]:
    """An infer request with the photo as binary data, and its headers (as tritonclient)."""
    raw = struct.pack("<I", len(jpeg)) + jpeg
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return header + raw, headers


@contextmanager
def route_calls(
    channel: grpc.Channel, port: int, jpeg: bytes
) -> Iterator[dict[str, Callable[[], object]]]:
    """Each route, as a call that classifies ``jpeg`` once."""
    classify = classifier_pb2_grpc.ClassifierStub(channel)
    oip = oip_grpc.GRPCInferenceServiceStub(channel)
    request = classifier_pb2.ClassifyRequest(image=jpeg)
    infer = oip_pb2.ModelInferRequest(model_name="smartbin")
    infer.inputs.add(name="image", datatype="BYTES", shape=[1])
    infer.raw_input_contents.append(struct.pack("<I", len(jpeg)) + jpeg)
    http_classify = HttpRoute(port, "/api/v1/classify", {"Content-Type": "image/jpeg"}, jpeg)
    body, headers = v2_binary_body(jpeg)
    http_infer = HttpRoute(port, "/v2/models/smartbin/infer", headers, body)
    try:
        yield {
            "grpc_classify": lambda: classify.Classify(request, timeout=30),
            "http_classify": http_classify,
            "v2_grpc_infer": lambda: oip.ModelInfer(infer, timeout=30),
            "v2_http_infer": http_infer,
        }
    finally:
        http_classify.close()
        http_infer.close()
