"""smartbin-adapt: the shipped default fine-tuned on a small site folder, written as an int8
bundle the edge loads, with the site's new label and the base's missing ones kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import PHOTOS

from converter.adapt import build_bundle, load_replay, main
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
    load_site,
    top_logits,
    trunk_features,
)
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


@pytest.fixture(scope="module")
def adapted_bundle(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapted") / "bundle"
    main(
        ["--data", str(site), "--out", str(out), "--steps", "2", "--views", "2"]
        + ["--calibration-images", "8"]
    )
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


def test_adapted_bundle_went_through_the_parity_gate(adapted_bundle: Path) -> None:
    metrics = load_bundle(adapted_bundle).manifest.metrics
    assert {"float", "int8", "agreement"} <= set(metrics)
    assert metrics["int8"]["site"]["count"] == 12
    report = json.loads((adapted_bundle / "report.json").read_text())
    drop = report["float"]["site"]["accuracy"] - report["int8"]["site"]["accuracy"]
    assert drop * 100 <= 1.0


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
    with pytest.raises(ParityError, match="site accuracy"):
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
