"""The embedded default: a real int8 bundle from the project's own trainer and converter.

The golden file lists each sample photo's expected best label and score. After shipping a new
default bundle, regenerate it with
``SMARTBIN_UPDATE_GOLDEN=1 pytest tests/edge/test_default_bundle.py``.
"""

from __future__ import annotations

import csv
import os

import pytest
from helpers import DATA

from edge_service.const import SAMPLES_DIR
from smartbin.bundle import Bundle
from smartbin.model import TFLiteClassifier
from smartbin.preprocessing import prepare

GOLDEN = DATA / "default_bundle_expected.csv"
MAX_BUNDLE_BYTES = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def sample_answers(default_loaded: Bundle) -> list[tuple[str, str, float]]:
    """Each sample photo's name, best label and score under the default bundle."""
    classifier = TFLiteClassifier(default_loaded, num_threads=1)
    answers = []
    for path in sorted(SAMPLES_DIR.glob("*.jpg")):
        best = classifier.rank(
            classifier.probabilities(prepare(path.read_bytes(), default_loaded.preprocessing)),
            top_k=1,
        )[0]
        answers.append((path.name, best.label, best.score))
    return answers


def test_default_bundle_is_valid_and_small(default_loaded: Bundle) -> None:
    assert default_loaded.quantization == "int8"
    assert default_loaded.model_path.stat().st_size <= MAX_BUNDLE_BYTES
    assert default_loaded.manifest.metrics["int8"]["test"]["accuracy"] > 0.9


def test_samples_match_the_golden_file(sample_answers: list[tuple[str, str, float]]) -> None:
    if os.environ.get("SMARTBIN_UPDATE_GOLDEN"):
        with GOLDEN.open("w", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows(
                [("image", "label", "score")]
                + [(name, label, f"{score:.4f}") for name, label, score in sample_answers]
            )
    with GOLDEN.open() as handle:
        expected = {row["image"]: row for row in csv.DictReader(handle)}
    assert len(sample_answers) == len(expected) >= 6
    for name, label, score in sample_answers:
        assert label == expected[name]["label"], name
        assert score == pytest.approx(float(expected[name]["score"]), abs=0.02), name


def test_there_is_a_sample_for_every_label_and_each_is_recognised(
    default_loaded: Bundle, sample_answers: list[tuple[str, str, float]]
) -> None:
    # Each sample is named after its true category; the default model should get them right.
    for name, label, _ in sample_answers:
        assert name.startswith(label), f"{name} classified as {label}"
    assert {label for _, label, _ in sample_answers} == set(default_loaded.labels)
