"""``smartbin-convert``: checkpoint -> int8 TFLite bundle, with a float/int8 parity gate.

Calibrates on training images of the checkpoint's own split, measures float and int8 on the
val and test sides with the edge runtime's preprocessing, refuses the bundle when int8 val
accuracy falls more than ``--max-drop`` points below float, calibrates it (a temperature and an
unsure threshold, ``converter.calibrate``, measured on the harder shift suite of
``converter.shift_suite``), and writes the bundle with its metrics and calibration in the
manifest and a full report beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converter.calibrate import manifest_summary, measure_and_calibrate
from converter.shift_suite import load_textures
from converter.shifts import SHIFTS, shifted
from smartbin.bundle import load_bundle, write_bundle
from smartbin.model import TFLiteClassifier
from smartbin.preprocessing import Preprocessing, prepare
from smartbin.signing import SignatureError, key_id, load_signing_key, sign_bundle, verify_bundle
from trainer.data import SPLITS, Sample, load_source, select
from trainer.evaluate import classification_report, eval_tensor, plot_confusion, predict
from trainer.model import build_from_checkpoint

logger = logging.getLogger(__name__)
SUMMARY_KEYS = ("accuracy", "macro_f1", "ece", "count")


class ParityError(RuntimeError):
    """The int8 model lost more accuracy than allowed."""


def calibration_images(
    samples: list[Sample], spec: Preprocessing, count: int, seed: int
) -> list[np.ndarray]:
    """``count`` training images, drawn with a fixed seed, prepared as the bin prepares them."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(samples), size=min(count, len(samples)), replace=False)
    return [prepare(samples[i].data, spec) for i in sorted(chosen)]


def int8_probabilities(classifier: TFLiteClassifier, samples: list[Sample]) -> np.ndarray:
    spec = classifier.bundle.preprocessing
    return np.stack([classifier.probabilities(prepare(s.data, spec)) for s in samples])


def measure(
    model: torch.nn.Module,
    classifier: TFLiteClassifier,
    sides: dict[str, list[Sample]],
    labels: list[str],
) -> dict[str, Any]:
    """Float and int8 reports for each side, and how often their top-1 answers agree."""
    spec = classifier.bundle.preprocessing
    report: dict[str, Any] = {"float": {}, "int8": {}, "agreement": {}}
    for side, samples in sides.items():
        inputs, targets = eval_tensor(samples, spec)
        float_probs = predict(model, inputs, torch.device("cpu"))
        int8_probs = int8_probabilities(classifier, samples)
        report["float"][side] = classification_report(float_probs, targets.numpy(), labels)
        report["int8"][side] = classification_report(int8_probs, targets.numpy(), labels)
        report["agreement"][side] = float((float_probs.argmax(1) == int8_probs.argmax(1)).mean())
    return report


def measure_shifted(classifier: TFLiteClassifier, samples: list[Sample]) -> dict[str, float]:
    """int8 accuracy on the test photos under each camera shift, and their mean."""
    targets = np.array([s.label for s in samples])
    accuracy = {}
    for shift in SHIFTS:
        moved = [Sample(s.key, s.label, shifted(s.data, shift)) for s in samples]
        accuracy[shift] = float((int8_probabilities(classifier, moved).argmax(1) == targets).mean())
    accuracy["mean"] = float(np.mean(list(accuracy.values())))
    return accuracy


def manifest_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures that travel in the manifest (the full report sits beside it)."""
    metrics: dict[str, Any] = {
        kind: {side: {k: report[kind][side][k] for k in SUMMARY_KEYS} for side in report[kind]}
        for kind in ("float", "int8")
    }
    metrics["agreement"] = report["agreement"]
    metrics["int8"]["test_shifted"] = report["int8_test_shifted"]
    metrics["int8"]["test_harder_shifts"] = report["int8_test_harder_shifts"]
    metrics["calibration"] = manifest_summary(report["calibration"])
    return metrics


def check_parity(report: dict[str, Any], max_drop_points: float, side: str = "val") -> None:
    """Raise ParityError when int8 accuracy on ``side`` is more than ``max_drop_points``
    below float."""
    float_acc = report["float"][side]["accuracy"]
    int8_acc = report["int8"][side]["accuracy"]
    drop = (float_acc - int8_acc) * 100
    if drop > max_drop_points:
        raise ParityError(
            f"int8 {side} accuracy {int8_acc:.2%} is {drop:.2f} points below float "
            f"{float_acc:.2%}, more than the allowed {max_drop_points} points: "
            "try more calibration images (--calibration-images), a quantization-aware "
            "fine-tune (smartbin-train --qat --init CHECKPOINT) or another backbone"
        )


def convert(
    checkpoint_path: Path,
    out: Path,
    data: str | None = None,
    calibration_count: int = 200,
    max_drop: float = 1.0,
    version: str | None = None,
    seed: int = 0,
    float_twin: Path | None = None,
    signing_key: Path | None = None,
    textures: Path | None = None,
) -> dict[str, Any]:
    """Build the bundle at ``out``; raises ParityError, writing nothing, when int8 falls short.

    ``float_twin``, when given, also receives the float32 .tflite the int8 model was quantized
    from (same input, same outputs), for benchmarks comparing the two. ``signing_key``, an
    Ed25519 private key file (smartbin-keygen), signs the bundle (signature.json): bins that
    require signatures load it when they trust the matching public key.

    The bundle is calibrated (``converter.calibrate``): a temperature fitted on val, and an
    unsure threshold chosen on val under the harder shift suite (``converter.shift_suite``),
    whose int8 test accuracies are reported as ``int8_test_harder_shifts``; ``textures``, a
    folder or .pk3/.zip of textures, adds its ``texture_floor`` shift.

    Raises:
        ParityError: int8 lost more than ``max_drop`` points.
        SignatureError: ``signing_key`` is unusable (checked before any work is done).
    """
    from converter.tflite import export_float, quantize_int8

    key = load_signing_key(signing_key) if signing_key is not None else None
    floor_textures = load_textures(textures) if textures is not None else None

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    labels = list(checkpoint["labels"])
    spec = Preprocessing.from_dict(checkpoint["preprocessing"])
    model = build_from_checkpoint(checkpoint)
    image_set = load_source(data or checkpoint["data"])
    sides = {side: select(image_set, checkpoint["split"], side) for side in SPLITS}

    started = time.time()
    float_model = export_float(model, spec.input_size)
    int8_model = quantize_int8(
        float_model, calibration_images(sides["train"], spec, calibration_count, seed)
    )
    logger.info("converted in %.1f s", time.time() - started)
    source = bundle_source(checkpoint_path, checkpoint, min(calibration_count, len(sides["train"])))
    short_sha = source["checkpoint_sha256"][:8]
    version = version or f"{time.strftime('%Y.%m.%d')}-{checkpoint['arch']}-{short_sha}"
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "bundle"
        bundle = write_bundle(
            staging, int8_model, labels, spec, version, "int8", checkpoint["arch"], source=source
        )
        classifier = TFLiteClassifier(bundle)
        report = measure(model, classifier, {"val": sides["val"], "test": sides["test"]}, labels)
        report["int8_test_shifted"] = measure_shifted(classifier, sides["test"])
        report["model_bytes"] = {"float32": len(float_model), "int8": len(int8_model)}
        check_parity(report, max_drop)
        calibration, calibration_report = measure_and_calibrate(
            classifier, sides["val"], sides["test"], floor_textures
        )
        report["int8_test_harder_shifts"] = calibration_report.pop("int8_test_harder_shifts")
        report["calibration"] = calibration_report
        write_bundle(
            staging,
            int8_model,
            labels,
            spec,
            version,
            "int8",
            checkpoint["arch"],
            metrics=manifest_metrics(report),
            source=source,
            calibration=calibration,
        )
        write_report(staging, report, labels)
        if key is not None:
            sign_bundle(staging, key)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staging, out)
    load_bundle(out)
    if key is not None:
        public = key.public_key()
        verify_bundle(out, {key_id(public): public})
        logger.info("signed with key %s", key_id(public))
    if float_twin is not None:
        float_twin.parent.mkdir(parents=True, exist_ok=True)
        float_twin.write_bytes(float_model)
        logger.info("float32 twin: %s (%.2f MB)", float_twin, len(float_model) / 1e6)
    return report


def bundle_source(
    checkpoint_path: Path, checkpoint: dict[str, Any], calibration_count: int
) -> dict[str, Any]:
    """Where the bundle came from, for its manifest: checkpoint, data, split, calibration."""
    return {
        "checkpoint": checkpoint_path.name,
        "checkpoint_sha256": hashlib.sha256(checkpoint_path.read_bytes()).hexdigest(),
        "data": str(checkpoint["data"]),
        "split_fingerprint": checkpoint["split"]["fingerprint"],
        "calibration_images": calibration_count,
    }


def write_report(
    folder: Path, report: dict[str, Any], labels: list[str], side: str = "test"
) -> None:
    """The full report and the confusion pictures of ``side``, beside the manifest."""
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    for kind in ("float", "int8"):
        plot_confusion(
            report[kind][side], labels, folder / f"confusion_{kind}_{side}.png", f"{kind} {side}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint.pt written by smartbin-train")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument(
        "--data",
        help="images of the checkpoint's split (default: the path or "
        "hub id recorded in the checkpoint)",
    )
    parser.add_argument("--calibration-images", type=int, default=200)
    parser.add_argument(
        "--max-drop",
        type=float,
        default=1.0,
        help="largest allowed int8 val accuracy drop, in percentage points",
    )
    parser.add_argument("--version", help="bundle version (default: date-arch-checkpoint hash)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--float-twin",
        type=Path,
        help="also write the float32 .tflite the int8 model came from here (for smartbin-bench)",
    )
    parser.add_argument(
        "--signing-key",
        type=Path,
        help="Ed25519 private key (smartbin-keygen --out DIR) to sign the bundle with, for bins "
        "that require signed bundles (bundle_signing in their config)",
    )
    parser.add_argument(
        "--textures",
        type=Path,
        help="folder or .pk3/.zip of floor textures for the harder suite's texture_floor shift "
        "(e.g. /usr/share/games/ufoai/base/0textures.pk3 from Debian's ufoai-textures)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        report = convert(
            args.checkpoint,
            args.out,
            args.data,
            args.calibration_images,
            args.max_drop,
            args.version,
            args.seed,
            args.float_twin,
            args.signing_key,
            args.textures,
        )
    except ParityError as err:
        sys.exit(f"smartbin-convert: parity gate failed: {err}")
    except SignatureError as err:
        sys.exit(f"smartbin-convert: {err}")
    for kind in ("float", "int8"):
        print(
            f"{kind:>6}: val {report[kind]['val']['accuracy']:.2%}  "
            f"test {report[kind]['test']['accuracy']:.2%}"
        )
    print(
        f"agreement: val {report['agreement']['val']:.2%}  test {report['agreement']['test']:.2%}"
    )
    shifts = ", ".join(f"{k} {v:.2%}" for k, v in report["int8_test_shifted"].items())
    print(f"int8 test under camera shifts: {shifts}")
    harder = ", ".join(f"{k} {v:.2%}" for k, v in report["int8_test_harder_shifts"].items())
    print(f"int8 test under the harder shift suite: {harder}")
    calibration = report["calibration"]
    sure = calibration["sure"]
    print(
        f"calibration: temperature {calibration['temperature']:.3f}, unsure below "
        f"{calibration['unsure_below']:.3f}; sure answers: test "
        f"{sure['test']['sure_share']:.1%} ({sure['test']['sure_accuracy']:.1%} right), "
        f"harder shifts {sure['test_harder_shifts']['sure_share']:.1%} "
        f"({sure['test_harder_shifts']['sure_accuracy']:.1%} right)"
    )
    print(f"bundle: {args.out} ({report['model_bytes']['int8'] / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
