"""Paths and defaults shared across the edge service."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from smartbin.v1 import classifier_pb2

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_BUNDLE_DIR = PACKAGE_DIR / "default_bundle"
SAMPLES_DIR = PACKAGE_DIR / "samples"

# The API version is the proto package (stated once, in classifier.proto).
API_VERSION: str = classifier_pb2.DESCRIPTOR.package
DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9108
# An answer whose best score is below this is unsure, unless the bundle's calibration or the
# config's confidence_threshold says otherwise.
DEFAULT_CONFIDENCE_THRESHOLD = 0.5


def service_version() -> str:
    """The installed edge service version (stated once, in edge_service/pyproject.toml)."""
    try:
        return metadata.version("smartbin-edge")
    except metadata.PackageNotFoundError:
        return "0+unknown"
