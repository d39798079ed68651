"""``python -m converter.robustness``: a float checkpoint's accuracy as it is and off the white
board, quickly enough to compare many candidates.

For each checkpoint (or each mix of two, ``--interpolate``) it gives the accuracy on one side of
the split (val by default) as the photos are, and under every shift of the harder suite
(:mod:`converter.shift_suite`), with their mean. Cutting the items out and composing the shifted
photos takes most of the time of a measurement, and it does not depend on the model: the
prepared model inputs of every shift are kept in ``--cache`` (one ``.npy`` file a shift, about
120 MB each for 378 photos at 320 px), keyed by the photos, the preprocessing and the suite, so
every later model costs only its forward passes.

Candidates are chosen on val and on the suite over the val photos; the test side (``--side
test``) is for measuring the one chosen, once. The int8 figures of a bundle come from
``smartbin-convert`` and ``smartbin-calibrate``, which run the same suite through the int8 model.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from converter.calibrate import accuracies
from converter.shift_suite import Textures, cut_out, encode, load_textures, shift_rng, suite
from smartbin.preprocessing import Preprocessing, prepare
from trainer.data import Sample, load_source, make_split_manifest, select
from trainer.evaluate import predict
from trainer.model import PixelClassifier, build_from_checkpoint
from trainer.soup import check_alike

logger = logging.getLogger(__name__)

CLEAN = "clean"


def suite_key(samples: Sequence[Sample], spec: Preprocessing, shifts: Sequence[str]) -> str:
    """What a cache of prepared inputs depends on: the photos, the preprocessing, the shifts."""
    digest = hashlib.sha256()
    digest.update(json.dumps([spec.to_dict(), list(shifts)], sort_keys=True).encode())
    for sample in samples:
        digest.update(sample.digest.encode())
    return digest.hexdigest()[:16]


def build_inputs(
    samples: Sequence[Sample], spec: Preprocessing, textures: Textures | None = None
) -> dict[str, np.ndarray]:
    """The model inputs (uint8 NHWC) of ``samples`` as they are (``clean``) and under each
    shift; each photo is cut out once for all its shifts, as :func:`calibrate.suite_logits`
    does for an int8 model."""
    shifts = suite(textures)
    rows: dict[str, list[np.ndarray]] = {CLEAN: [], **{name: [] for name in shifts}}
    started = time.time()
    for index, sample in enumerate(samples, start=1):
        rows[CLEAN].append(prepare(sample.data, spec))
        with Image.open(io.BytesIO(sample.data)) as image:
            cut = cut_out(image)
        for name, shift in shifts.items():
            photo = encode(shift(cut, shift_rng(sample.data, name)))
            rows[name].append(prepare(photo, spec))
        if index % 50 == 0 or index == len(samples):
            logger.info(
                "%d / %d photos shifted (%.0f s)", index, len(samples), time.time() - started
            )
    return {name: np.stack(r) for name, r in rows.items()}


def cached_inputs(
    samples: Sequence[Sample],
    spec: Preprocessing,
    cache: Path | None,
    textures: Textures | None = None,
) -> dict[str, np.ndarray]:
    """:func:`build_inputs`, read from ``cache`` when it holds them and written there when not
    (each file whole or not at all: a crash leaves no half-written input)."""
    names = [CLEAN, *suite(textures)]
    if cache is None:
        return build_inputs(samples, spec, textures)
    folder = cache / suite_key(samples, spec, names)
    if all((folder / f"{name}.npy").is_file() for name in names):
        return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in names}
    inputs = build_inputs(samples, spec, textures)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in inputs.items():
        partial = folder / f"{name}.partial.npy"
        np.save(partial, array)
        partial.replace(folder / f"{name}.npy")
    logger.info("prepared inputs kept in %s", folder)
    return inputs


def log_probabilities(
    model: torch.nn.Module, pixels: np.ndarray, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    """The model's log-probabilities for uint8 NHWC inputs (logits up to a constant per row:
    the same answers, and the same scores under any temperature)."""
    rows = []
    for start in range(0, len(pixels), batch_size):
        batch = torch.from_numpy(np.array(pixels[start : start + batch_size]))  # a copy
        rows.append(predict(model, batch.permute(0, 3, 1, 2).float(), device, batch_size))
    return np.log(np.clip(np.concatenate(rows), 1e-12, 1.0))


def measure(
    model: torch.nn.Module,
    inputs: dict[str, np.ndarray],
    targets: np.ndarray,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Accuracy as the photos are (``clean``), under each shift, and ``mean`` over the suite."""
    device = device or torch.device("cpu")
    scores = {name: log_probabilities(model, x, device) for name, x in inputs.items()}
    clean = scores.pop(CLEAN)
    return {CLEAN: float((clean.argmax(1) == targets).mean()), **accuracies(scores, targets)}


def interpolate(
    start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * end``, tensor by tensor (integer buffers, such as batch
    norm's counters, are taken from ``end``). Both must share one parameterisation: batch norm
    folded alike, the same keys and shapes."""
    check_alike(start, end)
    mixed = {}
    for key, tensor in end.items():
        if tensor.is_floating_point():
            mixed[key] = torch.lerp(start[key].to(tensor.dtype), tensor, alpha)
        else:
            mixed[key] = tensor.clone()
    return mixed


def _load(path: Path) -> dict[str, Any]:
    checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint


def _model(checkpoint: dict[str, Any]) -> PixelClassifier:
    model = build_from_checkpoint(checkpoint)
    return model.to(memory_format=torch.channels_last)  # a third faster on CPU


def _split(args: argparse.Namespace, classes: list[str]) -> tuple[Any, dict[str, Any]]:
    image_set = load_source(args.data)
    if args.split is not None:
        return image_set, json.loads(args.split.read_text())
    return image_set, make_split_manifest(image_set, seed=args.split_seed)


def _candidates(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(name, checkpoint) of each model to measure."""
    checkpoints = [(str(p), _load(p)) for p in args.checkpoint]
    if args.interpolate_from is None:
        return checkpoints
    base = _load(args.interpolate_from)
    out = []
    for name, checkpoint in checkpoints:
        for alpha in args.alphas:
            mixed = dict(checkpoint)
            mixed["state_dict"] = interpolate(base["state_dict"], checkpoint["state_dict"], alpha)
            out.append((f"{name} alpha {alpha:g}", mixed))
    return out


def save_mixes(
    candidates: list[tuple[str, dict[str, Any]]], split: dict[str, Any], folder: Path
) -> None:
    """Write each interpolated checkpoint to ``folder`` (named by its alpha), with the whole
    split manifest, which the converter needs to calibrate and measure."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, checkpoint in candidates:
        path = folder / f"alpha-{name.rsplit(' ', 1)[-1]}.pt"
        partial = path.with_suffix(".partial")
        torch.save({**checkpoint, "split": split}, partial)
        partial.replace(path)
        logger.info("%s written to %s", name, path)


def _table(results: list[tuple[str, dict[str, float]]]) -> str:
    names = list(results[0][1])
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for model, figures in results:
        lines.append(f"| {model} | " + " | ".join(f"{100 * figures[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("checkpoint", type=Path, nargs="+", help="trainer checkpoints")
    parser.add_argument("--data", required=True, help="the photos of the checkpoints' split")
    parser.add_argument("--split", type=Path, help="split.json (default: made from --data)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--side", choices=("val", "test"), default="val")
    parser.add_argument("--cache", type=Path, help="folder keeping the prepared shifted inputs")
    parser.add_argument("--textures", type=Path, help="also run texture_floor on these")
    parser.add_argument(
        "--interpolate-from",
        type=Path,
        help="measure (1 - alpha) * this checkpoint + alpha * each checkpoint instead",
    )
    parser.add_argument(
        "--alphas", type=lambda t: [float(a) for a in t.split(",")], default=[0, 0.5, 1]
    )
    parser.add_argument(
        "--every",
        type=int,
        default=1,
        help="measure on every Nth photo of the side only (a quicker first look; the mean is "
        "then noisier)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--save",
        type=Path,
        help="with --interpolate-from: write each mix here as a checkpoint the converter takes "
        "(alpha-A.pt, carrying the split of --split or --data)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    candidates = _candidates(args)
    first = candidates[0][1]
    image_set, split = _split(args, first["labels"])
    for name, checkpoint in candidates:
        recorded = checkpoint["split"]["fingerprint"]
        if recorded != split["fingerprint"]:
            parser.error(
                f"{name} was trained on split {recorded}, --data gives {split['fingerprint']}"
            )
    samples = select(image_set, split, args.side)
    targets = np.array([s.label for s in samples])
    textures = load_textures(args.textures) if args.textures else None
    spec = Preprocessing.from_dict(first["preprocessing"])
    inputs = cached_inputs(samples, spec, args.cache, textures)
    if args.every > 1:
        inputs = {name: x[:: args.every] for name, x in inputs.items()}
        targets = targets[:: args.every]
    if args.save is not None and args.interpolate_from is not None:
        save_mixes(candidates, split, args.save)
    results = []
    for name, checkpoint in candidates:
        started = time.time()
        figures = measure(_model(checkpoint), inputs, targets)
        logger.info("%s: %s (%.0f s)", name, json.dumps(figures), time.time() - started)
        results.append((name, figures))
    print(f"{args.side} side, {len(targets)} photos; accuracy in %, float")
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(dict(results), indent=1) + "\n")


if __name__ == "__main__":
    main()
