"""Quick real training runs on the shipped photos, for the trainer and converter tests."""

from __future__ import annotations

from pathlib import Path

from converter.convert import convert
from smartbin.signing import generate_key_pair
from trainer.train import parse_args, run

TINY_SIZE = 96


def tiny_train_args(data: Path, out: Path, name: str, *extra: str, epochs: int = 1) -> list[str]:
    """smartbin-train's arguments for a quick run on the tiny data, plus ``extra``."""
    return [
        "--data",
        str(data),
        "--img-size",
        str(TINY_SIZE),
        "--epochs",
        str(epochs),
        "--patience",  # a tiny val side is noisy: train every epoch asked for
        str(epochs),
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--out",
        str(out),
        "--name",
        name,
        "--no-mlflow",
        *extra,
    ]


def tiny_checkpoint(tiny_bundle: Path) -> Path:
    """The trained checkpoint the tiny bundle was converted from."""
    return tiny_bundle.parent / "run" / "checkpoint.pt"


def tiny_bundle_args(data: Path, work: Path) -> list[str]:
    """The training run of the tiny bundle: from random weights, so at a learning rate higher
    than fine-tuning's, long enough for answers that differ between the photos (the QAT test
    compares them)."""
    return tiny_train_args(data, work, "run", "--lr", "0.003", "--body-lr", "0.003", epochs=4)


def signing_keys(tiny_bundle: Path) -> tuple[Path, Path]:
    """The private and public key the tiny bundle was signed with."""
    folder = tiny_bundle.parent / "keys"
    return folder / "bundle-signing.key", folder / "bundle-signing.pub"


def train_and_convert(data: Path, work: Path) -> Path:
    """Run the real trainer and converter CLIs' code paths; return the bundle folder, signed
    with a key pair made for it (:func:`signing_keys`)."""
    checkpoint = run(parse_args(tiny_bundle_args(data, work)))
    bundle = work / "bundle"
    private_key, _ = generate_key_pair(work / "keys")
    convert(
        checkpoint,
        bundle,
        calibration_count=16,
        max_drop=100.0,
        version="tiny-test",
        float_twin=work / "float32.tflite",
        signing_key=private_key,
    )
    return bundle
