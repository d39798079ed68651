"""The unsure-photo store's metrics, read from a real server's /metrics: photos kept, bytes on
disk and photos that could not be kept, by reason."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import PHOTOS, local_config, metric, scrape

from edge_service.metrics import UNSURE_WRITE_FAILURE_REASONS
from edge_service.server import RunningService, create_server
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

FAILURES = "smartbin_unsure_photo_write_failures_total"


@contextlib.contextmanager
def serving(bundle: Path, **overrides: object) -> Iterator[RunningService]:
    running = create_server(local_config(bundle, **overrides))
    try:
        yield running
    finally:
        running.stop(grace=1)


def classify(service: RunningService, photo: Path) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        stub.Classify(classifier_pb2.ClassifyRequest(image=photo.read_bytes()), timeout=30)


def writable(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return False
    probe.unlink()
    return True


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` made read-only: by its mode, or for root (whom modes do not stop) by the
    immutable attribute; skips the test where neither holds (root on a filesystem without it)."""
    mode = folder.stat().st_mode
    folder.chmod(0o555)
    immutable = False
    if writable(folder) and shutil.which("chattr"):
        immutable = (
            subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        )
    try:
        if writable(folder):
            pytest.skip(f"cannot make {folder} read-only for uid {os.geteuid()}")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(mode)


def photo() -> Path:
    return sorted(PHOTOS.rglob("*.jpg"))[0]


def test_a_kept_photo_and_a_failed_write_show_in_the_metrics(
    default_bundle: Path, tmp_path: Path
) -> None:
    kept = tmp_path / "unsure"
    # Every answer is unsure below a threshold of 1, so every photo is kept.
    with serving(
        default_bundle, unsure_images={"folder": kept}, confidence_threshold=1.0
    ) as service:
        for reason in UNSURE_WRITE_FAILURE_REASONS:  # exported before anything went wrong
            assert f'{FAILURES}{{reason="{reason}"}} 0.0' in scrape(service)
        assert metric(service, "smartbin_unsure_photos ") == 0
        assert metric(service, "smartbin_unsure_photo_bytes ") == 0

        classify(service, photo())
        (stored,) = kept.glob("*.jpg")
        assert metric(service, "smartbin_unsure_photos ") == 1
        assert metric(service, "smartbin_unsure_photo_bytes ") == stored.stat().st_size

        with read_only(kept):
            classify(service, photo())  # still answered; the photo is not kept
        assert metric(service, f'{FAILURES}{{reason="not_writable"}}') == 1
        assert metric(service, "smartbin_unsure_photos ") == 1
        assert sorted(path.name for path in kept.iterdir()) == [stored.name]


def test_a_photo_over_the_byte_limit_counts_as_too_large(
    default_bundle: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "unsure"
    limits = {"folder": folder, "max_bytes": 1024}  # smaller than any photo
    with serving(default_bundle, unsure_images=limits, confidence_threshold=1.0) as service:
        classify(service, photo())
        assert metric(service, f'{FAILURES}{{reason="too_large"}}') == 1
        assert metric(service, "smartbin_unsure_photos ") == 0
    assert not list(folder.iterdir())


def test_a_bin_that_keeps_no_photos_exports_no_store_metrics(
    default_bundle: Path,
) -> None:
    with serving(default_bundle) as service:
        assert "smartbin_unsure_photo" not in scrape(service)
