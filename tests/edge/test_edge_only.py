"""The edge tests need only what a bin installs: `make test-edge` runs this folder where the
trainer, the converter and torch are absent, so nothing here may import them, not even inside a
function, and not through the helpers or the edge packages either."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, modules_imported_by

EDGE_TESTS = Path(__file__).resolve().parent
HELPERS = ROOT / "tests" / "helpers.py"
# Top-level modules that only the training side installs.
TRAINING_ONLY = {"torch", "torchvision", "timm", "trainer", "converter", "tiny", "mlflow"}


def test_no_edge_test_imports_training_code() -> None:
    sources = [*sorted(EDGE_TESTS.glob("*.py")), HELPERS]
    offenders = {
        str(path.relative_to(ROOT)): sorted(modules_imported_by(path) & TRAINING_ONLY)
        for path in sources
    }
    assert len(sources) > 10
    assert not {path: names for path, names in offenders.items() if names}


def test_importing_every_edge_test_loads_no_training_code() -> None:
    """Catches what the edge packages or a test's dependencies import on their behalf."""
    script = f"""
import importlib.util, json, sys
from pathlib import Path
sys.path[:0] = [{str(ROOT / "tests")!r}, {str(EDGE_TESTS)!r}]
for path in sorted(Path({str(EDGE_TESTS)!r}).glob("*.py")):
    spec = importlib.util.spec_from_file_location("edge_" + path.stem, path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert {"edge_service", "smartbin", "grpc"} <= loaded  # the tests' own imports did load
    assert not sorted(loaded & TRAINING_ONLY)
