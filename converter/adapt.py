"""``smartbin-adapt``: fine-tune a bundle's model on one site's labelled photos and write an int8
bundle through the converter's parity gate.

The base is the shipped default (its float weights rebuilt from its float32 twin on first use,
``trainer.recover``) or any bundle given with its checkpoint or float twin. The fine-tuning is
``trainer.adapt``'s; the int8 model is calibrated on the site photos (and the replay photos),
and refused, with nothing written, when int8 answers the site and replay photos together more
than ``--max-drop`` points worse than float. The manifest records the base model and the site
photos' fingerprint (``adaptation``). docs/site-adaptation.md says what it reaches.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from converter.convert import (
    SUMMARY_KEYS,
    ParityError,
    calibration_images,
    check_parity,
    measure,
    write_report,
)
from smartbin.bundle import Adaptation, Bundle, BundleError, load_bundle, write_bundle
from smartbin.model import TFLiteClassifier
from smartbin.preprocessing import Preprocessing
from trainer import recover
from trainer.adapt import (
    NOT_AN_ITEM,
    AdaptConfig,
    Adapted,
    FeatureBank,
    SiteError,
    SitePhotos,
    adapt,
    load_backdrops,
    load_site,
    pick_replay,
    relabel,
)
from trainer.data import Sample, load_source, make_split_manifest, select
from trainer.model import build_from_checkpoint

logger = logging.getLogger(__name__)

# Replay photos per label: forgetting falls as they rise (docs/site-adaptation.md measured 40,
# 120 and 290); 120 keeps a 50-photo-per-label adaptation within minutes on 2 CPU cores.
REPLAY_PER_LABEL = 120


@dataclass
class Replay:
    """Photos of the base model's training side, and where they came from."""

    samples: list[Sample]
    source: str
    split_fingerprint: str
    matches_base: bool


def base_checkpoint(
    base: Bundle, checkpoint: Path | None = None, float_twin: Path | None = None
) -> dict[str, Any]:
    """The float model of ``base``: a trainer checkpoint, rebuilt from its float twin, or (for
    the shipped default) the default's recovered checkpoint.

    Raises:
        SiteError: none of those is at hand, or the checkpoint's labels are not the bundle's.
    """
    if checkpoint is not None:
        loaded: dict[str, Any] = torch.load(checkpoint, map_location="cpu", weights_only=True)
    elif float_twin is not None:
        loaded = recover.recover(float_twin, base.path)
    elif base.sha256 == load_bundle(recover.DEFAULT_BUNDLE).sha256:
        loaded = torch.load(recover.default_checkpoint(), map_location="cpu", weights_only=True)
    else:
        raise SiteError(
            f"{base.path} is not the shipped default: pass its training checkpoint "
            "(--base-checkpoint) or its float32 twin (--base-float-twin)"
        )
    if list(loaded["labels"]) != list(base.labels):
        raise SiteError(
            f"the base checkpoint's labels {loaded['labels']} are not the bundle's "
            f"{list(base.labels)}: pass the checkpoint {base.path} was converted from"
        )
    return loaded


def load_replay(folder: str, base: Bundle, labels: list[str], per_label: int, seed: int) -> Replay:
    """Up to ``per_label`` photos per label from the train side of ``folder``'s split (seed 0,
    as smartbin-train makes it), never its val or test photos."""
    image_set = load_source(folder)
    split = make_split_manifest(image_set, seed=0)
    recorded = base.manifest.source.get("split_fingerprint")
    matches = recorded == split["fingerprint"]
    if recorded and not matches:
        logger.warning(
            "the replay photos' split %s is not the base model's %s: its train side may hold "
            "photos the base model was measured on",
            split["fingerprint"],
            recorded,
        )
    train = select(image_set, split, "train")
    samples = pick_replay(train, image_set.classes, labels, per_label, seed)
    return Replay(samples, folder, split["fingerprint"], matches)


# The parity gate counts every photo the adapted model is measured on: the labelled site
# photos alone are a few dozen to a few hundred, each of them worth up to 0.7 points, and a
# handful of answers changing either way refused sound models (docs/site-adaptation.md).
GATED = "site and replay"


def pooled_accuracy(report: dict[str, Any], sides: dict[str, list[Sample]], kind: str) -> float:
    """``kind``'s accuracy over all of ``sides``' photos together: each side weighs its count."""
    right = sum(report[kind][side]["accuracy"] * len(samples) for side, samples in sides.items())
    return right / sum(len(samples) for samples in sides.values())


def build_bundle(
    adapted: Adapted,
    base: Bundle,
    site: SitePhotos,
    replay: list[Sample],
    out: Path,
    calibration_count: int = 200,
    max_drop: float = 1.0,
    version: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Convert the adapted model to an int8 bundle at ``out`` (replaced whole, or left as it
    was when the parity gate refuses the model) and return the converter's report.

    Raises:
        ParityError: int8 answers the site and replay photos, taken together, more than
            ``max_drop`` points worse than float.
    """
    from converter.tflite import export_float, quantize_int8

    checkpoint = adapted.checkpoint
    spec = Preprocessing.from_dict(checkpoint["preprocessing"])
    model = build_from_checkpoint(checkpoint)
    site_samples = relabel(site.samples, site.labels, adapted.labels)
    started = time.time()
    float_model = export_float(model, spec.input_size)
    photos = calibration_images(site_samples + replay, spec, calibration_count, seed)
    int8_model = quantize_int8(float_model, photos)
    logger.info("converted in %.1f s", time.time() - started)
    arch = checkpoint["arch"]
    version = version or f"{time.strftime('%Y.%m.%d')}-{arch}-site-{site.fingerprint[:8]}"
    record = Adaptation(
        base_version=base.version,
        base_sha256=base.sha256,
        site_fingerprint=site.fingerprint,
        site_photos_per_label=site.counts(),
        added_labels=tuple(adapted.added),
        missing_labels=tuple(adapted.missing),
        kept_by="replay" if replay else "distillation",
        replay_photos=len(replay),
    )
    source = {
        "base": str(base.path),
        "data": str(site.root),
        "calibration_images": len(photos),
        "backdrop_photos": adapted.backdrop_photos,
        "backdrop_light": adapted.backdrop_light,
        "passes": adapted.passes,
    }
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "bundle"
        bundle = write_bundle(staging, int8_model, adapted.labels, spec, version, "int8", arch)
        sides = {"site": site_samples, "replay": replay}
        sides = {side: samples for side, samples in sides.items() if samples}
        report = measure(model, TFLiteClassifier(bundle), sides, adapted.labels)
        report["model_bytes"] = {"float32": len(float_model), "int8": len(int8_model)}
        for kind in ("float", "int8"):
            report[kind][GATED] = {"accuracy": pooled_accuracy(report, sides, kind)}
        check_parity(report, max_drop, side=GATED)
        metrics: dict[str, Any] = {
            kind: {side: {k: report[kind][side][k] for k in SUMMARY_KEYS} for side in sides}
            for kind in ("float", "int8")
        }
        metrics["agreement"] = report["agreement"]
        write_bundle(
            staging,
            int8_model,
            adapted.labels,
            spec,
            version,
            "int8",
            arch,
            metrics=metrics,
            source=source,
            adaptation=record,
        )
        write_report(staging, report, adapted.labels, side=next(iter(sides)))
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staging, out)
    load_bundle(out)
    return report


def run(
    data: Path,
    out: Path,
    base_dir: Path = recover.DEFAULT_BUNDLE,
    checkpoint: Path | None = None,
    float_twin: Path | None = None,
    replay_folder: str | None = None,
    replay_per_label: int = REPLAY_PER_LABEL,
    config: AdaptConfig | None = None,
    keep: tuple[str, ...] = (),
    calibration_count: int = 200,
    max_drop: float = 1.0,
    version: str | None = None,
    bank: FeatureBank | None = None,
) -> dict[str, Any]:
    """Adapt ``base_dir``'s model to the site photos in ``data`` and write the bundle ``out``."""
    config = config or AdaptConfig()
    site = load_site(data, keep)
    if site.skipped_folders:
        logger.info(
            "not learnt as labels: %s (--keep-folder NAME learns one; with --replay, %s photos "
            "are the backdrops of the replay items)",
            site.skipped_folders,
            NOT_AN_ITEM,
        )
    base = load_bundle(base_dir)
    start = base_checkpoint(base, checkpoint, float_twin)
    replay: list[Sample] = []
    if replay_folder is not None:
        labels = [*base.labels, *(n for n in site.labels if n not in base.labels)]
        replay = load_replay(replay_folder, base, labels, replay_per_label, config.seed).samples
    # The empty scene is a backdrop for the replay items, unless it is learnt as a label.
    backdrops = [] if NOT_AN_ITEM in keep else load_backdrops(data)
    if not replay:
        # On the simulated sites, about 6 points of site accuracy (docs/site-adaptation.md).
        logger.warning(
            "no --replay: the base model's answers are distilled to keep what the site photos "
            "lack, and the empty scene (%d photos) is left out; the base model's training "
            "photos as --replay (for the default: TrashNet, a folder or garythung/trashnet) "
            "adapt further",
            len(backdrops),
        )
    adapted = adapt(start, site, replay, config, bank, backdrops)
    return build_bundle(
        adapted, base, site, replay, out, calibration_count, max_drop, version, config.seed
    )


def main(argv: list[str] | None = None) -> None:
    defaults = AdaptConfig()
    parser = argparse.ArgumentParser(prog="smartbin-adapt", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="site photos, a folder per label")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument(
        "--base", type=Path, default=recover.DEFAULT_BUNDLE, help="bundle to start from"
    )
    parser.add_argument("--base-checkpoint", type=Path, help="the base bundle's checkpoint.pt")
    parser.add_argument("--base-float-twin", type=Path, help="the base bundle's float32 .tflite")
    parser.add_argument(
        "--replay",
        help="the base model's training photos (folder per label): photos of its train side "
        "are mixed in to keep what the site photos lack; without it, the base model's answers "
        "are distilled instead",
    )
    parser.add_argument("--replay-per-label", type=int, default=REPLAY_PER_LABEL)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer updates")
    parser.add_argument("--views", type=int, default=defaults.views, help="views of each photo")
    parser.add_argument(
        "--backdrop-views",
        type=int,
        default=defaults.backdrop_views,
        help=f"each replay item is also put on this many of the site's {NOT_AN_ITEM} photos "
        "(its empty scene); 0: never",
    )
    parser.add_argument(
        "--no-match-light",
        action="store_true",
        help="put the replay items on the empty scene in their own light, not in the site's "
        "light as its labelled photos show it",
    )
    parser.add_argument(
        "--keep-base",
        type=float,
        default=defaults.keep_base,
        help="move the trained weights this share back toward the base model's (0: not at "
        "all; more keeps more of what the base knew)",
    )
    parser.add_argument(
        "--train-from-block",
        type=int,
        default=defaults.train_from_block,
        help="blocks before this one stay frozen",
    )
    parser.add_argument(
        "--body-lr",
        type=float,
        default=defaults.body_lr,
        help=f"peak learning rate of the blocks that learn (the head's: {defaults.lr:g})",
    )
    parser.add_argument(
        "--keep-folder",
        action="append",
        default=[],
        help="learn this folder as a label, though its name starts with a dot and such "
        f"folders are skipped (e.g. {NOT_AN_ITEM}, learnt as {NOT_AN_ITEM.lstrip('.')})",
    )
    parser.add_argument("--device", default=defaults.device, help="auto (CUDA when present), cpu")
    parser.add_argument("--calibration-images", type=int, default=200)
    parser.add_argument("--max-drop", type=float, default=1.0, help="parity gate, points")
    parser.add_argument("--version", help="bundle version (default: date-arch-site-fingerprint)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = replace(
        defaults,
        steps=args.steps,
        views=args.views,
        backdrop_views=args.backdrop_views,
        match_light=not args.no_match_light,
        keep_base=args.keep_base,
        train_from_block=args.train_from_block,
        body_lr=args.body_lr,
        device=args.device,
        seed=args.seed,
    )
    started = time.time()
    try:
        report = run(
            args.data,
            args.out,
            args.base,
            args.base_checkpoint,
            args.base_float_twin,
            args.replay,
            args.replay_per_label,
            config,
            tuple(args.keep_folder),
            args.calibration_images,
            args.max_drop,
            args.version,
        )
    except ParityError as err:
        sys.exit(f"smartbin-adapt: parity gate failed, nothing written: {err}")
    except (SiteError, BundleError, FileNotFoundError) as err:
        sys.exit(f"smartbin-adapt: {err}")
    for kind in ("float", "int8"):
        sides = [side for side in ("site", "replay") if side in report[kind]]
        figures = ", ".join(f"{side} photos {report[kind][side]['accuracy']:.2%}" for side in sides)
        print(f"{kind:>6}: {figures}")
    print(f"bundle: {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
