"""Overload and hostile callers: photos that decode to far more than they weigh, calls that never
send their request, refusals counted, a stop with work still running, and what the operator
sees (health List, /metrics, the log).

The memory and stop checks run against a real ``smartbin-serve`` process; the others against a
real server in this process. docs/hardening.md has the figures these checks stand for.
"""

from __future__ import annotations

import io
import json
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ADMIN_LINE, PHOTOS, free_port, local_config, metric, scrape, wait_for
from PIL import Image

from edge_service.server import RunningService, create_server
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc
from smartbin_tools import loadgen
from smartbin_tools.service import ServiceProcess, spawn_service

CLASSIFY = "/smartbin.v1.Classifier/Classify"
MB = 1_000_000
# The real process's decode budget: small, so that a few modest photos fill it.
BUDGET = 40 * MB
# An RGBA PNG decodes to 4 bytes a pixel and is composited on white (4 more).
FITS_SIDE = 1700  # about 29 MB to decode: one at a time fits the budget, two do not
TOO_LARGE_SIDE = 2400  # about 52 MB: more than the whole budget
SERVED_AT_ONCE = 6


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def rgba_png(side: int) -> bytes:
    """A flat half-transparent square: a few kB that decode to 8 bytes a pixel."""
    return encode(Image.new("RGBA", (side, side), (10, 200, 30, 128)), "PNG")


def slow_bmp(side: int = 2000) -> bytes:
    """A run-length BMP of one-pixel runs (7.6 MB for 2000 x 2000): Pillow decodes it in Python,
    for seconds."""
    row = bytes([1, 7]) * side + b"\x00\x00"
    pixels = row * side + b"\x00\x01"
    palette = b"".join(bytes([i, 255 - i, i // 2, 0]) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return header + info + palette + pixels


def a_photo() -> bytes:
    return sorted(PHOTOS.rglob("*.jpg"))[0].read_bytes()


def classify(channel: grpc.Channel, image: bytes, timeout: float = 30) -> grpc.StatusCode:
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    try:
        stub.Classify(classifier_pb2.ClassifyRequest(image=image), timeout=timeout)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status figure (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def write_config(folder: Path, bundle: Path, **settings: object) -> Path:
    path = folder / "smartbin.yaml"
    path.write_text(yaml.safe_dump({"bundle": str(bundle), "num_threads": 1, **settings}))
    return path


@pytest.fixture(scope="module")
def bin_process(
    default_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """A real service with a small decode budget and a camera that is not there (its folder
    is missing), retried every 50 ms."""
    folder = tmp_path_factory.mktemp("overload")
    camera = {
        "type": "replay",
        "folder": str(folder / "unplugged"),
        "retry_min_seconds": 0.05,
        "retry_max_seconds": 0.05,
    }
    config = write_config(
        folder, default_bundle, decode_budget_bytes=BUDGET, decode_wait_seconds=30, camera=camera
    )
    server = spawn_service(["--config", str(config)])
    try:
        yield server
    finally:
        server.stop()


def test_decoding_is_held_to_the_memory_budget(bin_process: ServiceProcess) -> None:
    pid = bin_process.process.pid
    with grpc.insecure_channel(bin_process.target) as channel:
        assert classify(channel, a_photo()) == grpc.StatusCode.OK  # warm
        # Alone more than the whole budget: refused from its header, without decoding it.
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Classify(classifier_pb2.ClassifyRequest(image=rgba_png(TOO_LARGE_SIDE)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = refused.value.details()
        assert f"a {TOO_LARGE_SIDE}x{TOO_LARGE_SIDE} RGBA PNG" in details
        assert "decode budget of 40 MB (decode_budget_bytes)" in details
        assert time.monotonic() - started < 1.0
        # Photos that fit one at a time: all served, one after the other, within the budget.
        photo = rgba_png(FITS_SIDE)
        rss_before = proc_status(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # start VmHWM afresh
        with futures.ThreadPoolExecutor(SERVED_AT_ONCE) as pool:
            codes = list(pool.map(lambda image: classify(channel, image), [photo] * SERVED_AT_ONCE))
        peak = proc_status(pid, "VmHWM") - rss_before
    assert codes == [grpc.StatusCode.OK] * SERVED_AT_ONCE
    # Side by side they would have held 6 x 29 MB; the slack is the service's own (threads,
    # gRPC buffers), not photos.
    assert peak < BUDGET + 30 * MB, f"peak {peak / MB:.0f} MB above the start"
    # The memory goes back to the system once the photos are done.
    wait_for(lambda: proc_status(pid, "VmRSS") < rss_before + 15 * MB, timeout=5)
    assert metric(bin_process, "smartbin_decode_budget_bytes") == BUDGET
    assert metric(bin_process, "smartbin_decode_reserved_bytes") == 0
    exceeded = 'smartbin_refusals_total{method="Classify",reason="decode_budget_exceeded"}'
    assert metric(bin_process, exceeded) == 1


def test_photos_that_find_the_budget_taken_wait_then_are_told_to_retry(
    default_bundle: Path,
) -> None:
    running = create_server(
        local_config(default_bundle, decode_budget_bytes=BUDGET, decode_wait_seconds=0.05)
    )
    photo = rgba_png(2000)  # about 38 MB: one at a time, and longer to decode than the wait
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
            futures.ThreadPoolExecutor(4) as pool,
        ):
            codes = list(pool.map(lambda image: classify(channel, image), [photo] * 4))
        text = scrape(running)
    finally:
        running.stop(grace=1)
    assert grpc.StatusCode.OK in codes
    busy = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert busy and busy + codes.count(grpc.StatusCode.OK) == 4, codes
    assert f'{{method="Classify",reason="decode_budget_busy"}} {float(busy)}' in text
    assert f'{{code="RESOURCE_EXHAUSTED",method="Classify"}} {float(busy)}' in text


class WithheldCalls:
    """Classify calls on a connection of their own that never send their request message."""

    def __init__(self, target: str, count: int) -> None:
        # A channel of its own pool has a connection of its own.
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self._release = threading.Event()
        call = self.channel.stream_unary(CLASSIFY)
        self.calls = [call.future(self._never(), timeout=60) for _ in range(count)]

    def _never(self) -> Iterator[bytes]:
        self._release.wait()
        return
        yield b""  # a generator that ends without a message

    def close(self) -> None:
        for call in self.calls:
            call.cancel()
        self._release.set()
        self.channel.close()


@pytest.fixture
def stall_service(default_bundle: Path, request: pytest.FixtureRequest) -> Iterator[RunningService]:
    running = create_server(local_config(default_bundle, **getattr(request, "param", {})))
    yield running
    running.stop(grace=0)


@pytest.mark.parametrize("stall_service", [{"request_timeout_seconds": 60}], indirect=True)
def test_a_client_that_withholds_its_requests_locks_no_one_out(
    stall_service: RunningService,
) -> None:
    target = f"127.0.0.1:{stall_service.port}"
    withheld = WithheldCalls(target, 64)
    try:
        # One connection holds max_calls_per_connection (16) calls; the rest wait in its client.
        wait_for(lambda: metric(stall_service, "smartbin_open_calls") == 16, timeout=10)
        started = time.monotonic()
        with grpc.insecure_channel(target) as other:
            health = health_pb2_grpc.HealthStub(other)
            check = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            assert classify(other, a_photo(), timeout=5) == grpc.StatusCode.OK
        assert time.monotonic() - started < 5
        assert not any(call.done() for call in withheld.calls)
        assert metric(stall_service, "smartbin_open_calls") == 16
    finally:
        withheld.close()


@pytest.mark.parametrize("stall_service", [{"request_timeout_seconds": 0.5}], indirect=True)
def test_a_call_that_never_sends_its_request_is_cancelled(stall_service: RunningService) -> None:
    withheld = WithheldCalls(f"127.0.0.1:{stall_service.port}", 1)
    try:
        with pytest.raises(grpc.RpcError) as ended:
            withheld.calls[0].result(timeout=10)
        assert ended.value.code() == grpc.StatusCode.CANCELLED
    finally:
        withheld.close()
    timeout = 'smartbin_refusals_total{method="Classify",reason="request_timeout"}'
    wait_for(lambda: metric(stall_service, timeout) == 1)
    wait_for(lambda: metric(stall_service, "smartbin_open_calls") == 0)
    cancelled = 'smartbin_requests_total{code="CANCELLED",method="Classify"}'
    assert metric(stall_service, cancelled) == 1


@pytest.mark.parametrize(
    "stall_service",
    [{"max_concurrent_rpcs": 2, "max_message_bytes": 64 * 1024, "request_timeout_seconds": 60}],
    indirect=True,
)
def test_refusals_grpc_would_make_unseen_are_counted(stall_service: RunningService) -> None:
    target = f"127.0.0.1:{stall_service.port}"
    with grpc.insecure_channel(target) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as too_large:
            stub.Classify(classifier_pb2.ClassifyRequest(image=b"\xff" * 100_000), timeout=10)
        assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in too_large.value.details()
        withheld = WithheldCalls(target, 2)  # both places
        try:
            wait_for(lambda: metric(stall_service, "smartbin_open_calls") == 2)
            with pytest.raises(grpc.RpcError) as full:
                stub.Classify(classifier_pb2.ClassifyRequest(image=a_photo()), timeout=10)
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "Concurrent RPC limit exceeded" in full.value.details()
            # Health checks have places of their own.
            health = health_pb2_grpc.HealthStub(channel)
            check = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            withheld.close()
    text = scrape(stall_service)
    for reason in ("message_too_large", "max_concurrent_rpcs"):
        assert f'smartbin_refusals_total{{method="Classify",reason="{reason}"}} 1.0' in text
    # In the count the error-rate alert reads, with the code the callers got.
    assert 'smartbin_requests_total{code="RESOURCE_EXHAUSTED",method="Classify"} 2.0' in text


def test_the_operator_sees_process_figures_and_each_repeated_error_once(
    bin_process: ServiceProcess,
) -> None:
    # The camera's folder is missing and it is retried every 50 ms.
    wait_for(lambda: metric(bin_process, "smartbin_camera_errors_total") >= 10, timeout=10)
    unavailable = [line for line in bin_process.log if "camera unavailable" in line]
    assert len(unavailable) == 1, unavailable
    text = scrape(bin_process)
    for name in ("resident_memory_bytes", "cpu_seconds_total", "start_time_seconds", "open_fds"):
        assert f"\nprocess_{name} " in text
    assert metric(bin_process, "process_resident_memory_bytes") > 50 * MB
    # grpc.health.v1.Health/List, which reflection lists, answers every health name.
    with grpc.insecure_channel(bin_process.target) as channel:
        listed = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)
    status = health_pb2.HealthCheckResponse
    assert {name: s.status for name, s in listed.statuses.items()} == {
        "": status.SERVING,
        "smartbin.v1.Classifier": status.SERVING,
        "smartbin.v1.Camera": status.NOT_SERVING,
    }


def test_sigterm_ends_the_process_within_the_grace_whatever_is_running(
    default_bundle: Path, tmp_path: Path
) -> None:
    grace = 0.5
    config = write_config(tmp_path, default_bundle, grace_seconds=grace)
    server = spawn_service(["--config", str(config)], cwd=tmp_path)
    photo = slow_bmp()  # seconds of decoding
    try:
        with (
            grpc.insecure_channel(server.target) as channel,
            futures.ThreadPoolExecutor(2) as pool,
        ):
            calls = [pool.submit(classify, channel, photo) for _ in range(2)]
            wait_for(lambda: metric(server, "smartbin_in_flight_requests ") == 2, timeout=10)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            exit_code = server.process.wait(10)
            lived = time.monotonic() - signalled
            assert not any(call.result() == grpc.StatusCode.OK for call in calls)
    finally:
        server.stop()
    assert exit_code == 0, server.log[-5:]
    assert lived <= grace + 1, f"lived {lived:.1f} s after SIGTERM with a grace of {grace} s"
    # The log is read on a thread of its own: its last lines may come in after the exit.
    wait_for(lambda: any("exiting without them" in line for line in server.log), timeout=5)


def test_reloading_a_file_says_it_is_not_a_folder(bin_process: ServiceProcess) -> None:
    # Through the admin listener, whose address the service logs; a name is taken from the
    # folder holding the served bundle, here the edge_service package.
    (admin,) = (m[1] for m in map(ADMIN_LINE.search, bin_process.log) if m)
    with grpc.insecure_channel(admin) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ReloadModel(
                classifier_pb2.ReloadModelRequest(bundle_path="__init__.py"), timeout=30
            )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "__init__.py is not a folder" in refused.value.details()
    assert "JSON" not in refused.value.details()


def test_smartbin_load_backs_off_from_a_dead_target_and_reports_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A server that died: its port refuses, and its process is a zombie not yet reaped.
    dead = subprocess.Popen(["sleep", "60"])
    dead.kill()
    wait_for(lambda: Path(f"/proc/{dead.pid}/stat").read_text().split()[2] == "Z")
    out = tmp_path / "load.json"
    argv = ["--target", f"127.0.0.1:{free_port()}", "--pid", str(dead.pid), "--json", str(out)]
    try:
        with pytest.raises(SystemExit) as done:
            loadgen.main(
                [*argv, "--concurrency", "4", "--duration", "1.5", "--report-every", "0.5"]
            )
    finally:
        dead.wait()
    assert done.value.code == 1
    figures = json.loads(out.read_text())
    # Without the back-off, four threads make thousands of calls a second to a closed port.
    assert 0 < figures["calls"] <= 40
    assert figures["errors"] == figures["calls"] and figures["calls_per_second"] == 0
    assert figures["rss_bytes"]["end"] is None and figures["server_gone"]
    # The zombie's memory reads 0: "gone", not "0.0 MB".
    assert figures["intervals"] and all(i["rss_bytes"] is None for i in figures["intervals"])
    printed = capsys.readouterr().out
    assert "no call was answered" in printed and "the server process ended" in printed
