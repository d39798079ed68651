"""Three versions, each stated once, reported by the running service.

The service version is the smartbin-edge distribution's, in edge_service/pyproject.toml; the API
version is the proto package in classifier.proto, and the bundle format version is
``BUNDLE_FORMAT_VERSION`` in proto/smartbin/bundle.py.
"""

from __future__ import annotations

import re

import grpc
from helpers import ROOT, scrape

from edge_service.server import RunningService
from smartbin.bundle import BUNDLE_FORMAT_VERSION, Bundle
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest and mypy bring tomli
    import tomli as tomllib

EDGE_PYPROJECT = ROOT / "edge_service" / "pyproject.toml"
PROTO = ROOT / "proto" / "smartbin" / "v1" / "classifier.proto"


def pyproject_version() -> str:
    return tomllib.loads(EDGE_PYPROJECT.read_text())["project"]["version"]


def proto_package() -> str:
    match = re.search(r"^package\s+([\w.]+)\s*;", PROTO.read_text(), re.MULTILINE)
    assert match, f"no package statement in {PROTO}"
    return match.group(1)


def test_model_info_reports_the_three_versions(
    channel: grpc.Channel, default_loaded: Bundle
) -> None:
    info = classifier_pb2_grpc.ClassifierStub(channel).GetModelInfo(
        classifier_pb2.GetModelInfoRequest(), timeout=5
    )
    assert info.service_version == pyproject_version()
    assert info.api_version == proto_package()
    assert info.bundle_format_version == default_loaded.manifest.format_version
    assert info.bundle_format_version == BUNDLE_FORMAT_VERSION


def test_build_info_metric_reports_the_three_versions(service: RunningService) -> None:
    line = next(
        line for line in scrape(service).splitlines() if line.startswith("smartbin_build_info{")
    )
    assert f'version="{pyproject_version()}"' in line
    assert f'api_version="{proto_package()}"' in line
    assert f'bundle_format="{BUNDLE_FORMAT_VERSION}"' in line


def test_versions_are_not_restated_in_code() -> None:
    """A second literal would drift from the one source; code reads the source instead."""
    literals = [f'"{pyproject_version()}"', f'"{proto_package()}"']
    offenders = [
        f"{path.relative_to(ROOT)}: {literal}"
        for folder in ("edge_service", "proto", "trainer", "converter", "tools")
        for path in (ROOT / folder).rglob("*.py")
        for literal in literals
        if literal in path.read_text()
    ]
    assert not offenders
