"""Rolling out models without visiting the bin: ReloadModel, the watched bundle folder, and a new
category served with no code change."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import local_config, scrape, train_and_convert, wait_for
from PIL import Image

from edge_service.server import RunningService, create_server
from smartbin.bundle import load_bundle
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

NEW_CATEGORY = "battery"


def new_category_images(folder: Path, count: int) -> None:
    """Photos unlike any other category's: dark blue and noisy, where the others are light."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.normal((20, 30, 150), 25, (120, 160, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{NEW_CATEGORY}{i}.jpg", quality=90)


def copy_bundle(source: Path, target: Path, version: str) -> Path:
    shutil.copytree(source, target)
    set_manifest(target, version=version)
    return target


def set_manifest(bundle: Path, **fields: object) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    path.write_text(json.dumps(manifest))


def set_model(bundle: Path, content: bytes, record_sha: bool) -> None:
    """Replace the model file; with ``record_sha`` the manifest vouches for the new bytes."""
    (bundle / "model.tflite").write_bytes(content)
    if record_sha:
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["model"]["sha256"] = hashlib.sha256(content).hexdigest()
        (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def stub(channel: grpc.Channel) -> classifier_pb2_grpc.ClassifierStub:
    return classifier_pb2_grpc.ClassifierStub(channel)


def classify(
    stub: classifier_pb2_grpc.ClassifierStub, photo: Path
) -> classifier_pb2.ClassifyResponse:
    return stub.Classify(classifier_pb2.ClassifyRequest(image=photo.read_bytes()), timeout=10)


def a_photo(data: Path) -> Path:
    return sorted(data.rglob("*.jpg"))[0]


def test_reload_swaps_in_a_checked_bundle(
    service: RunningService,
    stub: classifier_pb2_grpc.ClassifierStub,
    tiny_bundle: Path,
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    new = copy_bundle(tiny_bundle, tmp_path / "v2", version="tiny-test-2")
    info = stub.ReloadModel(classifier_pb2.ReloadModelRequest(bundle_path=str(new)), timeout=30)
    assert info.model_version == "tiny-test-2"
    assert json.loads(info.manifest_json)["version"] == "tiny-test-2"
    assert classify(stub, a_photo(tiny_data)).model_version == "tiny-test-2"
    assert stub.GetModelInfo(classifier_pb2.GetModelInfoRequest(), timeout=5).model_version == (
        "tiny-test-2"
    )
    text = scrape(service)
    assert 'smartbin_model_reloads_total{outcome="success"} 1.0' in text
    assert 'version="tiny-test-2"' in text
    # An empty path reloads the configured bundle folder.
    info = stub.ReloadModel(classifier_pb2.ReloadModelRequest(), timeout=30)
    assert info.model_version == "tiny-test"


def corrupt_model(bundle: Path) -> None:
    data = bytearray((bundle / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    set_model(bundle, bytes(data), record_sha=False)


def garbage_model(bundle: Path) -> None:
    set_model(bundle, b"TFL3 this is not a flatbuffer" * 100, record_sha=True)


def one_label_too_many(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    set_manifest(bundle, labels=[*manifest["labels"], "extra"])


def no_manifest(bundle: Path) -> None:
    (bundle / "manifest.json").unlink()


@pytest.mark.parametrize(
    "damage, reason",
    [
        (corrupt_model, "the bundle is corrupt or incomplete"),
        (garbage_model, "model cannot be loaded"),
        (one_label_too_many, "outputs but the manifest lists"),
        (no_manifest, "manifest.json not found"),
    ],
)
def test_a_bad_bundle_is_refused_and_the_old_model_keeps_serving(
    service: RunningService,
    stub: classifier_pb2_grpc.ClassifierStub,
    tiny_bundle: Path,
    tiny_data: Path,
    tmp_path: Path,
    damage: Callable[[Path], None],
    reason: str,
) -> None:
    bad = copy_bundle(tiny_bundle, tmp_path / "bad", version="broken")
    damage(bad)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ReloadModel(classifier_pb2.ReloadModelRequest(bundle_path=str(bad)), timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason in caught.value.details()
    assert "model tiny-test keeps serving" in caught.value.details()
    assert classify(stub, a_photo(tiny_data)).model_version == "tiny-test"
    assert 'smartbin_model_reloads_total{outcome="failed"} 1.0' in scrape(service)


def test_reload_loads_only_from_the_bundle_folders(
    tiny_bundle: Path, tiny_data: Path, tmp_path: Path
) -> None:
    bundles = tmp_path / "bundles"
    served = copy_bundle(tiny_bundle, bundles / "current", version="tiny-test")
    elsewhere = copy_bundle(tiny_bundle, tmp_path / "elsewhere" / "v2", version="outside")
    (bundles / "link").symlink_to(elsewhere)
    running = create_server(local_config(served))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            for offered in (str(elsewhere), "../elsewhere/v2", "link", "/etc"):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.ReloadModel(
                        classifier_pb2.ReloadModelRequest(bundle_path=offered), timeout=30
                    )
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, offered
                assert "reload_dirs" in caught.value.details()
                assert str(bundles) in caught.value.details()
            assert classify(stub, a_photo(tiny_data)).model_version == "tiny-test"
            # A bundle copied next to the served one loads by its folder name.
            copy_bundle(tiny_bundle, bundles / "v3", version="next-to-it")
            request = classifier_pb2.ReloadModelRequest(bundle_path="v3")
            assert stub.ReloadModel(request, timeout=30).model_version == "next-to-it"
    finally:
        running.stop(grace=1)


def test_a_call_in_flight_finishes_on_the_model_it_started_on(
    service: RunningService,
    stub: classifier_pb2_grpc.ClassifierStub,
    tiny_bundle: Path,
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    old = service.runtime.models.current
    new = copy_bundle(tiny_bundle, tmp_path / "v2", version="tiny-test-2")
    with futures.ThreadPoolExecutor(1) as pool:
        held = old._idle.get()  # hold the old interpreter: the call stops just before invoke
        in_flight = pool.submit(classify, stub, a_photo(tiny_data))
        time.sleep(0.5)  # it has read the model, decoded and preprocessed by now
        stub.ReloadModel(classifier_pb2.ReloadModelRequest(bundle_path=str(new)), timeout=30)
        assert classify(stub, a_photo(tiny_data)).model_version == "tiny-test-2"
        assert not in_flight.done()
        old._idle.put(held)
        assert in_flight.result(timeout=10).model_version == "tiny-test"


@pytest.fixture
def watched_service(tiny_bundle: Path, tmp_path: Path) -> Iterator[RunningService]:
    folder = copy_bundle(tiny_bundle, tmp_path / "current", version="tiny-test")
    running = create_server(local_config(folder, watch_bundle_seconds=0.05))
    yield running
    running.stop(grace=1)


def test_a_watched_bundle_folder_is_reloaded_when_its_files_change(
    watched_service: RunningService,
) -> None:
    folder = watched_service.runtime.config.bundle
    models = watched_service.runtime.models
    set_manifest(folder, version="dropped-in")
    wait_for(lambda: models.current.bundle.version == "dropped-in")
    corrupt_model(folder)
    wait_for(
        lambda: 'smartbin_model_reloads_total{outcome="failed"} 1.0' in scrape(watched_service)
    )
    assert models.current.bundle.version == "dropped-in"
    assert 'smartbin_model_reloads_total{outcome="success"} 1.0' in scrape(watched_service)


def test_a_new_category_is_served_after_a_reload_with_no_code_change(
    tiny_data: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    new_category_images(data / NEW_CATEGORY, 12)
    bundle = train_and_convert(data, tmp_path / "train", epochs=15)
    old_labels = load_bundle(tiny_bundle).labels
    camera_folder = tmp_path / "camera"
    new_category_images(camera_folder, 2)
    config = local_config(
        tiny_bundle,
        camera={"type": "replay", "folder": camera_folder, "frame_interval_seconds": 0.05},
        reload_dirs=[tmp_path],
    )
    running = create_server(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            request = classifier_pb2.ReloadModelRequest(bundle_path=str(bundle))
            info = stub.ReloadModel(request, timeout=60)
            assert sorted(info.labels) == sorted([*old_labels, NEW_CATEGORY])
            event = stub.Capture(classifier_pb2.CaptureRequest(top_k=1), timeout=10)
            assert event.predictions[0].label == NEW_CATEGORY
            photo = data / NEW_CATEGORY / f"{NEW_CATEGORY}0.jpg"
            assert classify(stub, photo).predictions[0].label == NEW_CATEGORY
            text = scrape(running)
            assert f'smartbin_classifications_total{{label="{NEW_CATEGORY}"}} 2.0' in text
            assert f'labels="{len(old_labels) + 1}"' in text
    finally:
        running.stop(grace=1)
