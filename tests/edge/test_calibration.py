"""A bundle's calibration: the runtime divides the logits by its temperature, and the edge calls
an answer unsure below its threshold unless the config sets one."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import copy_bundle, local_config
from PIL import Image

from edge_service.classify import Pipeline
from edge_service.const import DEFAULT_CONFIDENCE_THRESHOLD, SAMPLES_DIR
from edge_service.metrics import ServiceMetrics
from edge_service.server import create_server
from smartbin.bundle import MANIFEST_NAME, Bundle, BundleError, load_bundle
from smartbin.model import TFLiteClassifier, softmax
from smartbin.preprocessing import prepare
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

SAMPLE = sorted(SAMPLES_DIR.glob("*.jpg"))[0]


def calibrated(source: Path, folder: Path, calibration: dict | None) -> Path:
    """A copy of ``source`` whose manifest has ``calibration`` (None: no calibration key)."""
    bundle = copy_bundle(source, folder)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest.pop("calibration", None)
    if calibration is not None:
        manifest["calibration"] = calibration
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return bundle


def scores(bundle: Path) -> tuple[np.ndarray, np.ndarray]:
    """The sample photo's logits and probabilities under ``bundle``."""
    classifier = TFLiteClassifier(load_bundle(bundle), num_threads=1)
    pixels = prepare(SAMPLE.read_bytes(), classifier.bundle.preprocessing)
    return classifier.logits(pixels), classifier.probabilities(pixels)


def test_a_bundle_without_calibration_loads_as_before(default_bundle: Path, tmp_path: Path) -> None:
    bundle = calibrated(default_bundle, tmp_path / "plain", None)
    loaded = load_bundle(bundle)
    assert loaded.manifest.calibration is None and loaded.temperature == 1.0
    assert loaded.manifest.format_version == 1
    logits, probabilities = scores(bundle)
    np.testing.assert_allclose(probabilities, softmax(logits), rtol=1e-6)


def test_a_temperature_of_two_flattens_the_scores_and_keeps_their_order(
    default_bundle: Path, tmp_path: Path
) -> None:
    plain_logits, plain = scores(calibrated(default_bundle, tmp_path / "t1", None))
    bundle = calibrated(default_bundle, tmp_path / "t2", {"temperature": 2.0, "unsure_below": 0.5})
    logits, flatter = scores(bundle)
    np.testing.assert_array_equal(logits, plain_logits)  # the model itself is unchanged
    np.testing.assert_allclose(flatter, softmax(logits / 2.0), rtol=1e-5)
    assert flatter.sum() == pytest.approx(1.0, abs=1e-5)
    assert list(np.argsort(-flatter)) == list(np.argsort(-plain))
    assert flatter.max() < plain.max() and flatter.min() > plain.min()


@pytest.mark.parametrize(
    ("calibration", "named"),
    [
        ({"temperature": 0.0, "unsure_below": 0.5}, "calibration.temperature"),
        ({"temperature": 1.0, "unsure_below": 1.5}, "calibration.unsure_below"),
        ({"temperature": 1.0}, "calibration.unsure_below"),
        ({"temperature": 1.0, "unsure_below": 0.5, "bias": 0.1}, "calibration.bias"),
    ],
)
def test_a_calibration_it_cannot_use_is_refused_by_name(
    default_bundle: Path, tmp_path: Path, calibration: dict, named: str
) -> None:
    with pytest.raises(BundleError, match=named):
        load_bundle(calibrated(default_bundle, tmp_path / "bad", calibration))


def answer_unsure(pipeline: Pipeline, bundle: Path) -> bool:
    classifier = TFLiteClassifier(load_bundle(bundle), num_threads=1)
    with Image.open(SAMPLE) as image:
        return pipeline.answer(classifier, image.convert("RGB")).unsure


def test_the_edge_is_unsure_below_the_bundles_threshold_unless_the_config_says(
    default_bundle: Path, tmp_path: Path
) -> None:
    _, probabilities = scores(
        calibrated(default_bundle, tmp_path / "probe", {"temperature": 1.0, "unsure_below": 0.5})
    )
    best = float(probabilities.max())
    above = calibrated(
        default_bundle, tmp_path / "above", {"temperature": 1.0, "unsure_below": best + 0.01}
    )
    below = calibrated(
        default_bundle, tmp_path / "below", {"temperature": 1.0, "unsure_below": best - 0.01}
    )
    from_bundle = Pipeline(ServiceMetrics())
    assert answer_unsure(from_bundle, above)
    assert not answer_unsure(from_bundle, below)
    # The config's threshold, when set, wins over the bundle's.
    assert not answer_unsure(Pipeline(ServiceMetrics(), confidence_threshold=0.0), above)
    assert answer_unsure(Pipeline(ServiceMetrics(), confidence_threshold=1.0), below)
    # A bundle without a calibration: the default threshold.
    plain = load_bundle(calibrated(default_bundle, tmp_path / "plain", None))
    assert from_bundle.threshold_for(TFLiteClassifier(plain, num_threads=1)) == (
        DEFAULT_CONFIDENCE_THRESHOLD
    )


def test_the_service_uses_the_bundles_threshold_by_default(
    default_bundle: Path, tmp_path: Path
) -> None:
    bundle = calibrated(
        default_bundle, tmp_path / "strict", {"temperature": 1.0, "unsure_below": 1.0}
    )
    request = classifier_pb2.ClassifyRequest(image=SAMPLE.read_bytes())
    for overrides, unsure in (({}, True), ({"confidence_threshold": 0.0}, False)):
        running = create_server(local_config(bundle, **overrides))
        try:
            with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                reply = classifier_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=10)
            assert reply.unsure is unsure, overrides
        finally:
            running.stop(grace=1)


def test_the_shipped_bundle_is_calibrated_and_its_threshold_is_the_edges_default(
    default_loaded: Bundle,
) -> None:
    calibration = default_loaded.manifest.calibration
    assert calibration is not None and default_loaded.manifest.format_version == 1
    classifier = TFLiteClassifier(default_loaded, num_threads=1)
    assert Pipeline(ServiceMetrics()).threshold_for(classifier) == calibration.unsure_below
    figures = default_loaded.manifest.metrics["calibration"]["sure"]["val_harder_shifts"]
    assert (
        figures["sure_accuracy"]
        >= default_loaded.manifest.metrics["calibration"]["target_sure_accuracy"]
    )
