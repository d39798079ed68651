"""The converter's output: a full-integer int8 model in a verified bundle, and its parity gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from helpers import copy_bundle, open_float_twin
from tiny import signing_keys

from converter.convert import ParityError, check_parity, main
from smartbin.bundle import load_bundle
from smartbin.signing import SignatureError, load_trusted_keys, verify_bundle
from smartbin_tools.compare import bundle_row, markdown


def test_bundle_model_is_full_integer_int8(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    interpreter = Interpreter(model_path=str(bundle.model_path))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    scale, zero_point = inp["quantization"]
    assert scale == pytest.approx(1.0, abs=0.01) and zero_point == -128
    float_ops = [
        op
        for op in interpreter._get_ops_details()
        if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE")
        and any(
            interpreter._get_tensor_details(t, 0)["dtype"] == np.float32
            for t in op["inputs"]
            if t >= 0
        )
    ]
    assert not float_ops, f"ops left in float: {[op['op_name'] for op in float_ops]}"


def test_bundle_carries_labels_preprocessing_metrics_and_report(
    tiny_bundle: Path, tiny_data: Path
) -> None:
    bundle = load_bundle(tiny_bundle)
    assert list(bundle.labels) == sorted(p.name for p in tiny_data.iterdir() if p.is_dir())
    metrics = bundle.manifest.metrics
    for kind in ("float", "int8"):
        for side in ("val", "test"):
            assert 0.0 <= metrics[kind][side]["accuracy"] <= 1.0
    assert 0.0 <= metrics["agreement"]["test"] <= 1.0
    assert bundle.manifest.source["split_fingerprint"]
    report = json.loads((tiny_bundle / "report.json").read_text())
    assert set(report["int8"]["test"]["per_class"]) == set(bundle.labels)


def test_float_twin_is_the_float32_model_the_int8_one_came_from(tiny_bundle: Path) -> None:
    # conftest converts with float_twin=<work>/float32.tflite, beside the bundle, not in it.
    twin = tiny_bundle.parent / "float32.tflite"
    bundle = load_bundle(tiny_bundle)
    report = json.loads((tiny_bundle / "report.json").read_text())
    assert twin.stat().st_size == report["model_bytes"]["float32"]
    assert not any(p.suffix == ".tflite" and p != bundle.model_path for p in tiny_bundle.iterdir())
    open_float_twin(twin, bundle)


@pytest.mark.parametrize(
    "float_acc, int8_acc, allowed, fails",
    [
        (0.95, 0.945, 1.0, False),
        (0.95, 0.935, 1.0, True),
        (0.95, 0.935, 2.0, False),
    ],
)
def test_parity_gate(float_acc: float, int8_acc: float, allowed: float, fails: bool) -> None:
    report = {"float": {"val": {"accuracy": float_acc}}, "int8": {"val": {"accuracy": int8_acc}}}
    if fails:
        with pytest.raises(ParityError, match="points below float"):
            check_parity(report, allowed)
    else:
        check_parity(report, allowed)


def test_compare_reports_accuracy_size_and_latency(tiny_bundle: Path) -> None:
    row = bundle_row(tiny_bundle, repeats=3)
    report = json.loads((tiny_bundle / "report.json").read_text())
    assert row["int8_test"] == report["int8"]["test"]["accuracy"]
    assert row["int8_mb"] == report["model_bytes"]["int8"] / 1e6
    assert row["int8_ms_1t"] > 0 and row["int8_ms_2t"] > 0
    assert row["architecture"] in markdown([row])


def test_a_bundle_converted_with_a_signing_key_verifies_with_its_public_key(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    # conftest converts with signing_key=<work>/keys/bundle-signing.key (tiny.signing_keys).
    _, public = signing_keys(tiny_bundle)
    trusted = load_trusted_keys([public])
    signer, manifest = verify_bundle(tiny_bundle, trusted)
    assert [signer] == list(trusted)
    assert json.loads((tiny_bundle / "signature.json").read_text())["key_id"] == signer
    assert manifest == load_bundle(tiny_bundle).manifest
    # The signature covers the manifest: a bundle whose labels were swapped no longer verifies.
    labels = list(manifest.labels)
    swapped = copy_bundle(
        tiny_bundle, tmp_path / "swapped", labels=[labels[1], labels[0]] + labels[2:]
    )
    with pytest.raises(SignatureError, match="does not match"):
        verify_bundle(swapped, trusted)


def test_convert_checks_the_signing_key_before_any_work(tmp_path: Path) -> None:
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    for key, reason in (
        (tmp_path / "missing.key", "cannot read signing key"),
        (not_a_key, "is not an unencrypted PEM private key"),
    ):
        with pytest.raises(SystemExit) as stopped:
            # No checkpoint either: the key is read first.
            main(
                [
                    str(tmp_path / "none.pt"),
                    "--out",
                    str(tmp_path / "out"),
                    "--signing-key",
                    str(key),
                ]
            )
        assert reason in str(stopped.value.code)
    assert not (tmp_path / "out").exists()
