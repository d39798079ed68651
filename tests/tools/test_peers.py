"""smartbin-bench-peers: each peer runs, and answers every sample photo as Classify does; the
float32 model's ONNX translation computes what the .tflite computes. Skipped without the tools'
``peers`` extra (pip install -e './tools[peers]'). Timings are printed, never asserted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

for module in ("fastapi", "uvicorn", "onnx", "onnxruntime"):
    pytest.importorskip(module, reason="the peers extra: pip install -e './tools[peers]'")

from smartbin.bundle import load_bundle  # noqa: E402
from smartbin.preprocessing import prepare  # noqa: E402
from smartbin_tools.paths import DEFAULT_BUNDLE_DIR, DEFAULT_FLOAT_TWIN, SAMPLES_DIR  # noqa: E402
from smartbin_tools.peers import onnx_export  # noqa: E402
from smartbin_tools.peers import run as peers  # noqa: E402


def test_the_onnx_translation_computes_what_the_tflite_model_computes(tmp_path: Path) -> None:
    onnx_path = onnx_export.export(DEFAULT_FLOAT_TWIN, tmp_path / "float32.onnx")
    spec = load_bundle(DEFAULT_BUNDLE_DIR).preprocessing
    for path in sorted(SAMPLES_DIR.glob("*.jpg"))[:2]:
        pixels = prepare(path.read_bytes(), spec).astype(np.float32)[np.newaxis]
        # Outputs are logits of magnitude 1-10: a wrong layout or padding moves them by units.
        assert onnx_export.max_difference(DEFAULT_FLOAT_TWIN, onnx_path, pixels) < 1e-3


def test_an_op_outside_the_translation_is_refused_by_name(tmp_path: Path) -> None:
    # The int8 model's tensors are quantized: refused before any op is translated.
    with pytest.raises(onnx_export.ExportError, match="only float32 models"):
        onnx_export.tflite_to_onnx(load_bundle(DEFAULT_BUNDLE_DIR).model_path)


def test_every_peer_runs_and_answers_each_sample_as_classify_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "peers.json"
    peers.main(
        ["--seconds", "0.3", "--concurrency", "1", "2", "--onnx-cache", str(tmp_path)]
        + ["--json", str(out)]
    )
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["peers"]) == {
        "bare",
        "serve-1",
        f"serve-{peers.cores()}",
        "serve-fastest",
        "rest-tflite",
        "rest-onnxruntime",
    }
    classify = result["peers"]["serve-1"]["answers"]
    # Each sample photo is named after its category, and Classify gets them all right.
    assert classify == {name: re.sub(r"\d+\.jpg$", "", name) for name in classify}
    assert len(classify) == 6
    for key, peer in result["peers"].items():
        assert peer["answers"] == classify, key
        assert peer["top_label"] == "glass"
        assert set(peer["levels"]) == {"1", "2"}
        for level in peer["levels"].values():
            assert level["calls_per_second"] > 0 and level["errors"] == 0
            assert level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
        assert peer["rss_after_mb"] > 0
        assert result["ratios"][key]["levels"]["1"]["p50_ms"] > 0
    assert result["peers"]["rest-onnxruntime"]["serves"] == "float32"
    assert result["peers"]["serve-fastest"]["serves"] in ("int8", "float32")
    assert result["ratios"]["bare"]["rss"] == 1.0
    assert "as ratios to the bare pipeline" in table
    assert "every peer gives each sample photo the label smartbin-serve gives it" in table
