"""smartbin-load stays on this machine, stops by itself and reports what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import PHOTOS

from edge_service.const import DEFAULT_BUNDLE_DIR
from smartbin_tools.loadgen import NotLoopbackError, main, require_loopback


@pytest.mark.parametrize(
    "target", ["10.1.2.3:50051", "192.168.0.10:50051", "[2001:db8::1]:50051", "8.8.8.8:443"]
)
def test_targets_off_this_machine_are_refused(target: str) -> None:
    with pytest.raises(NotLoopbackError, match="only targets loopback"):
        require_loopback(target)
    with pytest.raises(SystemExit) as refused:
        main(["--target", target, "--duration", "1"])
    assert "only targets loopback" in str(refused.value.code)


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "localhost:50051", "[::1]:50051"])
def test_loopback_targets_are_accepted(target: str) -> None:
    require_loopback(target)


@pytest.mark.parametrize("target", ["localhost", "127.0.0.1:port"])
def test_a_target_without_a_port_is_refused(target: str) -> None:
    with pytest.raises(NotLoopbackError, match="host:port"):
        require_loopback(target)


@pytest.mark.parametrize(
    "args", [["--duration", "0"], ["--duration", "86400"], ["--concurrency", "0"]]
)
def test_the_run_is_bounded(args: list[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        main(args)
    assert refused.value.code == 2


def test_a_short_run_reports_rate_latency_errors_and_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "load.json"
    argv = ["--bundle", str(DEFAULT_BUNDLE_DIR), "--images", str(PHOTOS / "glass")]
    argv += ["--concurrency", "4"]
    argv += ["--duration", "2", "--report-every", "1", "--json", str(out)]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    figures = json.loads(out.read_text())
    assert figures["calls"] > 0 and figures["errors"] == 0
    assert 0 < figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
    assert figures["calls_per_second"] == pytest.approx(figures["calls"] / figures["seconds"])
    assert figures["rss_bytes"]["before"] > 0 and figures["rss_bytes"]["end"] > 0
    assert len(figures["intervals"]) >= 2
    printed = capsys.readouterr().out
    assert "calls/s" in printed and "smartbin-serve exited with code 0" in printed
