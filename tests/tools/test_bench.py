"""smartbin-bench runs end to end and reports every figure; the float32 twin it compares
against is the default bundle's own model. Timings are printed, never asserted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import open_float_twin

from smartbin.bundle import load_bundle
from smartbin.preprocessing import prepare
from smartbin_tools import bench
from smartbin_tools.paths import DEFAULT_BUNDLE_DIR, DEFAULT_FLOAT_TWIN, SAMPLES_DIR
from smartbin_tools.routes import ROUTE_NAMES

STATS = {"p50_ms", "p95_ms", "p99_ms", "mean_ms", "count"}


def test_float_twin_is_the_default_bundle_in_float32() -> None:
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    interpreter, inp, out = open_float_twin(DEFAULT_FLOAT_TWIN, bundle)
    # Same answers as the int8 model on the sample photos, each named after its category.
    for path in sorted(SAMPLES_DIR.glob("*.jpg")):
        pixels = prepare(path.read_bytes(), bundle.preprocessing)
        interpreter.set_tensor(inp["index"], pixels.astype(np.float32)[np.newaxis])
        interpreter.invoke()
        best = bundle.labels[int(interpreter.get_tensor(out["index"])[0].argmax())]
        assert path.name.startswith(best), f"{path.name} classified as {best}"


def test_bench_runs_end_to_end_and_writes_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    # Up to 8 calls at once on one connection: at the per-connection limit (16) a call can meet
    # HTTP/2's REFUSED_STREAM race and end UNAVAILABLE, which the bench reports in error_codes.
    bench.main(
        ["--seconds", "0.5", "--repeats", "2", "--concurrency", "1", "4", "8", "--json", str(out)]
    )
    table = capsys.readouterr().out
    result = json.loads(out.read_text())

    cores = str(result["machine"]["cores"])
    assert set(result["invoke"]) == {"1", cores}
    for by_model in result["invoke"].values():
        assert set(by_model) == {"int8", "float32"}
        assert all(STATS | {"cpu_ms_per_call"} <= s.keys() for s in by_model.values())
    assert set(result["preprocess"]) == {"512x384", "1920x1080"}
    for stages in result["preprocess"].values():
        assert all(stages[k].keys() >= STATS for k in ("decode", "preprocess", "total"))
    service = result["service"]
    assert STATS | {"cpu_ms_per_call"} <= service["bare_pipeline"].keys()
    assert STATS | {"server_cpu_ms_per_call"} <= service["classify_beside_bare"].keys()
    assert set(service["classify"]) == {"1", "4", "8"}
    # Every route that classifies a photo, timed beside Classify (HTTP, the v2 protocol).
    assert set(service["routes"]) == set(ROUTE_NAMES)
    for route in service["routes"].values():
        assert STATS | {"server_cpu_ms_per_call"} <= route.keys()
    for level in service["classify"].values():
        assert STATS | {"server_cpu_ms_per_call", "client_cpu_ms_per_call"} <= level.keys()
        assert level["calls_per_second"] > 0 and level["errors"] == 0, level["error_codes"]
    assert service["rss_loaded_mb"] > 0 and service["start_to_serving_seconds"] > 0
    assert all(math.isfinite(value) for value in result["ratios"].values())
    assert set(result["goals"]) == set(bench.GOALS)
    for goal in result["goals"].values():
        assert math.isfinite(goal["value"]) and isinstance(goal["met"], bool)
    for name in (
        "int8 / float32 invoke",
        "Classify p50 / bare pipeline",
        "start to SERVING",
        "HTTP POST /api/v1/classify",
        "v2 gRPC ModelInfer p50 / Classify p50",
    ):
        assert name in table


def test_bench_refuses_a_missing_float_model(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--float-model", str(tmp_path / "absent.tflite")])
    assert exit_info.value.code == 2


def test_bench_refuses_a_float_model_that_is_not_the_twin() -> None:
    int8_model = str(DEFAULT_BUNDLE_DIR / "model.tflite")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--float-model", int8_model, "--seconds", "0.1", "--repeats", "1"])
    assert "not float32 (1, 320, 320, 3)" in str(exit_info.value)


def test_bench_refuses_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--bundle", str(tmp_path), "--seconds", "0.1", "--repeats", "1"])
    assert "manifest.json not found" in str(exit_info.value)
