"""The model bundle: the only thing that passes from the converter to the bin.

A bundle is a folder holding ``manifest.json`` and the .tflite file it names. The manifest carries
the labels in output order, the preprocessing, the version, the model's sha256 and the metrics
measured when the bundle was made.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_service.preprocess import Preprocessing

logger = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class BundleError(Exception):
    """A bundle is missing, malformed or does not match its manifest."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict[str, Any]
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    model_path: Path

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def sha256(self) -> str:
        return str(self.manifest["model"]["sha256"])

    @property
    def quantization(self) -> str:
        return str(self.manifest["model"].get("quantization", ""))

    @property
    def architecture(self) -> str:
        return str(self.manifest["model"].get("architecture", ""))

    def flat_metrics(self) -> dict[str, float]:
        """Numeric metrics as ``"int8.accuracy" -> 0.96``, nested keys joined by dots."""
        return dict(_flatten(self.manifest.get("metrics", {})))


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    items: list[tuple[str, float]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items.extend(_flatten(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            items.append((name, float(value)))
    return items


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle folder.

    Raises:
        BundleError: with a message saying what is wrong with the bundle.
    """
    folder = Path(path)
    manifest_path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as err:
        raise BundleError(f"{manifest_path} not found: is {folder} a model bundle?") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{manifest_path} is not valid JSON: {err}") from err
    try:
        fmt = int(manifest["format_version"])
        if fmt != BUNDLE_FORMAT_VERSION:
            raise BundleError(
                f"bundle format {fmt} is not supported (this service reads "
                f"format {BUNDLE_FORMAT_VERSION})"
            )
        labels = tuple(str(label) for label in manifest["labels"])
        preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
        model_path = folder / manifest["model"]["file"]
        expected_sha = str(manifest["model"]["sha256"])
        str(manifest["version"])
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{manifest_path} is missing or has a bad field: {err!r}") from err
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise BundleError(f"{manifest_path} needs two or more distinct labels, has {list(labels)}")
    if not model_path.is_file():
        raise BundleError(f"model file {model_path} named by the manifest is missing")
    actual_sha = sha256_file(model_path)
    if actual_sha != expected_sha:
        raise BundleError(
            f"{model_path} has sha256 {actual_sha}, the manifest says "
            f"{expected_sha}: the bundle is corrupt or incomplete"
        )
    return Bundle(folder, manifest, labels, preprocessing, model_path)


def write_bundle(
    folder: str | Path,
    model: bytes,
    labels: list[str],
    preprocessing: Preprocessing,
    version: str,
    quantization: str,
    architecture: str,
    metrics: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> Bundle:
    """Write a bundle folder (model.tflite + manifest.json) and return it verified."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.tflite"
    model_path.write_bytes(model)
    manifest = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "version": version,
        "labels": list(labels),
        "preprocessing": preprocessing.to_dict(),
        "model": {
            "file": model_path.name,
            "sha256": hashlib.sha256(model).hexdigest(),
            "bytes": len(model),
            "quantization": quantization,
            "architecture": architecture,
        },
        "metrics": metrics or {},
        "source": source or {},
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return load_bundle(out)
