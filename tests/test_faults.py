"""Faults a bin meets in the field, each against a real ``smartbin-serve`` process."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import slow_png
from grpc_health.v1 import health_pb2, health_pb2_grpc
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

from edge_service.loadgen import ServiceProcess, spawn_service

GRACE_SECONDS = 8.0
SLOW_CALLS = 4


def write_config(folder: Path, bundle: Path, **settings: object) -> Path:
    path = folder / "smartbin.yaml"
    config = {
        "bundle": str(bundle),
        "host": "127.0.0.1",
        "metrics_host": "127.0.0.1",
        "num_threads": 1,
        **settings,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_serve(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``smartbin-serve`` expecting it to give up at start."""
    return subprocess.run(
        [sys.executable, "-m", "edge_service.server", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def in_flight(server: ServiceProcess) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith("smartbin_in_flight_requests "):
            return float(line.split()[1])
    return 0.0


def files_under(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


def test_sigterm_drains_calls_in_flight_and_exits_0(tiny_bundle: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    bundle_files = files_under(tiny_bundle)
    config = write_config(tmp_path, tiny_bundle, grace_seconds=GRACE_SECONDS)
    server = spawn_service(["--config", str(config)], cwd=workdir)
    image = slow_png()
    try:
        channel = grpc.insecure_channel(server.target)
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        statuses: list[int] = []
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        not_serving = threading.Event()

        def follow_health() -> None:
            try:
                for reply in watch:
                    statuses.append(reply.status)
                    if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        not_serving.set()
            except grpc.RpcError:
                pass  # cancelled below, or cut when the server closes

        threading.Thread(target=follow_health, daemon=True).start()
        with futures.ThreadPoolExecutor(SLOW_CALLS) as pool:
            calls = [
                pool.submit(stub.Classify, classifier_pb2.ClassifyRequest(image=image), timeout=60)
                for _ in range(SLOW_CALLS)
            ]
            deadline = time.monotonic() + 30
            while in_flight(server) < 2:
                assert time.monotonic() < deadline, "calls never got in flight"
                assert not any(call.done() for call in calls)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)

            assert not_serving.wait(10), f"health never turned NOT_SERVING: {statuses}"
            assert not all(call.done() for call in calls), "calls ended before health changed"
            watch.cancel()  # a watcher that has its answer leaves
            time.sleep(0.2)  # the server stops taking calls right after it changes health
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(classifier_pb2.ClassifyRequest(image=image), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            answers = [call.result() for call in calls]
        assert all(answer.predictions for answer in answers)
        exit_code = server.process.wait(GRACE_SECONDS + 10)
        stopped_after = time.monotonic() - signalled
        channel.close()
    finally:
        server.stop()
    assert exit_code == 0, "\n".join(server.log)
    assert stopped_after < GRACE_SECONDS, f"took {stopped_after:.1f} s to stop"
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    log = "\n".join(server.log)
    assert "draining calls in flight" in log and "stopped" in log
    # It wrote nothing: not where it was started, not in its bundle.
    assert not any(workdir.iterdir())
    assert files_under(tiny_bundle) == bundle_files


def test_sigterm_with_nothing_in_flight_exits_0_at_once(tiny_bundle: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_bundle, grace_seconds=GRACE_SECONDS)
    server = spawn_service(["--config", str(config)], cwd=tmp_path)
    signalled = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - signalled < GRACE_SECONDS / 2


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("flag, what", [("--metrics-port", "metrics"), ("--port", "gRPC")])
def test_a_taken_port_stops_start_with_a_clear_error(
    tiny_bundle: Path, tmp_path: Path, flag: str, what: str
) -> None:
    config = write_config(tmp_path, tiny_bundle, port=0, metrics_port=0)
    with listening_socket() as taken:
        port = taken.getsockname()[1]
        result = run_serve(["--config", str(config), flag, str(port)], tmp_path)
    assert result.returncode != 0
    assert f"cannot bind {what} port 127.0.0.1:{port}" in result.stderr
    assert "serving model" not in result.stderr


def truncate_model(bundle: Path) -> None:
    model = bundle / "model.tflite"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])


def truncate_manifest(bundle: Path) -> None:
    manifest = bundle / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])


def half_model_with_matching_checksum(bundle: Path) -> None:
    """A half-copied model whose manifest was re-hashed: only the interpreter can tell."""
    truncate_model(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["model"]["sha256"] = hashlib.sha256((bundle / "model.tflite").read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def empty_folder(bundle: Path) -> None:
    for path in bundle.iterdir():
        path.unlink()


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (truncate_model, "the bundle is corrupt or incomplete"),
        (truncate_manifest, "is not valid JSON"),
        (half_model_with_matching_checksum, "is not a model the TFLite interpreter can run"),
        (empty_folder, "not found: is"),
    ],
    ids=["truncated-model", "truncated-manifest", "half-model-rehashed", "empty-folder"],
)
def test_a_damaged_bundle_is_refused_at_start(
    tiny_bundle: Path, tmp_path: Path, damage: Callable[[Path], None], fragment: str
) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    damage(bundle)
    config = write_config(tmp_path, bundle, port=0, metrics_port=0)
    result = run_serve(["--config", str(config)], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("smartbin-serve: ")
    assert fragment in result.stderr
    assert "serving model" not in result.stderr
