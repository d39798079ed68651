"""Site simulation: how far ``smartbin-adapt`` lifts a bundle on one bin's scene, and what it
costs on TrashNet's own photos.

A simulated site is one floor (a picture of one of :data:`converter.shift_suite.FLOORS`, the
same for every photo, each photo seeing another part of it), one light (a white balance and a
brightness), one lens (a blur) and one distance (the item's scale). TrashNet's items are cut off
their white board (:func:`converter.shift_suite.cut_out`) and composed on it. The labelled site
photos come from items of the TRAIN side of the default's split, the site's test photos from
the TEST side, so no item adapted on is measured.

For each count of labelled photos per category (0, 5, 10, 25, 50; nested: the 10 hold the 5)
the default is adapted (``converter.adapt``, int8 through the parity gate) and measured on the
site's test photos and on TrashNet's test photos as they are (forgetting). Run from a
checkout, with TrashNet at hand (never in tests):

    python -m converter.site_sim --data ../shared/data/trashnet --out runs/site-sim

It writes ``results.json``, prints a Markdown table and draws ``site-adaptation.png``;
``--results A/results.json B/results.json`` prints and draws several runs together.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from converter.adapt import REPLAY_PER_LABEL, base_checkpoint, build_bundle
from converter.shift_suite import WHITE_BALANCES, composite, cut_out, encode, make_floor
from smartbin.bundle import load_bundle
from smartbin.model import TFLiteClassifier
from smartbin.preprocessing import prepare
from trainer import recover
from trainer.adapt import (
    NOT_AN_ITEM,
    AdaptConfig,
    FeatureBank,
    SitePhotos,
    adapt,
    pick_replay,
    site_fingerprint,
    top_logits,
)
from trainer.data import Sample, first_per_class, load_source, make_split_manifest, select
from trainer.model import build_from_checkpoint
from trainer.train import choose_device

logger = logging.getLogger(__name__)

COUNTS = (0, 5, 10, 25, 50)
# Photos of the empty site: the few false triggers an operator files as "not an item".
EMPTY_PHOTOS = 10


@dataclass(frozen=True)
class Site:
    """One bin's scene: floor, light, lens and distance."""

    name: str
    floor: str  # a kind of converter.shift_suite.FLOORS
    white_balance: str  # a key of WHITE_BALANCES, or "neutral"
    brightness: float  # multiplies every pixel
    blur: float  # Gaussian blur radius, pixels at 512 px wide
    scale: float  # the item's size against TrashNet's (further away below 1)
    seed: int


SITES = {
    site.name: site
    for site in (
        Site("wood-tungsten", "wood", "tungsten", 0.9, 1.0, 0.8, 1),
        Site("tiles-daylight-far", "tiles", "cool_daylight", 1.05, 1.5, 0.6, 2),
        Site("metal-fluorescent", "brushed_metal", "fluorescent", 0.8, 0.8, 0.7, 3),
    )
}


class SiteCamera:
    """Photographs items at one :class:`Site`: the floor is drawn once, each photo sees a part
    of it chosen by the photo's bytes, so a photo always gives the same picture."""

    def __init__(self, site: Site, width: int = 512, height: int = 384) -> None:
        self.site = site
        rng = np.random.default_rng(site.seed)
        self.floor = make_floor(site.floor, rng, int(width * 1.5), int(height * 1.5))

    def _rng(self, data: bytes) -> np.random.Generator:
        digest = hashlib.sha256(self.site.name.encode() + b"\0" + data).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def _floor_part(self, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
        floor = self.floor
        if floor.shape[0] < height or floor.shape[1] < width:
            image = Image.fromarray(floor.astype(np.uint8)).resize(
                (width * 3 // 2, height * 3 // 2)
            )
            floor = np.asarray(image, dtype=np.float32)
        top = int(rng.integers(0, floor.shape[0] - height + 1))
        left = int(rng.integers(0, floor.shape[1] - width + 1))
        part: np.ndarray = floor[top : top + height, left : left + width]
        return part

    def photograph(self, data: bytes) -> bytes:
        """The item of a TrashNet photo on this site's floor, light and lens (JPEG)."""
        rng = self._rng(data)
        with Image.open(io.BytesIO(data)) as image:
            cut = cut_out(image)
        width, height = cut.size
        centre = (
            width / 2 + rng.uniform(-0.08, 0.08) * width,
            height / 2 + rng.uniform(-0.08, 0.08) * height,
        )
        photo = composite(cut, self._floor_part(rng, width, height), self.site.scale, centre)
        return self._through_lens(photo)

    def photograph_empty(self, index: int, width: int = 512, height: int = 384) -> bytes:
        """The floor with nothing on it (what the bin files as not an item), ``index`` choosing
        the part of the floor."""
        rng = self._rng(f"empty {index}".encode())
        return self._through_lens(self._floor_part(rng, width, height))

    def _through_lens(self, photo: np.ndarray) -> bytes:
        gains = np.array(WHITE_BALANCES.get(self.site.white_balance, (1.0, 1.0, 1.0)))
        lit = np.clip(photo.astype(np.float32) * gains * self.site.brightness, 0, 255)
        blurred = Image.fromarray(lit.astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(self.site.blur * photo.shape[1] / 512)
        )
        return encode(np.asarray(blurred))


def nested_picks(samples: Sequence[Sample], classes: int, most: int, seed: int) -> list[Sample]:
    """Up to ``most`` photos per class in a fixed random order, class after class: the first
    ``k`` of each class's list are the photos of a ``k``-per-class site."""
    rng = np.random.default_rng(seed)
    picked: list[Sample] = []
    for label in range(classes):
        of_label = [s for s in samples if s.label == label]
        picked.extend(of_label[i] for i in rng.permutation(len(of_label))[:most])
    return picked


def photographed(camera: SiteCamera, samples: Sequence[Sample]) -> list[Sample]:
    started = time.time()
    out = [Sample(s.key, s.label, camera.photograph(s.data)) for s in samples]
    logger.info("%d photos on %s in %.0f s", len(out), camera.site.name, time.time() - started)
    return out


def int8_accuracy(bundle: Path, samples: Sequence[Sample]) -> float:
    classifier = TFLiteClassifier(load_bundle(bundle))
    spec = classifier.bundle.preprocessing
    right = [classifier.probabilities(prepare(s.data, spec)).argmax() == s.label for s in samples]
    return float(np.mean(right))


def float_accuracy(
    checkpoint: dict[str, Any], bank: FeatureBank, samples: Sequence[Sample], cut: int
) -> float:
    """The float model's accuracy from the bank's features of each photo as the bin sees it."""
    model = build_from_checkpoint(checkpoint).to(bank.device)
    features = bank.features(samples, 1, 0)
    with torch.no_grad():
        logits = torch.cat(
            [
                top_logits(model, features[i : i + 64].to(bank.device).float(), cut).cpu()
                for i in range(0, len(features), 64)
            ]
        )
    targets = torch.tensor([s.label for s in samples])
    return float((logits.argmax(1) == targets).float().mean())


def write_site_folder(
    folder: Path, samples: Sequence[Sample], classes: Sequence[str], empty: Sequence[bytes] = ()
) -> None:
    """The site photos as a smartbin-adapt folder (for timing the command on them), the empty
    scene's photos under not-an-item."""
    for sample in samples:
        path = folder / classes[sample.label] / (Path(sample.key).stem + ".jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sample.data)
    for index, data in enumerate(empty):
        path = folder / NOT_AN_ITEM / f"empty-{index:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def measure_site(
    site: Site,
    trashnet: dict[str, list[Sample]],
    classes: list[str],
    counts: Sequence[int],
    out: Path,
    config: AdaptConfig,
    replay_per_label: int,
    convert: Sequence[int],
) -> list[dict[str, Any]]:
    """Adapt the default at each count of ``counts`` and measure it; one row per count."""
    camera = SiteCamera(site)
    site_train = photographed(
        camera, nested_picks(trashnet["train"], len(classes), max(counts), site.seed)
    )
    site_test = photographed(camera, trashnet["test"])
    empty = [camera.photograph_empty(i) for i in range(EMPTY_PHOTOS)]
    write_site_folder(
        out / site.name / "photos", first_per_class(site_train, max(counts)), classes, empty
    )
    base = load_bundle(recover.DEFAULT_BUNDLE)
    start = base_checkpoint(base)
    device = choose_device(config.device)
    bank = FeatureBank(
        build_from_checkpoint(start).to(device), base.preprocessing, config.train_from_block, device
    )
    replay = pick_replay(trashnet["train"], classes, classes, replay_per_label, config.seed)
    rows = []
    for count in counts:
        started = time.time()
        row: dict[str, Any] = {"site": site.name, "per_label": count}
        if count == 0:
            checkpoint, bundle = start, recover.DEFAULT_BUNDLE
        else:
            chosen = first_per_class(site_train, count)
            fingerprint = site_fingerprint([(s.key, s.data) for s in chosen])
            photos = SitePhotos(out / site.name / "photos", list(classes), chosen, fingerprint)
            adapted = adapt(start, photos, replay, config, bank, empty)
            checkpoint = adapted.checkpoint
            bundle = out / site.name / f"bundle-{count}"
            if count in convert:
                build_bundle(adapted, base, photos, replay, bundle, seed=config.seed)
        row["float_site"] = float_accuracy(checkpoint, bank, site_test, config.train_from_block)
        row["float_trashnet_test"] = float_accuracy(
            checkpoint, bank, trashnet["test"], config.train_from_block
        )
        if count in convert or count == 0:
            row["int8_site"] = int8_accuracy(bundle, site_test)
            row["int8_trashnet_test"] = int8_accuracy(bundle, trashnet["test"])
        row["seconds"] = time.time() - started
        logger.info("%s", row)
        rows.append(row)
    return rows


def _percent(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.1%}" if key in row else "not converted"


def table(rows: Sequence[dict[str, Any]], side: str = "test") -> str:
    """The rows as a Markdown table; ``side`` names the TrashNet photos they were measured on
    (the rows' keys say ``test`` either way)."""
    lines = [
        "| site | labelled photos per category | site, float | site, int8 "
        f"| TrashNet {side}, float | TrashNet {side}, int8 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            _percent(row, key)
            for key in ("float_site", "int8_site", "float_trashnet_test", "int8_trashnet_test")
        ]
        lines.append(f"| {row['site']} | {row['per_label']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path, side: str = "test") -> None:
    """Site and TrashNet accuracy (on its ``side`` photos) against the photos per category:
    float lines, int8 points where the model was converted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in dict.fromkeys(r["site"] for r in rows):
        mine = [r for r in rows if r["site"] == name]
        counts = [r["per_label"] for r in mine]
        (line,) = ax.plot(counts, [100 * r["float_site"] for r in mine], "o-", label=f"{name}")
        colour = line.get_color()
        ax.plot(counts, [100 * r["float_trashnet_test"] for r in mine], "s--", color=colour)
        for key in ("int8_site", "int8_trashnet_test"):
            done = [r for r in mine if key in r]
            ax.plot(
                [r["per_label"] for r in done],
                [100 * r[key] for r in done],
                "x",
                color=colour,
                markersize=9,
            )
    ax.plot([], [], "k-", label="site photos (float)")
    ax.plot([], [], "k--", label=f"TrashNet {side} photos (float)")
    ax.plot([], [], "kx", label="int8 bundle")
    ax.axhline(90, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("labelled site photos per category")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(sorted({r["per_label"] for r in rows}))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="TrashNet, a folder per category (to measure)")
    parser.add_argument("--out", type=Path, default=Path("runs/site-sim"))
    parser.add_argument("--sites", nargs="+", default=list(SITES)[:2], choices=list(SITES))
    parser.add_argument("--counts", nargs="+", type=int, default=list(COUNTS))
    parser.add_argument(
        "--measure-on",
        choices=("test", "val"),
        default="test",
        help="the side of the split whose items make the site's measured photos and measure "
        "forgetting: val to choose a recipe, test to report the chosen one",
    )
    parser.add_argument("--replay-per-label", type=int, default=REPLAY_PER_LABEL)
    parser.add_argument("--steps", type=int, default=AdaptConfig.steps)
    parser.add_argument("--views", type=int, default=AdaptConfig.views)
    parser.add_argument("--train-from-block", type=int, default=AdaptConfig.train_from_block)
    parser.add_argument("--body-lr", type=float, default=AdaptConfig.body_lr)
    parser.add_argument("--keep-base", type=float, default=AdaptConfig.keep_base)
    parser.add_argument(
        "--cutmix",
        type=float,
        default=AdaptConfig.cutmix,
        help="share of the batches cut-mixed at the frozen blocks' output",
    )
    parser.add_argument(
        "--no-replay-distill",
        action="store_true",
        help="replay photos learn their labels only, not the base model's answers too",
    )
    parser.add_argument(
        "--no-match-light",
        action="store_true",
        help="replay items on the empty floor keep their own light (smartbin-adapt's flag)",
    )
    parser.add_argument(
        "--int8-counts",
        nargs="*",
        type=int,
        help="the counts whose adapted model is converted to int8 and measured so (default: "
        "all; the others are measured in float)",
    )
    parser.add_argument(
        "--results",
        nargs="+",
        type=Path,
        help="measure nothing: print the table of these results.json files (runs side by side, "
        "one per site) and draw their plot in --out",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.results:
        results = [json.loads(path.read_text()) for path in args.results]
        sides = sorted({r.get("measured_on", "test") for r in results})
        if len(sides) > 1:
            parser.error(
                f"--results: these runs were measured on different sides ({', '.join(sides)}); "
                "put side by side only runs of one --measure-on"
            )
        merged = [row for result in results for row in result["rows"]]
        print(table(merged, sides[0]))
        args.out.mkdir(parents=True, exist_ok=True)
        plot(merged, args.out / "site-adaptation.png", sides[0])
        return
    if args.data is None:
        parser.error("--data is required to measure (only --results needs none)")
    config = AdaptConfig(
        steps=args.steps,
        views=args.views,
        train_from_block=args.train_from_block,
        body_lr=args.body_lr,
        keep_base=args.keep_base,
        cutmix=args.cutmix,
        replay_distill=not args.no_replay_distill,
        match_light=not args.no_match_light,
    )
    image_set = load_source(args.data)
    split = make_split_manifest(image_set, seed=0)
    recorded = load_bundle(recover.DEFAULT_BUNDLE).manifest.source.get("split_fingerprint")
    if split["fingerprint"] != recorded:
        raise SystemExit(
            f"{args.data} gives split {split['fingerprint']}, the default's is {recorded}"
        )
    # Recipes are chosen with --measure-on val; the rows keep their names ("test") either way.
    trashnet = {"train": select(image_set, split, "train")}
    trashnet["test"] = select(image_set, split, args.measure_on)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in args.sites:
        rows += measure_site(
            SITES[name],
            trashnet,
            image_set.classes,
            args.counts,
            args.out,
            config,
            args.replay_per_label,
            args.counts if args.int8_counts is None else args.int8_counts,
        )
        result = {"config": asdict(config), "sites": [asdict(SITES[n]) for n in args.sites]}
        result["measured_on"] = args.measure_on
        result["rows"] = rows
        (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows, args.measure_on))
    plot(rows, args.out / "site-adaptation.png", args.measure_on)


if __name__ == "__main__":
    main()
