"""smartbin_tools.service starts smartbin-serve on ports it reads back from the serving line,
times it to SERVING, and stops it; a service that cannot start is reported with its log."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_service.const import DEFAULT_BUNDLE_DIR
from smartbin_tools.service import serve_args, spawn_service


def test_the_started_service_serves_on_the_ports_it_reports() -> None:
    with spawn_service(serve_args(DEFAULT_BUNDLE_DIR)) as service:
        assert service.port > 0 and service.metrics_port > 0
        assert service.port != service.metrics_port
        assert 0 < service.start_seconds < 60 and math.isfinite(service.start_seconds)
        assert service.psutil_process.pid == service.process.pid
        assert service.psutil_process.memory_info().rss > 0
        with grpc.insecure_channel(service.target) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert any("serving model" in line for line in service.log)
    assert service.process.returncode == 0


def test_a_service_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="did not start") as failed:
        spawn_service(serve_args(tmp_path), start_timeout=60)
    assert "manifest.json" in str(failed.value)


def test_serve_args_name_the_bundle_and_the_config(tmp_path: Path) -> None:
    config = tmp_path / "bin.yaml"
    assert serve_args(tmp_path) == ["--bundle", str(tmp_path)]
    assert serve_args(tmp_path, config) == ["--bundle", str(tmp_path), "--config", str(config)]
