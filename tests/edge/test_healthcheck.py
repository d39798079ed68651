"""smartbin-healthcheck, the container's HEALTHCHECK: exit 0 only while the service serves."""

from __future__ import annotations

import pytest
from helpers import free_port

from edge_service.healthcheck import main as healthcheck_main
from edge_service.server import RunningService


def test_healthcheck_passes_on_a_serving_service(
    service: RunningService, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        healthcheck_main(["--target", f"127.0.0.1:{service.port}"])
    assert exited.value.code == 0
    assert "SERVING" in capsys.readouterr().out


def test_healthcheck_fails_when_the_service_is_gone(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        healthcheck_main(["--target", f"127.0.0.1:{free_port()}", "--timeout", "1"])
    assert exited.value.code == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_healthcheck_fails_while_the_service_drains(service: RunningService) -> None:
    service.health.enter_graceful_shutdown()
    with pytest.raises(SystemExit) as exited:
        healthcheck_main(["--target", f"127.0.0.1:{service.port}"])
    assert exited.value.code == 1
