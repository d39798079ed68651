"""The model bundle: the only thing that passes from the converter to the bin.

A bundle is a folder holding ``manifest.json`` and the .tflite file it names. The manifest carries
the labels in output order, the preprocessing, the version, the model's sha256 and the metrics
measured when the bundle was made. :class:`Manifest` is its schema: a key this code does not know
or a value it does not support is refused, never silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    field_validator,
    model_validator,
)

from smartbin.preprocessing import Preprocessing

logger = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The Ed25519 signature beside the manifest, when the bundle is signed (smartbin.signing).
SIGNATURE_NAME = "signature.json"


class BundleError(Exception):
    """A bundle is missing, malformed or does not match its manifest."""


class ModelFile(BaseModel):
    """The manifest's ``model``: which file, its digest, and what kind of model it is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str = Field(pattern=r"^[^/\\]+\.tflite$", description="a .tflite file in the bundle")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: NonNegativeInt | None = None
    quantization: Literal["int8", "float32"]
    architecture: str = ""


class AlternativeModel(ModelFile):
    """An entry of the manifest's optional ``alternatives``: another build of the same network
    (same labels, preprocessing and input size), for instance the float32 model the int8 one was
    quantized from, with its own accuracy in ``metrics``. A bin serves whichever of the bundle's
    models runs fastest on its CPU, timed as it loads (:class:`smartbin.model.TFLiteClassifier`):
    int8 is the faster on Arm and on x86 with VNNI, float32 can be on x86 without it."""

    metrics: dict[str, Any] = Field(default_factory=dict)


class Calibration(BaseModel):
    """The manifest's optional ``calibration``: how far to trust the model's scores.

    The runtime divides the model's logits by ``temperature`` before the softmax (fitted on
    the val side: below 1 sharpens underconfident scores, above 1 flattens overconfident ones;
    the ranking is unchanged), and the edge marks an answer unsure when its best score, so
    scaled, is below ``unsure_below`` (unless its config sets ``confidence_threshold``).
    Optional, so the bundle format stays 1: a bundle without it loads as before (temperature
    1, the config's threshold)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(gt=0.0, le=100.0)
    unsure_below: float = Field(ge=0.0, le=1.0)


class Adaptation(BaseModel):
    """The manifest's optional ``adaptation``: the bundle is a base model fine-tuned on one
    site's photos (``smartbin-adapt``). Shown to operators, never acted on; optional, so the
    bundle format stays 1 (a bin older than the field refuses such a bundle by name)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_version: str = Field(min_length=1, description="the base bundle's version")
    base_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the base model's sha256")
    site_fingerprint: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 over the site photos' sorted relative paths and their sha256s",
    )
    site_photos_per_label: dict[str, NonNegativeInt]
    added_labels: tuple[str, ...] = ()
    missing_labels: tuple[str, ...] = ()
    kept_by: Literal["replay", "distillation"] = Field(
        description="how the labels the site photos lack were kept"
    )
    replay_photos: NonNegativeInt = 0


class Manifest(BaseModel):
    """``manifest.json``. ``metrics`` and ``source`` are free-form: what was measured and where
    the model came from, shown to operators and never acted on; ``calibration``, when present,
    is acted on (:class:`Calibration`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[1]
    version: str = Field(min_length=1)
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    model: ModelFile
    metrics: dict[str, Any] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)
    calibration: Calibration | None = None
    # Optional, so the bundle format stays 1: a bundle without it loads as before, and a bin
    # older than the field refuses a bundle with it by name ("alternatives: Extra inputs are not
    # permitted") instead of serving half of it.
    alternatives: tuple[AlternativeModel, ...] = ()
    adaptation: Adaptation | None = None

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        if len(labels) < 2 or len(set(labels)) != len(labels) or not all(labels):
            raise ValueError(f"needs two or more distinct, non-empty labels, has {list(labels)}")
        return labels

    @model_validator(mode="after")
    def _distinct_models(self) -> Manifest:
        files = [self.model.file, *(alternative.file for alternative in self.alternatives)]
        if len(set(files)) != len(files):
            raise ValueError(f"alternatives: each model needs a file of its own, has {files}")
        for alternative in self.alternatives:
            if alternative.architecture not in ("", self.model.architecture):
                raise ValueError(
                    f"alternatives: {alternative.file} is a {alternative.architecture}, the model "
                    f"a {self.model.architecture}: alternatives are builds of the same network"
                )
        return self


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model.file

    @property
    def models(self) -> tuple[ModelFile, ...]:
        """The manifest's ``model`` first, then its ``alternatives``."""
        return (self.manifest.model, *self.manifest.alternatives)

    def path_of(self, model: ModelFile) -> Path:
        """Where one of :attr:`models` lies."""
        return self.path / model.file

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    @property
    def preprocessing(self) -> Preprocessing:
        return self.manifest.preprocessing

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def sha256(self) -> str:
        return self.manifest.model.sha256

    @property
    def quantization(self) -> str:
        return self.manifest.model.quantization

    @property
    def architecture(self) -> str:
        return self.manifest.model.architecture

    @property
    def temperature(self) -> float:
        """What the logits are divided by before the softmax: 1 without a calibration."""
        calibration = self.manifest.calibration
        return calibration.temperature if calibration is not None else 1.0

    def flat_metrics(self) -> dict[str, float]:
        """Numeric metrics as ``"int8.accuracy" -> 0.96``, nested keys joined by dots."""
        return dict(_flatten(self.manifest.metrics))


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


def _validation_message(err: ValidationError) -> str:
    """pydantic's errors as one line: ``preprocessing.color: Input should be 'RGB' or 'BGR'``."""
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or 'manifest'}: {e['msg']}"
        for e in err.errors()
    )


def read_manifest(folder: Path) -> Manifest:
    """Parse and validate ``folder``'s manifest.json, without looking at the model file.

    Raises:
        BundleError: with a message saying what is wrong and where.
    """
    return read_manifest_json(folder)[1]


def read_manifest_json(folder: Path) -> tuple[dict[str, Any], Manifest]:
    """``folder``'s manifest.json read once: the JSON object as parsed (what a signature
    covers) and the :class:`Manifest` validated from it.

    Raises:
        BundleError: with a message saying what is wrong and where.
    """
    manifest_path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a folder: a bundle is a folder holding {MANIFEST_NAME}")
    try:
        text = manifest_path.read_text()
    except FileNotFoundError as err:
        raise BundleError(f"{manifest_path} not found: is {folder} a model bundle?") from err
    except (OSError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest_path} cannot be read: {err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BundleError(f"{manifest_path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise BundleError(f"{manifest_path} is not a valid manifest: a JSON object is expected")
    if data.get("format_version", 1) != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"bundle format {data['format_version']!r} is not supported (this code reads "
            f"format {BUNDLE_FORMAT_VERSION})"
        )
    try:
        return data, Manifest.model_validate(data)
    except ValidationError as err:
        raise BundleError(
            f"{manifest_path} is not a valid manifest: {_validation_message(err)}"
        ) from err


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle folder: a valid manifest and a model file matching its sha256.

    Raises:
        BundleError: with a message saying what is wrong with the bundle.
    """
    folder = Path(path)
    bundle = Bundle(folder, read_manifest(folder))
    for model in bundle.models:
        model_path = bundle.path_of(model)
        if not model_path.is_file():
            raise BundleError(f"model file {model_path} named by the manifest is missing")
        actual_sha = sha256_file(model_path)
        if actual_sha != model.sha256:
            raise BundleError(
                f"{model_path} has sha256 {actual_sha}, the manifest says "
                f"{model.sha256}: the bundle is corrupt or incomplete"
            )
    return bundle


def manifest_json(manifest: Manifest) -> str:
    """``manifest.json``'s text. The optional fields left unset (no ``calibration``, no
    ``alternatives``) are left out, so that bins older than those fields read the bundle."""
    unset = {"calibration"} if manifest.calibration is None else set()
    if not manifest.alternatives:
        unset.add("alternatives")
    if manifest.adaptation is None:
        unset.add("adaptation")
    return manifest.model_dump_json(indent=2, exclude=unset or None) + "\n"


def write_bundle(
    folder: str | Path,
    model: bytes,
    labels: list[str],
    preprocessing: Preprocessing,
    version: str,
    quantization: Literal["int8", "float32"],
    architecture: str,
    metrics: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    calibration: Calibration | None = None,
    adaptation: Adaptation | None = None,
) -> Bundle:
    """Write a bundle folder (model.tflite + manifest.json) and return it verified.

    A signature already in the folder is removed: it vouched for the manifest being replaced
    (sign the new one with :func:`smartbin.signing.sign_bundle`)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / SIGNATURE_NAME).unlink(missing_ok=True)
    model_path = out / "model.tflite"
    model_path.write_bytes(model)
    manifest = Manifest(
        format_version=BUNDLE_FORMAT_VERSION,
        version=version,
        labels=tuple(labels),
        preprocessing=preprocessing,
        model=ModelFile(
            file=model_path.name,
            sha256=hashlib.sha256(model).hexdigest(),
            bytes=len(model),
            quantization=quantization,
            architecture=architecture,
        ),
        metrics=metrics or {},
        source=source or {},
        calibration=calibration,
        adaptation=adaptation,
    )
    # No "calibration": null for an uncalibrated bundle: bins older than the field read it.
    (out / MANIFEST_NAME).write_text(manifest_json(manifest))
    return load_bundle(out)


def add_alternative(
    folder: str | Path,
    model: bytes,
    quantization: Literal["int8", "float32"],
    metrics: dict[str, Any] | None = None,
    file: str | None = None,
) -> Bundle:
    """Add ``model`` to the bundle in ``folder`` as one of its ``alternatives`` (replacing an
    alternative of the same file) and return the bundle verified.

    ``metrics`` are the alternative's own accuracy, as measured on it. The bundle's signature,
    if any, is removed: it vouched for the manifest being replaced.

    Raises:
        BundleError: the folder is not a valid bundle, or ``file`` is its main model's file.
    """
    bundle = load_bundle(folder)
    name = file or f"model_{quantization}.tflite"
    entry = AlternativeModel(
        file=name,
        sha256=hashlib.sha256(model).hexdigest(),
        bytes=len(model),
        quantization=quantization,
        architecture=bundle.architecture,
        metrics=metrics or {},
    )
    if name == bundle.manifest.model.file:
        raise BundleError(f"{name} is the bundle's main model: name the alternative otherwise")
    kept = tuple(a for a in bundle.manifest.alternatives if a.file != name)
    try:
        manifest = Manifest.model_validate(
            {**bundle.manifest.model_dump(), "alternatives": [*kept, entry]}
        )
    except ValidationError as err:
        raise BundleError(f"alternative {name} refused: {_validation_message(err)}") from err
    (bundle.path / SIGNATURE_NAME).unlink(missing_ok=True)
    (bundle.path / name).write_bytes(model)
    (bundle.path / MANIFEST_NAME).write_text(manifest_json(manifest))
    return load_bundle(bundle.path)
