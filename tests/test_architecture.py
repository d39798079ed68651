"""The layout of docs/architecture.md, enforced: which part may import which.

contract (proto/smartbin)  <-  edge_service  (the bin: no torch)
         ^                 <-  trainer  <-  converter
         |
tools (measure the edge by running it, never by importing it)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from helpers import ROOT, modules_imported_by

TORCH = {"torch", "torchvision", "timm", "litert_torch", "ai_edge_quantizer", "datasets"}
# The bin reads the fleet's bundle store over plain HTTP(S): no cloud SDK on it.
CLOUD_SDKS = {"boto3", "botocore", "moto"}
PARTS = {
    "contract": ROOT / "proto" / "smartbin",
    # The Open Inference Protocol's generated stubs ship with the contract.
    "contract_inference": ROOT / "proto" / "inference",
    "edge_service": ROOT / "edge_service",
    "trainer": ROOT / "trainer",
    "converter": ROOT / "converter",
    "tools": ROOT / "tools" / "smartbin_tools",
}
# What each part must never import (top-level module names).
FORBIDDEN = {
    "contract": {"edge_service", "trainer", "converter", "smartbin_tools"} | TORCH | CLOUD_SDKS,
    "contract_inference": {"edge_service", "trainer", "converter", "smartbin_tools"} | TORCH,
    "edge_service": {"trainer", "converter", "smartbin_tools"} | TORCH | CLOUD_SDKS,
    "trainer": {"edge_service", "converter", "smartbin_tools"},
    "converter": {"edge_service", "smartbin_tools"},
    "tools": {"edge_service", "trainer", "converter"} | TORCH,
}


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """Top-level names each source file in ``folder`` imports (build outputs skipped)."""
    return {
        str(path.relative_to(ROOT)): modules_imported_by(path)
        for path in folder.rglob("*.py")
        if not {"build", "__pycache__"} & set(path.relative_to(folder).parts)
    }


@pytest.mark.parametrize("part", sorted(PARTS))
def test_each_part_imports_only_what_the_layout_allows(part: str) -> None:
    offenders = {
        path: sorted(names & FORBIDDEN[part])
        for path, names in imported_modules(PARTS[part]).items()
        if names & FORBIDDEN[part]
    }
    assert not offenders, f"{part} imports what docs/architecture.md forbids: {offenders}"


def test_the_edge_distribution_requires_nothing_of_the_trainer_converter_or_tools() -> None:
    """Installing the edge pulls in the contract and third-party wheels only."""
    for folder in ("proto", "edge_service"):
        project = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]
        requirements = [*project["dependencies"]]
        requirements += [
            r for extra in project.get("optional-dependencies", {}).values() for r in extra
        ]
        ours = {r.split("=")[0].split("[")[0] for r in requirements if r.startswith("smartbin")}
        assert ours <= {"smartbin-contract"}, f"{folder} requires {ours}"
        commands = project.get("scripts", {})
        assert not [c for c in commands.values() if c.split(".")[0] in FORBIDDEN["edge_service"]]


def test_running_the_edge_service_loads_no_torch() -> None:
    folder = PARTS["edge_service"]
    modules = [  # every module, the web port's included
        ".".join(p.relative_to(folder).with_suffix("").parts)
        for p in folder.rglob("*.py")
        if p.stem != "__main__" and not {"build", "__pycache__"} & set(p.relative_to(folder).parts)
    ]
    code = (
        f"import sys\nfor m in {modules!r}: __import__('edge_service.' + m)\n"
        f"loaded = sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(TORCH)!r}))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_grpc_stubs_match_the_proto() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_no_category_is_named_in_code() -> None:
    """Labels are data (dataset folders -> checkpoint -> bundle -> answers): no source file of
    any part spells one of the default bundle's categories as a string."""
    labels = set(
        json.loads((ROOT / "edge_service/default_bundle/manifest.json").read_text())["labels"]
    )
    offenders = []
    for folder in PARTS.values():
        for path in folder.rglob("*.py"):
            if "build" in path.relative_to(folder).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in labels:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not offenders
