"""``smartbin-calibrate``: a bundle's temperature and unsure threshold, and its figures on the
harder shift suite (:mod:`converter.shift_suite`).

The temperature minimises the negative log-likelihood of the int8 model's logits on the val
photos, by default both as they are and under every shift of the harder suite (each answer
counting once): a temperature fitted on the clean photos alone sharpens the scores to suit
TrashNet's white board, and makes the answers on any other floor overconfident
(``--fit-temperature-on val`` fits it so all the same; docs/models.md compares the two). The
unsure threshold is the lowest best score (after the temperature) at which the answers at or
above it are right at least ``target`` of the time (95 %) on the val photos under every shift
of the harder suite: the bin's photos are more like those than like TrashNet's. The test side
is only measured, never used to choose. ``smartbin-convert`` does the same for
every bundle it builds; this command does it for a bundle that exists (the shipped default,
whose checkpoint is gone), given the photos of its split.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from converter.shift_suite import (
    HARDER_SHIFTS,
    Textures,
    cut_out,
    encode,
    load_textures,
    shift_rng,
    suite,
)
from smartbin.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Calibration,
    Manifest,
    load_bundle,
    read_manifest_json,
)
from smartbin.model import TFLiteClassifier, softmax
from smartbin.preprocessing import prepare
from trainer.data import Sample, load_source, make_split_manifest, select
from trainer.evaluate import expected_calibration_error

logger = logging.getLogger(__name__)

TARGET_SURE_ACCURACY = 0.95
# What the temperature is fitted on: the val photos as they are and under the harder suite, or
# as they are only.
FIT_ON = ("val+shifts", "val")


def clean_logits(classifier: TFLiteClassifier, samples: Sequence[Sample]) -> np.ndarray:
    """The int8 model's logits for each photo as it is, (photos, labels)."""
    spec = classifier.bundle.preprocessing
    return np.stack([classifier.logits(prepare(s.data, spec)) for s in samples])


def suite_logits(
    classifier: TFLiteClassifier,
    samples: Sequence[Sample],
    textures: Textures | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """The int8 model's logits for each photo under each shift of the suite,
    ``{shift: (photos, labels)}``; each photo is cut out once for all its shifts."""
    spec = classifier.bundle.preprocessing
    shifts = suite(textures)
    rows: dict[str, list[np.ndarray]] = {name: [] for name in shifts}
    for index, sample in enumerate(samples):
        with Image.open(io.BytesIO(sample.data)) as image:
            cut = cut_out(image)
        for name, shift in shifts.items():
            photo = encode(shift(cut, shift_rng(sample.data, name)))
            rows[name].append(classifier.logits(prepare(photo, spec)))
        if progress is not None:
            progress(index + 1)
    labels = len(classifier.bundle.labels)
    return {
        name: np.stack(r) if r else np.empty((0, labels), np.float32) for name, r in rows.items()
    }


def accuracies(logits: dict[str, np.ndarray], targets: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy under each shift, and ``mean`` over the shifts that always run (a
    ``texture_floor`` is reported, not averaged)."""
    result = {name: float((z.argmax(1) == targets).mean()) for name, z in logits.items()}
    result["mean"] = float(np.mean([result[name] for name in HARDER_SHIFTS if name in result]))
    return result


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``targets`` under softmax(logits / temperature)."""
    scaled = logits.astype(np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(scaled - top).sum(axis=1)) + top[:, 0]
    return float((log_sum - scaled[np.arange(len(targets)), targets]).mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature in 0.05..20 minimising :func:`nll`.

    The NLL is convex in 1/temperature, so a golden-section search on its logarithm finds the
    one minimum."""
    if not len(targets):
        raise ValueError("no photos to fit a temperature on")
    low, high = np.log(0.05), np.log(20.0)
    golden = (np.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return nll(logits, targets, float(np.exp(log_t)))

    a, b = low + (1 - golden) * (high - low), low + golden * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(80):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = low + (1 - golden) * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + golden * (high - low)
            fb = loss(b)
    return float(np.exp((low + high) / 2))


def choose_threshold(probs: np.ndarray, targets: np.ndarray, target: float) -> float:
    """The lowest best score ``t`` such that the answers scoring ``t`` or more are right at
    least ``target`` of the time: the threshold that keeps the most answers sure.

    When no ``t`` gets there (even the most confident answer is wrong), 1.0: every answer
    unsure."""
    best = probs.max(axis=1)
    right = probs.argmax(axis=1) == targets
    order = np.argsort(-best, kind="stable")
    scores, hits = best[order], right[order]
    accuracy = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    # Only cut between distinct scores: every answer scoring the threshold is sure.
    cuts = np.flatnonzero(np.append(scores[:-1] > scores[1:], True))
    good = cuts[accuracy[cuts] >= target]
    if not len(good):
        return 1.0
    return float(scores[good[-1]])


def sure_figures(probs: np.ndarray, targets: np.ndarray, threshold: float) -> dict[str, float]:
    """The share of answers that stay sure at ``threshold`` and how often those are right."""
    best = probs.max(axis=1)
    sure = best >= threshold
    right = probs.argmax(axis=1) == targets
    return {
        "sure_share": float(sure.mean()) if len(sure) else 0.0,
        "sure_accuracy": float(right[sure].mean()) if sure.any() else 1.0,
        "count": int(len(sure)),
    }


def pooled(logits: dict[str, np.ndarray], targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every shift's logits stacked, with the targets repeated to match."""
    names = [name for name in logits if name in HARDER_SHIFTS]
    return np.concatenate([logits[n] for n in names]), np.tile(targets, len(names))


def calibrate(
    val: tuple[np.ndarray, np.ndarray],
    val_shifted: dict[str, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    test_shifted: dict[str, np.ndarray],
    target: float = TARGET_SURE_ACCURACY,
    fit_on: str = FIT_ON[0],
) -> tuple[Calibration, dict[str, Any]]:
    """Fit the temperature on ``val`` (logits, targets), with ``val_shifted`` too unless
    ``fit_on`` is ``"val"``; choose the threshold on the val photos under the harder suite
    (``val_shifted``), and measure both on test.

    Returns:
        The calibration, and the report: accuracy under each shift, the threshold's sure share
        and sure accuracy, and the expected calibration error before and after.
    """
    val_logits, val_targets = val
    test_logits, test_targets = test
    if fit_on not in FIT_ON:
        raise ValueError(f"fit_on is {fit_on!r}: one of {', '.join(FIT_ON)}")
    val_pool = pooled(val_shifted, val_targets)
    test_pool = pooled(test_shifted, test_targets)
    if fit_on == "val":
        temperature = fit_temperature(val_logits, val_targets)
    else:
        temperature = fit_temperature(
            np.concatenate([val_logits, val_pool[0]]), np.concatenate([val_targets, val_pool[1]])
        )
    threshold = choose_threshold(softmax(val_pool[0], temperature), val_pool[1], target)
    sides = {
        "val": (val_logits, val_targets),
        "test": (test_logits, test_targets),
        "val_harder_shifts": val_pool,
        "test_harder_shifts": test_pool,
    }
    report: dict[str, Any] = {
        "temperature": temperature,
        "unsure_below": threshold,
        "target_sure_accuracy": target,
        "temperature_fitted_on": fit_on,
        "threshold_chosen_on": f"val under the harder shift suite ({len(val_pool[1])} answers)",
        "ece_before": {},
        "ece_after": {},
        "nll_before": {},
        "nll_after": {},
        "sure": {},
    }
    for side, (logits, targets) in sides.items():
        if not len(targets):
            continue
        calibrated = softmax(logits, temperature)
        report["ece_before"][side] = expected_calibration_error(softmax(logits), targets)
        report["ece_after"][side] = expected_calibration_error(calibrated, targets)
        report["nll_before"][side] = nll(logits, targets)
        report["nll_after"][side] = nll(logits, targets, temperature)
        report["sure"][side] = sure_figures(calibrated, targets, threshold)
    report["int8_val_harder_shifts"] = accuracies(val_shifted, val_targets)
    report["int8_test_harder_shifts"] = accuracies(test_shifted, test_targets)
    return Calibration(temperature=temperature, unsure_below=threshold), report


def measure_and_calibrate(
    classifier: TFLiteClassifier,
    val: Sequence[Sample],
    test: Sequence[Sample],
    textures: Textures | None = None,
    target: float = TARGET_SURE_ACCURACY,
    fit_on: str = FIT_ON[0],
) -> tuple[Calibration, dict[str, Any]]:
    """Run the int8 model of ``classifier`` (its bundle uncalibrated or not: logits are raw) on
    val and test, as they are and under the harder suite, and :func:`calibrate`."""
    logits = collect_logits(classifier, {"val": val, "test": test}, textures)
    return calibrate_from_logits(logits, val, test, target, fit_on)


def collect_logits(
    classifier: TFLiteClassifier,
    sides: dict[str, Sequence[Sample]],
    textures: Textures | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """``{side: {"clean": logits, shift: logits, ...}}`` for each side."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for side, samples in sides.items():
        started = time.time()

        def progress(done: int, side: str = side, count: int = len(samples)) -> None:
            if done % 50 == 0 or done == count:
                logger.info("%s: %d / %d photos shifted and classified", side, done, count)

        out[side] = {"clean": clean_logits(classifier, samples)}
        out[side].update(suite_logits(classifier, samples, textures, progress))
        logger.info("%s side measured in %.0f s", side, time.time() - started)
    return out


def calibrate_from_logits(
    logits: dict[str, dict[str, np.ndarray]],
    val: Sequence[Sample],
    test: Sequence[Sample],
    target: float = TARGET_SURE_ACCURACY,
    fit_on: str = FIT_ON[0],
) -> tuple[Calibration, dict[str, Any]]:
    """:func:`calibrate` on the logits of :func:`collect_logits`."""
    val_targets = np.array([s.label for s in val], dtype=np.int64)
    test_targets = np.array([s.label for s in test], dtype=np.int64)

    def shifted(side: str) -> dict[str, np.ndarray]:
        return {k: v for k, v in logits[side].items() if k != "clean"}

    return calibrate(
        (logits["val"]["clean"], val_targets),
        shifted("val"),
        (logits["test"]["clean"], test_targets),
        shifted("test"),
        target,
        fit_on,
    )


def manifest_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What of a calibration report travels in the manifest's metrics."""
    return {
        "temperature": report["temperature"],
        "unsure_below": report["unsure_below"],
        "target_sure_accuracy": report["target_sure_accuracy"],
        "temperature_fitted_on": report["temperature_fitted_on"],
        "ece_before": report["ece_before"],
        "ece_after": report["ece_after"],
        "sure": {
            side: {k: v for k, v in figures.items() if k != "count"}
            for side, figures in report["sure"].items()
        },
    }


def update_bundle(folder: Path, calibration: Calibration, report: dict[str, Any]) -> Manifest:
    """Write ``calibration`` and the figures into the bundle's manifest (``metrics.int8
    .test_harder_shifts``, ``metrics.calibration``) and its report.json; the model is left
    as it is. A signature is removed: it vouched for the manifest being replaced."""
    data, _ = read_manifest_json(folder)
    data["calibration"] = calibration.model_dump(mode="json")
    metrics = data.setdefault("metrics", {})
    metrics.setdefault("int8", {})["test_harder_shifts"] = report["int8_test_harder_shifts"]
    metrics["calibration"] = manifest_summary(report)
    manifest = Manifest.model_validate(data)
    signature = folder / SIGNATURE_NAME
    if signature.exists():
        signature.unlink()
        logger.warning("%s removed: sign the recalibrated bundle again (smartbin-sign)", signature)
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
    report_path = folder / "report.json"
    full = json.loads(report_path.read_text()) if report_path.is_file() else {}
    full["int8_test_harder_shifts"] = report["int8_test_harder_shifts"]
    full["calibration"] = {k: v for k, v in report.items() if not k.startswith("int8_")}
    full["calibration"]["int8_val_harder_shifts"] = report["int8_val_harder_shifts"]
    report_path.write_text(json.dumps(full, indent=1) + "\n")
    load_bundle(folder)
    return manifest


def _load_cache(path: Path | None, key: dict[str, Any]) -> dict[str, dict[str, np.ndarray]] | None:
    if path is None or not path.is_file():
        return None
    with np.load(path) as saved:
        if json.loads(str(saved["key"])) != key:
            logger.info("cache %s is for another bundle, split or suite: measuring again", path)
            return None
        out: dict[str, dict[str, np.ndarray]] = {}
        for name in saved.files:
            if "/" in name:
                side, shift = name.split("/", 1)
                out.setdefault(side, {})[shift] = saved[name]
        return out


def _save_cache(
    path: Path | None, key: dict[str, Any], logits: dict[str, dict[str, np.ndarray]]
) -> None:
    if path is None:
        return
    arrays: dict[str, Any] = {
        f"{side}/{shift}": z for side, by in logits.items() for shift, z in by.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez_compressed(handle, key=np.array(json.dumps(key, sort_keys=True)), **arrays)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="bundle folder (its model is not changed)")
    parser.add_argument("--data", required=True, help="the photos of the bundle's split")
    parser.add_argument(
        "--split",
        type=Path,
        help="split.json of the training run (default: made again from --data with "
        "--split-seed, checked against the manifest's split_fingerprint)",
    )
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument(
        "--textures",
        help="also run texture_floor on textures from this folder or .pk3/.zip archive; "
        "'auto': the installed ufoai-textures package, if any",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=TARGET_SURE_ACCURACY,
        help="how often sure answers must be right on val under the harder suite",
    )
    parser.add_argument(
        "--fit-temperature-on",
        choices=FIT_ON,
        default=FIT_ON[0],
        help="the val photos as they are and under the harder suite (default), or as they are",
    )
    parser.add_argument("--threads", type=int, default=2, help="interpreter threads")
    parser.add_argument("--cache", type=Path, help="keep the measured logits here (.npz)")
    parser.add_argument(
        "--write",
        action="store_true",
        help="write the calibration and figures into the bundle (default: only print them)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    bundle = load_bundle(args.bundle)
    image_set = load_source(args.data)
    if args.split is not None:
        split = json.loads(args.split.read_text())
    else:
        split = make_split_manifest(image_set, seed=args.split_seed)
    recorded = bundle.manifest.source.get("split_fingerprint")
    if recorded and recorded != split["fingerprint"]:
        sys.exit(
            f"smartbin-calibrate: the split of {args.data} has fingerprint "
            f"{split['fingerprint']}, the bundle was made on {recorded}: pass its split.json "
            "(--split) or the photos and seed it was made from"
        )
    if args.textures == "auto":
        textures = load_textures()
    else:
        textures = load_textures(Path(args.textures)) if args.textures else None
    val, test = select(image_set, split, "val"), select(image_set, split, "test")
    key = {
        "model": bundle.sha256,
        "split": split["fingerprint"],
        "shifts": list(suite(textures)),
        "textures": str(textures.source) if textures else None,
    }
    logits = _load_cache(args.cache, key)
    if logits is None:
        classifier = TFLiteClassifier(bundle, num_threads=args.threads)
        logits = collect_logits(classifier, {"val": val, "test": test}, textures)
        _save_cache(args.cache, key, logits)
    calibration, report = calibrate_from_logits(
        logits, val, test, args.target, args.fit_temperature_on
    )
    print(json.dumps(report, indent=1))
    if args.write:
        update_bundle(args.bundle, calibration, report)
        print(f"calibration written to {args.bundle / MANIFEST_NAME}")


if __name__ == "__main__":
    main()
