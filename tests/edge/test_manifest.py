"""The manifest is a typed schema: what it does not know is refused, and what it says is done."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import copy_bundle, local_config

from edge_service.const import SAMPLES_DIR
from edge_service.server import create_server
from smartbin.bundle import MANIFEST_NAME, BundleError, load_bundle
from smartbin.model import TFLiteClassifier
from smartbin.preprocessing import prepare
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc


def with_preprocessing(source: Path, folder: Path, **changes: object) -> Path:
    preprocessing = json.loads((source / MANIFEST_NAME).read_text())["preprocessing"]
    return copy_bundle(source, folder, preprocessing={**preprocessing, **changes})


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"labelz": ["a", "b"]}, "labelz"),
        ({"format_version": 2}, "format 2 is not supported"),
        ({"labels": ["glass", "glass"]}, "distinct"),
        ({"version": ""}, "version"),
    ],
)
def test_a_manifest_key_or_value_it_does_not_know_is_refused_by_name(
    default_bundle: Path, tmp_path: Path, changes: dict, named: str
) -> None:
    bundle = copy_bundle(default_bundle, tmp_path / "bundle", **changes)
    with pytest.raises(BundleError, match=named):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"colour": "BGR"}, "preprocessing.colour"),
        ({"color": "YUV"}, "preprocessing.color"),
        ({"interpolation": "lanczos"}, "preprocessing.interpolation"),
        ({"input_size": 400}, "input_size 400 is larger than resize_size"),
    ],
)
def test_unsupported_preprocessing_is_refused_not_served_as_the_default(
    default_bundle: Path, tmp_path: Path, changes: dict, named: str
) -> None:
    bundle = with_preprocessing(default_bundle, tmp_path / "bundle", **changes)
    with pytest.raises(BundleError, match=named):
        load_bundle(bundle)


def test_a_bgr_bundle_is_fed_bgr_pixels(default_bundle: Path, tmp_path: Path) -> None:
    """The manifest's channel order reaches the model: the service's answer for a BGR copy of
    the default bundle is the model's answer on the photo with its channels swapped."""
    bgr = with_preprocessing(default_bundle, tmp_path / "bgr", color="BGR")
    photo = (SAMPLES_DIR / "glass1.jpg").read_bytes()
    rgb_bundle = load_bundle(default_bundle)
    rgb_pixels = prepare(photo, rgb_bundle.preprocessing)
    assert np.array_equal(prepare(photo, load_bundle(bgr).preprocessing), rgb_pixels[..., ::-1])
    expected = TFLiteClassifier(rgb_bundle, num_threads=1).probabilities(
        np.ascontiguousarray(rgb_pixels[..., ::-1])
    )

    running = create_server(local_config(bgr))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            answer = classifier_pb2_grpc.ClassifierStub(channel).Classify(
                classifier_pb2.ClassifyRequest(image=photo), timeout=30
            )
    finally:
        running.stop(grace=1)
    scores = {p.label: p.score for p in answer.predictions}
    served = np.array([scores[label] for label in rgb_bundle.labels])
    assert np.allclose(served, expected, atol=1e-5)
