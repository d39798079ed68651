"""The embedded default: a real int8 bundle from the project's own trainer and converter.

The golden file lists each sample photo's expected best label and score. After shipping a new
default bundle, regenerate it with ``SMARTBIN_UPDATE_GOLDEN=1 pytest tests/test_default_bundle.py``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from edge_service.const import DEFAULT_BUNDLE_DIR, SAMPLES_DIR
from smartbin.bundle import load_bundle
from smartbin.model import TFLiteClassifier
from smartbin.preprocessing import prepare

GOLDEN = Path(__file__).parent / "data" / "default_bundle_expected.csv"
MAX_BUNDLE_BYTES = 5 * 1024 * 1024


def sample_answers() -> list[tuple[str, str, float]]:
    classifier = TFLiteClassifier(load_bundle(DEFAULT_BUNDLE_DIR), num_threads=1)
    answers = []
    for path in sorted(SAMPLES_DIR.glob("*.jpg")):
        best = classifier.rank(
            classifier.probabilities(prepare(path.read_bytes(), classifier.bundle.preprocessing)),
            top_k=1,
        )[0]
        answers.append((path.name, best.label, best.score))
    return answers


def test_default_bundle_is_valid_and_small() -> None:
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    assert bundle.quantization == "int8"
    assert bundle.model_path.stat().st_size <= MAX_BUNDLE_BYTES
    assert bundle.manifest["metrics"]["int8"]["test"]["accuracy"] > 0.9


def test_samples_match_the_golden_file() -> None:
    answers = sample_answers()
    if os.environ.get("SMARTBIN_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        with GOLDEN.open("w", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows(
                [("image", "label", "score")]
                + [(name, label, f"{score:.4f}") for name, label, score in answers]
            )
    with GOLDEN.open() as handle:
        expected = {row["image"]: row for row in csv.DictReader(handle)}
    assert len(answers) == len(expected) >= 6
    for name, label, score in answers:
        assert label == expected[name]["label"], name
        assert score == pytest.approx(float(expected[name]["score"]), abs=0.02), name


def test_samples_are_labelled_by_their_file_names() -> None:
    # Each sample is named after its true category; the default model should get them right.
    for name, label, _ in sample_answers():
        assert name.startswith(label), f"{name} classified as {label}"
