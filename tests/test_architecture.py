"""The edge service stays small: no torch, no trainer or converter code, fresh gRPC stubs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "torchvision", "timm", "trainer", "converter", "litert_torch")


def test_edge_service_source_imports_nothing_heavy() -> None:
    offenders = []
    for path in (ROOT / "edge_service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders


def test_running_the_edge_service_loads_no_torch() -> None:
    modules = [p.stem for p in (ROOT / "edge_service").glob("*.py") if p.stem != "__main__"]
    code = (
        f"import sys\nfor m in {modules!r}: __import__('edge_service.' + m)\n"
        f"loaded = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
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
