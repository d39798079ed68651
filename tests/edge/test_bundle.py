"""A bundle that does not match its manifest is refused with a reason; a good copy loads as is.
(Unknown manifest keys and preprocessing values: test_manifest.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import copy_bundle

from smartbin.bundle import Bundle, BundleError, load_bundle
from smartbin.model import TFLiteClassifier


@pytest.fixture
def bundle_copy(default_bundle: Path, tmp_path: Path) -> Path:
    return copy_bundle(default_bundle, tmp_path / "bundle")


def test_a_copied_and_relabelled_bundle_loads_with_its_own_labels(
    default_loaded: Bundle, tmp_path: Path
) -> None:
    relabelled = [f"bin-{i}" for i in range(len(default_loaded.labels))]
    copy = load_bundle(
        copy_bundle(default_loaded.path, tmp_path / "copy", labels=relabelled, version="copy-1")
    )
    assert copy.labels == tuple(relabelled)
    assert copy.version == "copy-1"
    assert copy.sha256 == default_loaded.sha256
    assert copy.preprocessing == default_loaded.preprocessing


def test_truncated_model_is_refused(bundle_copy: Path) -> None:
    model = bundle_copy / "model.tflite"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(BundleError, match="corrupt or incomplete"):
        load_bundle(bundle_copy)


def test_a_single_altered_model_byte_is_refused(bundle_copy: Path) -> None:
    model = bundle_copy / "model.tflite"
    content = bytearray(model.read_bytes())
    content[len(content) // 2] ^= 0x01
    model.write_bytes(bytes(content))
    with pytest.raises(BundleError, match="corrupt or incomplete"):
        load_bundle(bundle_copy)


def test_a_missing_model_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "model.tflite").unlink()
    with pytest.raises(BundleError, match="named by the manifest is missing"):
        load_bundle(bundle_copy)


def test_missing_manifest_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="not found"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda m: m.pop("labels"), "labels: Field required"),
        (lambda m: m.update(format_version=99), "format 99 is not supported"),
        (lambda m: m.update(labels=["same", "same"]), "distinct"),
        (lambda m: m.update(labels=["alone"]), "two or more"),
        (lambda m: m["model"].update(file="../model.tflite"), "model.file"),
    ],
    ids=[
        "no-labels",
        "future-format",
        "repeated-label",
        "one-label",
        "model-outside-the-folder",
    ],
)
def test_bad_manifest_is_refused(bundle_copy: Path, change, fragment: str) -> None:
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=fragment):
        load_bundle(bundle_copy)


def test_labels_that_do_not_match_the_models_outputs_are_refused(
    default_loaded: Bundle, tmp_path: Path
) -> None:
    # The manifest alone is valid; only the model can tell it has one output per shipped label.
    extra = copy_bundle(
        default_loaded.path, tmp_path / "extra", labels=[*default_loaded.labels, "battery"]
    )
    with pytest.raises(ValueError, match="outputs but the manifest lists"):
        TFLiteClassifier(load_bundle(extra), num_threads=1)


def test_a_manifest_input_size_the_model_does_not_take_is_refused(
    default_loaded: Bundle, tmp_path: Path
) -> None:
    smaller = {**default_loaded.preprocessing.to_dict(), "input_size": 224, "resize_size": 256}
    copy = copy_bundle(default_loaded.path, tmp_path / "smaller", preprocessing=smaller)
    with pytest.raises(ValueError, match="does not match the manifest's preprocessing"):
        TFLiteClassifier(load_bundle(copy), num_threads=1)
