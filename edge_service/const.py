"""Paths and defaults shared across the edge service."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_BUNDLE_DIR = PACKAGE_DIR / "default_bundle"
SAMPLES_DIR = PACKAGE_DIR / "samples"

API_VERSION = "smartbin.v1"
DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9108


def service_version() -> str:
    """The installed smartbin package version (stated once, in pyproject.toml)."""
    try:
        return metadata.version("smartbin")
    except metadata.PackageNotFoundError:
        return "0+unknown"
