"""A bundle that does not match its manifest is refused with a reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from smartbin.bundle import BundleError, load_bundle


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def test_truncated_model_is_refused(bundle_copy: Path) -> None:
    model = bundle_copy / "model.tflite"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(BundleError, match="corrupt or incomplete"):
        load_bundle(bundle_copy)


def test_missing_manifest_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="not found"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda m: m.pop("labels"), "missing or has a bad field"),
        (lambda m: m.update(format_version=99), "format 99 is not supported"),
        (lambda m: m.update(labels=["same", "same"]), "distinct labels"),
    ],
)
def test_bad_manifest_is_refused(bundle_copy: Path, change, fragment: str) -> None:
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=fragment):
        load_bundle(bundle_copy)
