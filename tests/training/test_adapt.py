"""smartbin-adapt: the shipped default fine-tuned on a small site folder, written as an int8
bundle the edge loads, with the site's new label and the base's missing ones kept."""

from __future__ import annotations

import io
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PHOTOS
from PIL import Image
from tiny import tiny_checkpoint

from converter.adapt import GATED, build_bundle, load_replay, main, pooled_accuracy
from converter.convert import ParityError
from smartbin.bundle import load_bundle
from smartbin.model import TFLiteClassifier
from smartbin.preprocessing import prepare
from trainer import recover
from trainer.adapt import (
    NOT_AN_ITEM,
    AdaptConfig,
    SiteError,
    adapt,
    cut_mix,
    load_backdrops,
    load_site,
    on_backdrops,
    top_logits,
    toward_base,
    trunk_features,
)
from trainer.data import Sample
from trainer.harden import main as harden_main
from trainer.model import build_from_checkpoint

NEW_LABEL = "site_only"
QUICK = AdaptConfig(steps=2, views=2, replay_views=1, batch_size=8)


def categories() -> list[str]:
    return sorted(d.name for d in PHOTOS.iterdir() if d.is_dir())


def make_site(folder: Path, per_label: int = 3) -> Path:
    """Three of the base categories, one the base lacks, a "not an item" folder and sidecars."""
    names = categories()
    for name in names[1:4]:
        (folder / name).mkdir(parents=True)
        for photo in sorted((PHOTOS / name).glob("*.jpg"))[:per_label]:
            shutil.copy(photo, folder / name / photo.name)
            (folder / name / photo.with_suffix(".json").name).write_text("{}")
    (folder / NEW_LABEL).mkdir()
    for photo in sorted((PHOTOS / names[-1]).glob("*.jpg"))[:per_label]:
        shutil.copy(photo, folder / NEW_LABEL / photo.name)
    (folder / NOT_AN_ITEM).mkdir()
    shutil.copy(next((PHOTOS / names[0]).glob("*.jpg")), folder / NOT_AN_ITEM / "empty.jpg")
    return folder


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The default's recovered checkpoint is rebuilt once, into a folder of the tests' own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SMARTBIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_site(tmp_path_factory.mktemp("site") / "photos")


class Warnings(logging.Handler):
    """The warnings a logger gave, as their messages."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def adapt_warnings() -> Warnings:
    return Warnings()


@pytest.fixture(scope="module")
def adapted_bundle(
    site: Path, tmp_path_factory: pytest.TempPathFactory, adapt_warnings: Warnings
) -> Path:
    """smartbin-adapt without --replay, from the default, on the site folder."""
    out = tmp_path_factory.mktemp("adapted") / "bundle"
    logger = logging.getLogger("converter.adapt")
    logger.addHandler(adapt_warnings)
    try:
        main(
            ["--data", str(site), "--out", str(out), "--steps", "2", "--views", "2"]
            + ["--calibration-images", "8"]
        )
    finally:
        logger.removeHandler(adapt_warnings)
    return out


def test_site_folder_skips_sidecars_and_the_not_an_item_folder(site: Path) -> None:
    photos = load_site(site)
    assert photos.labels == [*categories()[1:4], NEW_LABEL]
    assert photos.counts() == dict.fromkeys(photos.labels, 3)
    assert photos.skipped_folders == [NOT_AN_ITEM]
    kept = load_site(site, keep=(NOT_AN_ITEM,))
    assert NOT_AN_ITEM.lstrip(".") in kept.labels


def test_site_fingerprint_follows_the_photos_not_the_folder(site: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere"
    shutil.copytree(site, moved)
    assert load_site(moved).fingerprint == load_site(site).fingerprint
    photo = next((moved / NEW_LABEL).glob("*.jpg"))
    photo.write_bytes(photo.read_bytes() + b"\0")
    assert load_site(moved).fingerprint != load_site(site).fingerprint


def test_a_site_folder_without_photos_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SiteError, match="no labelled photos"):
        load_site(tmp_path)
    with pytest.raises(SiteError, match="not found"):
        load_site(tmp_path / "missing")


def test_trunk_and_top_together_are_the_whole_model() -> None:
    checkpoint = torch.load(recover.default_checkpoint(), map_location="cpu", weights_only=True)
    model = build_from_checkpoint(checkpoint)
    spec = load_bundle(recover.DEFAULT_BUNDLE).preprocessing
    pixels = torch.from_numpy(prepare(next(PHOTOS.rglob("*.jpg")).read_bytes(), spec).copy())
    pixels = pixels.permute(2, 0, 1)[None].float()
    with torch.no_grad():
        whole = model(pixels)
        parts = top_logits(model, trunk_features(model, pixels, 5), 5)
    torch.testing.assert_close(parts, whole, atol=1e-4, rtol=1e-4)


def test_adapted_bundle_loads_with_the_new_label_and_the_missing_ones(
    adapted_bundle: Path, site: Path
) -> None:
    bundle = load_bundle(adapted_bundle)
    base = load_bundle(recover.DEFAULT_BUNDLE)
    assert bundle.labels == (*base.labels, NEW_LABEL)
    assert bundle.quantization == "int8"
    record = bundle.manifest.adaptation
    assert record is not None
    assert record.base_sha256 == base.sha256 and record.base_version == base.version
    assert record.site_fingerprint == load_site(site).fingerprint
    assert record.added_labels == (NEW_LABEL,)
    assert set(record.missing_labels) == set(base.labels) - set(categories()[1:4])
    assert record.kept_by == "distillation" and record.replay_photos == 0
    assert record.site_photos_per_label == load_site(site).counts()
    classifier = TFLiteClassifier(bundle)
    probabilities = classifier.probabilities(
        prepare(next((site / NEW_LABEL).glob("*.jpg")).read_bytes(), bundle.preprocessing)
    )
    assert probabilities.shape == (len(bundle.labels),)


def test_adapting_without_replay_says_what_replay_adds(
    adapted_bundle: Path, adapt_warnings: Warnings
) -> None:
    (said,) = [m for m in adapt_warnings.messages if "--replay" in m]
    assert said.startswith("no --replay") and "the empty scene (1 photos) is left out" in said


def test_adapted_bundle_went_through_the_parity_gate(adapted_bundle: Path) -> None:
    metrics = load_bundle(adapted_bundle).manifest.metrics
    assert {"float", "int8", "agreement"} <= set(metrics)
    assert metrics["int8"]["site"]["count"] == 12
    report = json.loads((adapted_bundle / "report.json").read_text())
    # Without replay photos the gate counts the site photos alone.
    assert report["int8"][GATED] == {"accuracy": report["int8"]["site"]["accuracy"]}
    drop = report["float"][GATED]["accuracy"] - report["int8"][GATED]["accuracy"]
    assert drop * 100 <= 1.0


def test_the_gate_weighs_each_side_by_its_photo_count() -> None:
    """3 answers lost on 150 site photos are 2 points there, 0.35 over 850 photos."""
    photo = Sample("photo.jpg", 0, b"")
    report = {"int8": {"site": {"accuracy": 147 / 150}, "replay": {"accuracy": 1.0}}}
    sides = {"site": [photo] * 150, "replay": [photo] * 700}
    assert pooled_accuracy(report, sides, "int8") == pytest.approx(847 / 850)


def test_a_model_the_gate_refuses_writes_nothing(
    adapted_bundle: Path, site: Path, tmp_path: Path
) -> None:
    """Even an impossible gate leaves the folder as it was."""
    checkpoint = torch.load(recover.default_checkpoint(), map_location="cpu", weights_only=True)
    photos = load_site(site)
    adapted = adapt(checkpoint, photos, config=QUICK)
    out = tmp_path / "bundle"
    shutil.copytree(adapted_bundle, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    base = load_bundle(recover.DEFAULT_BUNDLE)
    with pytest.raises(ParityError, match="site and replay accuracy"):
        build_bundle(adapted, base, photos, [], out, calibration_count=4, max_drop=-101)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_replay_keeps_missing_labels_with_train_side_photos_only(site: Path) -> None:
    """Replay photos come from the train side of the replay folder's split, for every label."""
    base = load_bundle(recover.DEFAULT_BUNDLE)
    labels = [*base.labels, NEW_LABEL]
    replay = load_replay(str(PHOTOS), base, labels, per_label=2, seed=0)
    assert not replay.matches_base  # the shipped photos are not the default's data
    assert sorted({labels[s.label] for s in replay.samples}) == sorted(categories())
    checkpoint = torch.load(recover.default_checkpoint(), map_location="cpu", weights_only=True)
    adapted = adapt(checkpoint, load_site(site), replay.samples, QUICK)
    assert adapted.kept_by == "replay" and adapted.labels == labels
    assert adapted.checkpoint["state_dict"]["backbone.classifier.weight"].shape[0] == len(labels)


def test_adaptation_keeps_the_stem_and_first_blocks_and_trains_the_rest(site: Path) -> None:
    """What the site teaches lands from ``train_from_block`` on; the edges before it stay."""
    checkpoint = torch.load(recover.default_checkpoint(), map_location="cpu", weights_only=True)
    config = replace(QUICK, keep_base=0.0)
    adapted = adapt(checkpoint, load_site(site), config=config)
    before, after = checkpoint["state_dict"], adapted.checkpoint["state_dict"]
    cut = config.train_from_block
    frozen = ("backbone.conv_stem", *(f"backbone.blocks.{i}." for i in range(cut)))
    early = [k for k in before if k.startswith(frozen)]
    assert early and all(torch.equal(before[k], after[k]) for k in early)
    first_trained = [k for k in before if k.startswith(f"backbone.blocks.{cut}.")]
    assert any(not torch.equal(before[k], after[k]) for k in first_trained)


def _solid_jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (640, 480)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_an_item_put_on_the_empty_scene_is_framed_by_it() -> None:
    """Each replay item lands on a part of the site's empty photo, the same way every time."""
    photo = sorted((PHOTOS / categories()[1]).glob("*.jpg"))[0]
    sample = Sample(photo.name, 1, photo.read_bytes())
    red = _solid_jpeg((220, 20, 20))
    composed = on_backdrops([sample], [red], per_photo=3, seed=0)
    assert [c.label for c in composed] == [1, 1, 1]
    assert len({c.key for c in composed}) == 3
    for copy in composed:
        pixels = np.asarray(Image.open(io.BytesIO(copy.data)).convert("RGB")).astype(int)
        red_share = np.mean((pixels[..., 0] > 170) & (pixels[..., 1] < 70) & (pixels[..., 2] < 70))
        assert 0.2 < red_share < 0.95, red_share  # the floor around it, the item on it
    again = on_backdrops([sample], [red], per_photo=3, seed=0)
    assert [c.data for c in again] == [c.data for c in composed]
    assert on_backdrops([sample], [], per_photo=3, seed=0) == []
    # In a light without blue (the site's, trainer.light) the item loses its blue; the red floor
    # keeps the little it has.
    no_blue = on_backdrops([sample], [red], per_photo=1, seed=0, light=np.array([1.0, 1.0, 0.0]))
    assert _blue(no_blue[0].data) < 0.7 * _blue(composed[0].data)


def _blue(data: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[..., 2].mean())


def test_replay_items_are_also_learnt_on_the_sites_empty_scene(site: Path) -> None:
    """The site folder's not-an-item photos are the backdrops of the replay items."""
    assert len(load_backdrops(site)) == 1
    base = load_bundle(recover.DEFAULT_BUNDLE)
    replay = load_replay(str(PHOTOS), base, [*base.labels, NEW_LABEL], per_label=1, seed=0)
    checkpoint = torch.load(recover.default_checkpoint(), map_location="cpu", weights_only=True)
    adapted = adapt(checkpoint, load_site(site), replay.samples, QUICK, None, load_backdrops(site))
    assert adapted.backdrop_photos == len(replay.samples) * QUICK.backdrop_views > 0
    assert adapted.backdrop_light is not None and len(adapted.backdrop_light) == 3
    plain = adapt(checkpoint, load_site(site), replay.samples, QUICK)
    assert plain.backdrop_photos == 0 and plain.backdrop_light is None


def test_moving_toward_the_base_mixes_shared_weights_and_keeps_new_head_rows() -> None:
    base = {"w": torch.zeros(2, 3), "head": torch.zeros(2), "steps": torch.tensor(5)}
    adapted = {"w": torch.ones(2, 3), "head": torch.ones(3), "steps": torch.tensor(7)}
    mixed = toward_base(adapted, base, 0.25)
    assert torch.allclose(mixed["w"], torch.full((2, 3), 0.75))
    assert mixed["head"].tolist() == [0.75, 0.75, 1.0]  # the new label's row stays as adapted
    assert int(mixed["steps"]) == 7  # counters are not mixed
    assert torch.equal(toward_base(adapted, base, 0.0)["w"], adapted["w"])
    assert adapted["w"].sum() == 6  # the adapted weights themselves are left alone


def test_cut_mix_puts_one_box_of_a_partner_on_each_map_and_weighs_the_labels_by_area() -> None:
    """The loss weighs each row's label by the share of its map left as it was: that share
    must be what the box left, in every channel, and the box must come from the partner."""
    features = torch.arange(1.0, 9.0).view(8, 1, 1, 1).expand(8, 3, 10, 10).contiguous()
    generator = torch.Generator().manual_seed(0)
    boxes = set()
    for _ in range(10):
        mixed, partner, kept = cut_mix(features, generator)
        for row in range(8):
            own = mixed[row] == features[row]
            assert torch.equal(own, own[:1].expand_as(own))  # the same box in every channel
            if int(partner[row]) != row:
                assert float(own[0].float().mean()) == pytest.approx(kept)
                assert torch.equal(mixed[row][~own], features[int(partner[row])][~own])
        boxes.add(kept)
    assert len(boxes) > 1  # boxes of many sizes, not one
    assert torch.equal(features[:, 0, 0, 0], torch.arange(1.0, 9.0))  # the input is left alone


def test_hardening_retrains_the_last_blocks_and_keeps_the_early_ones(
    tiny_bundle: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """python -m trainer.harden: the blocks before --train-from-block keep their weights, that
    block and the head learn, and the checkpoint keeps its labels and split for
    smartbin-convert."""
    start_path = tiny_checkpoint(tiny_bundle)
    out = tmp_path / "hardened.pt"
    harden_main(
        [str(start_path), "--data", str(tiny_data), "--out", str(out)]
        + ["--views", "2", "--steps", "3", "--keep-base", "0", "--train-from-block", "4"]
        + ["--occlusion", "0.5", "--smallest-scale", "0.35", "--device", "cpu"]
    )
    start = torch.load(start_path, map_location="cpu", weights_only=True)
    hardened = torch.load(out, map_location="cpu", weights_only=True)
    assert hardened["labels"] == start["labels"]
    assert hardened["split"]["fingerprint"] == start["split"]["fingerprint"]
    before, after = start["state_dict"], hardened["state_dict"]
    frozen = ("backbone.conv_stem", *(f"backbone.blocks.{i}." for i in range(4)))
    early = [k for k in before if k.startswith(frozen)]
    assert early and all(torch.equal(before[k], after[k]) for k in early)
    first_trained = [k for k in before if k.startswith("backbone.blocks.4.")]
    assert any(not torch.equal(before[k], after[k]) for k in first_trained)
    head = "backbone.classifier.weight"
    assert not torch.equal(before[head], after[head])
    build_from_checkpoint(hardened)  # a model smartbin-convert can load


def test_hardening_at_body_lr_zero_trains_the_head_only(
    tiny_bundle: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """--body-lr sets the learning blocks' rate apart from the head's: at 0 the blocks from
    --train-from-block on keep their weights while the head still learns (here on cut-mixed
    batches only, --cutmix 1, which the head learns differently from the same run unmixed)."""
    start_path = tiny_checkpoint(tiny_bundle)

    def hardened(name: str, *extra: str) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        harden_main(
            [str(start_path), "--data", str(tiny_data), "--out", str(out), "--device", "cpu"]
            + ["--views", "2", "--steps", "3", "--keep-base", "0", "--train-from-block", "2"]
            + ["--body-lr", "0", *extra]
        )
        return torch.load(out, map_location="cpu", weights_only=True)["state_dict"]

    before = torch.load(start_path, map_location="cpu", weights_only=True)["state_dict"]
    after = hardened("mixed.pt", "--cutmix", "1")
    blocks = [k for k in before if k.startswith("backbone.blocks.")]
    assert blocks and all(torch.equal(before[k], after[k]) for k in blocks)
    head = "backbone.classifier.weight"
    assert not torch.equal(before[head], after[head])
    assert not torch.equal(hardened("unmixed.pt")[head], after[head])


def test_hardening_puts_items_on_backdrop_photos_when_given(
    tiny_bundle: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--backdrop-photos: the augmented views put items on those photos (so the same seeded
    run learns otherwise); a folder without photos is refused before any work."""
    start_path = tiny_checkpoint(tiny_bundle)
    floors = tmp_path / "floors"
    floors.mkdir()
    Image.fromarray(np.full((96, 128, 3), (30, 60, 170), np.uint8)).save(floors / "floor.png")

    def head(name: str, *extra: str) -> torch.Tensor:
        out = tmp_path / name
        harden_main(
            [str(start_path), "--data", str(tiny_data), "--out", str(out), "--device", "cpu"]
            + ["--views", "2", "--steps", "3", "--keep-base", "0", "--backgrounds", "1", *extra]
        )
        state = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
        return state["backbone.classifier.weight"]

    assert not torch.equal(head("drawn.pt"), head("photos.pt", "--backdrop-photos", str(floors)))
    with pytest.raises(SystemExit):
        head("none.pt", "--backdrop-photos", str(tmp_path / "empty"))
    assert "holds no photos" in capsys.readouterr().err


def test_photos_of_the_empty_scene_alone_adapt_the_model_to_it(tmp_path: Path) -> None:
    """Before anyone labels a photo, the bin's empty floor is enough: the replay items are put
    on it, every base label is kept, and the bundle records the floor photos' fingerprint."""
    floor = tmp_path / "site"
    (floor / NOT_AN_ITEM).mkdir(parents=True)
    (floor / NOT_AN_ITEM / "empty.jpg").write_bytes(_solid_jpeg((120, 80, 40)))
    site = load_site(floor)
    assert (
        site.samples == [] and site.fingerprint != load_site(make_site(tmp_path / "s")).fingerprint
    )
    out = tmp_path / "bundle"
    main(
        ["--data", str(floor), "--out", str(out), "--replay", str(PHOTOS)]
        + ["--replay-per-label", "1", "--steps", "2", "--views", "2", "--calibration-images", "8"]
    )
    bundle = load_bundle(out)
    base = load_bundle(recover.DEFAULT_BUNDLE)
    assert bundle.labels == base.labels
    record = bundle.manifest.adaptation
    assert record is not None and record.site_fingerprint == site.fingerprint
    assert record.missing_labels == tuple(base.labels) and record.kept_by == "replay"
    assert bundle.manifest.source["backdrop_photos"] == 2 * len(base.labels)


def test_the_empty_scene_alone_without_replay_says_what_to_add(tmp_path: Path) -> None:
    floor = tmp_path / "site"
    (floor / NOT_AN_ITEM).mkdir(parents=True)
    (floor / NOT_AN_ITEM / "empty.jpg").write_bytes(_solid_jpeg((120, 80, 40)))
    with pytest.raises(SystemExit, match="empty scene only.*--replay"):
        main(["--data", str(floor), "--out", str(tmp_path / "bundle")])
    with pytest.raises(SystemExit, match="empty scene only.*--backdrop-views above 0"):
        main(
            ["--data", str(floor), "--out", str(tmp_path / "bundle"), "--replay", str(PHOTOS)]
            + ["--replay-per-label", "1", "--backdrop-views", "0"]
        )
    assert not (tmp_path / "bundle").exists()
