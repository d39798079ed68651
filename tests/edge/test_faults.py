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
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ADMIN_LINE, PHOTOS, copy_bundle, metric, scrape, slow_png, wait_for

from smartbin.bundle import Bundle
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc
from smartbin_tools.service import spawn_service

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


def files_under(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


def test_sigterm_drains_calls_in_flight_and_exits_0(default_bundle: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    bundle_files = files_under(default_bundle)
    # Room to decode the slow photos side by side (the default budget takes them one by one).
    config = write_config(
        tmp_path, default_bundle, grace_seconds=GRACE_SECONDS, decode_budget_bytes=2**30
    )
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
            while metric(server, "smartbin_in_flight_requests ") < 2:
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
    assert files_under(default_bundle) == bundle_files


def test_sigterm_with_nothing_in_flight_exits_0_at_once(
    default_bundle: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, default_bundle, grace_seconds=GRACE_SECONDS)
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
    default_bundle: Path, tmp_path: Path, flag: str, what: str
) -> None:
    config = write_config(tmp_path, default_bundle, port=0, metrics_port=0)
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
    default_bundle: Path, tmp_path: Path, damage: Callable[[Path], None], fragment: str
) -> None:
    bundle = Path(shutil.copytree(default_bundle, tmp_path / "bundle"))
    damage(bundle)
    config = write_config(tmp_path, bundle, port=0, metrics_port=0)
    result = run_serve(["--config", str(config)], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("smartbin-serve: ")
    assert fragment in result.stderr
    assert "serving model" not in result.stderr


CAMERA_HEALTH = "smartbin.v1.Camera"


class Load:
    """Classify calls from a few threads for as long as a test runs, as a bin's callers would."""

    def __init__(self, channel: grpc.Channel, image: bytes, threads: int = 2) -> None:
        self.stub = classifier_pb2_grpc.ClassifierStub(channel)
        self.request = classifier_pb2.ClassifyRequest(image=image)
        self.codes: list[grpc.StatusCode] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.versions.add(self.stub.Classify(self.request, timeout=30).model_version)
                self.codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                self.codes.append(err.code())

    def stop(self) -> list[grpc.StatusCode]:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        return self.codes


class Events:
    """A WatchEvents stream read on a thread, as a bin's display would."""

    def __init__(self, stub: classifier_pb2_grpc.ClassifierStub) -> None:
        self.received: list[classifier_pb2.ClassificationEvent] = []
        self.ended = threading.Event()
        self.stream = stub.WatchEvents(classifier_pb2.WatchEventsRequest())
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                self.received.append(event)
        except grpc.RpcError:
            pass
        self.ended.set()


def a_photo() -> bytes:
    return sorted(PHOTOS.rglob("*.jpg"))[0].read_bytes()


def test_camera_unplugged_and_replugged_under_load_loses_no_event(
    default_bundle: Path, tmp_path: Path
) -> None:
    camera = tmp_path / "camera"
    camera.mkdir()
    for i, path in enumerate(sorted(PHOTOS.rglob("*.jpg"))[:3]):
        shutil.copy(path, camera / f"{i:02d}.jpg")
    data, workdir = tmp_path / "data", tmp_path / "cwd"
    workdir.mkdir()
    untouched = {folder: files_under(folder) for folder in (default_bundle, camera)}
    config = write_config(
        tmp_path,
        default_bundle,
        grace_seconds=GRACE_SECONDS,
        confidence_threshold=1.0,  # every answer unsure: the service keeps every photo it may
        unsure_images={"folder": str(data), "max_files": 20},
        camera={
            "type": "replay",
            "folder": str(camera),
            "frame_interval_seconds": 0.03,
            "retry_min_seconds": 0.05,
            "retry_max_seconds": 0.2,
        },
    )
    server = spawn_service(["--config", str(config)], cwd=workdir)
    channel = grpc.insecure_channel(server.target)
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    health = health_pb2_grpc.HealthStub(channel)

    def camera_health() -> int:
        request = health_pb2.HealthCheckRequest(service=CAMERA_HEALTH)
        return health.Check(request, timeout=5).status

    try:
        events = Events(stub)
        load = Load(channel, a_photo())
        wait_for(lambda: camera_health() == health_pb2.HealthCheckResponse.SERVING, timeout=20)
        before = stub.Capture(classifier_pb2.CaptureRequest(), timeout=10)

        unplugged = camera.rename(tmp_path / "unplugged")
        wait_for(lambda: camera_health() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=20)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Capture(classifier_pb2.CaptureRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "camera is down" in caught.value.details()
        overall = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert overall == health_pb2.HealthCheckResponse.SERVING

        unplugged.rename(camera)
        wait_for(lambda: camera_health() == health_pb2.HealthCheckResponse.SERVING, timeout=20)
        after = stub.Capture(classifier_pb2.CaptureRequest(), timeout=10)
        wait_for(lambda: len(events.received) >= 2, timeout=20)
        codes = load.stop()

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(GRACE_SECONDS + 10) == 0, "\n".join(server.log)
        assert events.ended.wait(5)
    finally:
        channel.close()
        server.stop()
    assert [e.event_id for e in events.received] == [before.event_id, after.event_id]
    assert after.event_id == before.event_id + 1
    assert all(e.missed_events == 0 for e in events.received)
    assert codes and set(codes) == {grpc.StatusCode.OK}, f"{len(codes)} calls: {set(codes)}"
    # The only files it wrote are the unsure photos, in its data folder.
    assert 0 < len(list(data.iterdir())) <= 20
    assert not any(workdir.iterdir())
    assert {folder: files_under(folder) for folder in untouched} == untouched


def half_copied(source: Path, target: Path, damage: Callable[[Path], None]) -> Path:
    bundle = Path(shutil.copytree(source, target))
    damage(bundle)
    return bundle


def test_damaged_bundles_offered_for_reload_are_refused_under_load(
    default_bundle: Path, default_loaded: Bundle, tmp_path: Path
) -> None:
    config = write_config(tmp_path, default_bundle, reload_dirs=[str(tmp_path)])
    server = spawn_service(["--config", str(config)], cwd=tmp_path)
    channel = grpc.insecure_channel(server.target)
    # ReloadModel goes to the admin listener, whose port the service logs before it serves.
    (admin_target,) = (m[1] for m in map(ADMIN_LINE.search, server.log) if m)
    admin_channel = grpc.insecure_channel(admin_target)
    stub = classifier_pb2_grpc.ClassifierStub(admin_channel)
    try:
        load = Load(channel, a_photo())
        offers = [
            (truncate_model, "the bundle is corrupt or incomplete"),
            (truncate_manifest, "is not valid JSON"),
            (half_model_with_matching_checksum, "is not a model the TFLite interpreter can run"),
            (empty_folder, "not found: is"),
        ]
        for n, (damage, reason) in enumerate(offers):
            offered = half_copied(default_bundle, tmp_path / f"offer-{n}", damage)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ReloadModel(
                    classifier_pb2.ReloadModelRequest(bundle_path=str(offered)), timeout=60
                )
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert reason in caught.value.details()
            assert f"model {default_loaded.version} keeps serving" in caught.value.details()
        # The copy completes: the same offer now goes through.
        complete = copy_bundle(default_bundle, tmp_path / "complete", version="v2")
        reply = stub.ReloadModel(
            classifier_pb2.ReloadModelRequest(bundle_path=str(complete)), timeout=60
        )
        assert reply.model_version == "v2"
        wait_for(lambda: "v2" in load.versions, timeout=20)
        codes = load.stop()
        metrics = scrape(server)
        assert server.stop() == 0
    finally:
        channel.close()
        admin_channel.close()
        server.stop()
    assert codes and set(codes) == {grpc.StatusCode.OK}, f"{len(codes)} calls: {set(codes)}"
    assert load.versions == {default_loaded.version, "v2"}
    assert f'smartbin_model_reloads_total{{outcome="failed"}} {float(len(offers))}' in metrics
    assert 'smartbin_model_reloads_total{outcome="success"} 1.0' in metrics
