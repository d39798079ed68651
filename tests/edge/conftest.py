"""Edge fixtures: the shipped default bundle and a real server on it. Nothing here (or in any
test in this folder) imports the trainer, the converter or torch: `make test-edge` runs this
folder in an environment that has none of them (test_edge_only.py checks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import local_config

from edge_service.const import DEFAULT_BUNDLE_DIR
from edge_service.server import RunningService, create_server
from smartbin.bundle import Bundle, load_bundle


@pytest.fixture(scope="session")
def default_bundle() -> Path:
    """The bundle the edge service ships with (read-only: copy it before changing anything)."""
    return DEFAULT_BUNDLE_DIR


@pytest.fixture(scope="session")
def default_loaded(default_bundle: Path) -> Bundle:
    return load_bundle(default_bundle)


@pytest.fixture
def service(
    default_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    # Tests offer bundles from their own temporary folders.
    running = create_server(
        local_config(default_bundle, reload_dirs=[tmp_path_factory.getbasetemp()])
    )
    yield running
    running.stop(grace=1)


@pytest.fixture
def channel(service: RunningService) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as chan:
        yield chan


@pytest.fixture
def admin_channel(service: RunningService) -> Iterator[grpc.Channel]:
    """The service's admin listener (loopback): where ReloadModel is served without a client
    certificate."""
    with grpc.insecure_channel(f"127.0.0.1:{service.admin_port}") as chan:
        yield chan
