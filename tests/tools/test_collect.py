"""smartbin-collect copies the photos filed on a bin into a training folder over ExportLabelled:
every photo with its label, bin and time, a folder the trainer loads, and nothing lost or
half-written when the bin goes away mid-export."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import PHOTOS, free_port, wait_for
from PIL import Image

from edge_service.config import LabelledImagesConfig
from edge_service.const import DEFAULT_BUNDLE_DIR
from edge_service.labelled_store import NOT_AN_ITEM, LabelledStore
from edge_service.recent import Guess, PhotoRecord, photo_id_for
from smartbin_tools.collect import Summary, tidy
from smartbin_tools.service import ServiceProcess, serve_args, spawn_service

BIN = "bin-17"
LABELS = ("first-label", "second-label")


def record(jpeg: bytes, taken_at: float) -> PhotoRecord:
    return PhotoRecord(
        photo_id_for(jpeg, taken_at),
        jpeg,
        taken_at,
        "motion",
        "model-7",
        (Guess("first-label", 0.41), Guess("second-label", 0.33)),
        True,
    )


def noisy_jpeg(seed: int, size: int = 900) -> bytes:
    """A large photo (about 1 MB): enough of them make an export last long enough to cut."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def filed_bin(folder: Path, photos: list[bytes]) -> dict[str, tuple[str, str]]:
    """File ``photos`` on a bin's labelled store in turn under each label and not-an-item;
    returns {photo id: (label, sha256)}."""
    store = LabelledStore(LabelledImagesConfig(folder=folder), BIN)
    labels = (*LABELS, NOT_AN_ITEM)
    filed = {}
    for index, jpeg in enumerate(photos):
        photo = store.file(record(jpeg, 1_790_000_000 + index), labels[index % len(labels)])
        filed[photo.photo_id] = (photo.label, photo.sha256)
    return filed


def start_bin(tmp_path: Path, labelled: Path, admin_port: int) -> ServiceProcess:
    config = tmp_path / "bin.yaml"
    settings = {
        "bin_id": BIN,
        "labelled_images": {"folder": str(labelled)},
        "admin": {"port": admin_port},
        "metrics_host": "127.0.0.1",
    }
    config.write_text(yaml.safe_dump(settings))
    return spawn_service(serve_args(DEFAULT_BUNDLE_DIR, config))


def collect(target: str, out: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "smartbin_tools.collect", "--target", target, "--out"]
    return subprocess.run(
        [*command, str(out)], capture_output=True, text=True, timeout=120, check=False
    )


def collected(out: Path) -> dict[str, tuple[str, str]]:
    """{photo id: (label, sha256)} of the photos in ``out``, each checked against its sidecar
    and named by its bin and id."""
    found = {}
    for sidecar in out.glob("*/*.json"):
        meta = json.loads(sidecar.read_text())
        data = sidecar.with_suffix(".jpg").read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"] and len(data) == meta["size"]
        assert sidecar.parent.name == meta["label"]
        assert sidecar.stem == f"{meta['bin_id']}_{meta['photo_id']}"
        found[meta["photo_id"]] = (meta["label"], meta["sha256"])
    return found


def leftovers(out: Path) -> list[Path]:
    """Files a reader of the folder could mistake for photos: partial writes, photos without a
    sidecar."""
    partial = list(out.glob("*/.*.part"))
    orphans = [p for p in out.glob("*/*.jpg") if not p.with_suffix(".json").exists()]
    return partial + orphans


def test_collect_writes_a_training_folder_with_each_photos_origin(tmp_path: Path) -> None:
    photos = [path.read_bytes() for path in sorted(PHOTOS.glob("*/*.jpg"))[:7]]
    filed = filed_bin(tmp_path / "labelled", photos)
    admin_port = free_port()
    out = tmp_path / "training"
    with start_bin(tmp_path, tmp_path / "labelled", admin_port):
        first = collect(f"127.0.0.1:{admin_port}", out)
        again = collect(f"127.0.0.1:{admin_port}", out)
    assert first.returncode == 0, first.stderr
    assert collected(out) == filed
    assert sorted(p.name for p in out.iterdir()) == sorted([*LABELS, NOT_AN_ITEM])
    sidecar = json.loads(next((out / LABELS[0]).glob("*.json")).read_text())
    assert sidecar["bin_id"] == BIN and sidecar["model_version"] == "model-7"
    assert sidecar["taken_at"] >= 1_790_000_000 and sidecar["taken_at_utc"].startswith("2026-")
    assert sidecar["guesses"][0] == {"label": "first-label", "score": 0.41}
    assert "| all | 7 |" in first.stdout
    # A second run finds everything there and fetches nothing.
    assert again.returncode == 0 and "| all | 0 |" in again.stdout
    assert "7 photos were there already" in again.stdout


def test_the_public_port_refuses_the_export_to_a_caller_without_a_certificate(
    tmp_path: Path,
) -> None:
    filed_bin(tmp_path / "labelled", [next(PHOTOS.glob("*/*.jpg")).read_bytes()])
    with start_bin(tmp_path, tmp_path / "labelled", free_port()) as bin_:
        refused = collect(bin_.target, tmp_path / "training")
    assert refused.returncode != 0
    assert "PERMISSION_DENIED" in refused.stderr and "client certificate" in refused.stderr
    assert not list((tmp_path / "training").glob("*/*"))


def test_the_trainer_loads_the_collected_folder_and_skips_not_an_item(tmp_path: Path) -> None:
    data = pytest.importorskip("trainer.data", reason="the trainer is not installed here")
    photos = [path.read_bytes() for path in sorted(PHOTOS.glob("*/*.jpg"))[:9]]
    filed_bin(tmp_path / "labelled", photos)
    admin_port = free_port()
    with start_bin(tmp_path, tmp_path / "labelled", admin_port):
        assert collect(f"127.0.0.1:{admin_port}", tmp_path / "training").returncode == 0
    loaded = data.load_source(str(tmp_path / "training"))
    assert loaded.classes == list(LABELS)
    assert len(loaded.samples) == 6  # the sidecars and the not-an-item photos are left out


def test_a_bin_killed_mid_export_loses_nothing_and_leaves_no_half_file(tmp_path: Path) -> None:
    filed = filed_bin(tmp_path / "labelled", [noisy_jpeg(seed) for seed in range(40)])
    admin_port = free_port()
    out = tmp_path / "training"
    bin_ = start_bin(tmp_path, tmp_path / "labelled", admin_port)
    command = [sys.executable, "-m", "smartbin_tools.collect", "--target"]
    command += [f"127.0.0.1:{admin_port}", "--out", str(out)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as cut:
        wait_for(lambda: any(out.glob("*/*.json")), timeout=60)
        os.kill(bin_.process.pid, signal.SIGKILL)  # a power cut: no orderly end
        _, stderr = cut.communicate(timeout=60)
    bin_.process.wait(timeout=10)
    got = collected(out)
    assert leftovers(out) == []
    assert got.items() <= filed.items()  # whatever arrived is whole and right
    if cut.returncode != 0:  # the cut came before the export's end (the usual case)
        assert "run the same command again" in stderr and len(got) < len(filed)
    with start_bin(tmp_path, tmp_path / "labelled", admin_port):
        resumed = collect(f"127.0.0.1:{admin_port}", out)
    assert resumed.returncode == 0, resumed.stderr
    assert collected(out) == filed and leftovers(out) == []
    assert f"| all | {len(filed) - len(got)} |" in resumed.stdout


def test_a_rerun_removes_what_a_crashed_collector_left_and_fetches_it_again(
    tmp_path: Path,
) -> None:
    photos = [path.read_bytes() for path in sorted(PHOTOS.glob("*/*.jpg"))[:6]]
    filed = filed_bin(tmp_path / "labelled", photos)
    admin_port = free_port()
    out = tmp_path / "training"
    with start_bin(tmp_path, tmp_path / "labelled", admin_port):
        assert collect(f"127.0.0.1:{admin_port}", out).returncode == 0
        # What a collector killed at each step of a write leaves behind:
        sidecars = sorted(out.glob(f"{LABELS[0]}/*.json"))
        sidecars[0].unlink()  # the photo renamed in, its sidecar not yet
        truncated = sidecars[1].with_suffix(".jpg")
        truncated.write_bytes(truncated.read_bytes()[:100])  # a photo cut short
        (out / LABELS[1] / ".half.jpg.part").write_bytes(b"\xff\xd8")  # a temporary file
        assert len(leftovers(out)) == 2
        resumed = collect(f"127.0.0.1:{admin_port}", out)
    assert resumed.returncode == 0, resumed.stderr
    assert collected(out) == filed and leftovers(out) == []
    assert "| all | 2 |" in resumed.stdout


def test_tidy_keeps_only_complete_photos(tmp_path: Path) -> None:
    folder = tmp_path / "label"
    folder.mkdir()
    jpeg = next(PHOTOS.glob("*/*.jpg")).read_bytes()
    (folder / "b_1.jpg").write_bytes(jpeg)
    meta = {"photo_id": "1", "sha256": hashlib.sha256(jpeg).hexdigest(), "size": len(jpeg)}
    (folder / "b_1.json").write_text(json.dumps(meta))
    (folder / "b_2.json").write_text("{not json")
    (folder / "b_2.jpg").write_bytes(jpeg)
    summary = Summary()
    assert tidy(tmp_path, summary) == {"1"}
    assert sorted(p.name for p in folder.iterdir()) == ["b_1.jpg", "b_1.json"]
    assert summary.removed_incomplete == 1
