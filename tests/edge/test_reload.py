"""Rolling out models without visiting the bin: ReloadModel, the watched bundle folder, and a new
category served with no code change.

Every bundle offered here is made from the shipped default: copies with a changed manifest
(relabelled, re-versioned), damaged copies, and its float32 twin packed as a bundle of its own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from helpers import DATA, PHOTOS, copy_bundle, local_config, scrape, wait_for

from edge_service.const import SAMPLES_DIR
from edge_service.server import RunningService, create_server
from smartbin.bundle import Bundle, write_bundle
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

NEW_CATEGORY = "battery"
# The default model before quantization: a different model file that gives the same labels.
FLOAT_TWIN = DATA / "default_float32.tflite"


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


@pytest.fixture
def admin(admin_channel: grpc.Channel) -> classifier_pb2_grpc.ClassifierStub:
    """ReloadModel changes the bin: it goes to the admin listener (tests/edge/test_admin.py)."""
    return classifier_pb2_grpc.ClassifierStub(admin_channel)


def classify(
    stub: classifier_pb2_grpc.ClassifierStub, photo: Path
) -> classifier_pb2.ClassifyResponse:
    return stub.Classify(classifier_pb2.ClassifyRequest(image=photo.read_bytes()), timeout=10)


def a_photo() -> Path:
    return sorted(PHOTOS.rglob("*.jpg"))[0]


def sample_of(label: str) -> Path:
    """The shipped sample photo of ``label``: the samples are named after their true category."""
    (path,) = (p for p in SAMPLES_DIR.glob("*.jpg") if p.stem.rstrip("0123456789") == label)
    return path


@pytest.fixture
def float_twin(default_loaded: Bundle, tmp_path: Path) -> Bundle:
    """The default model's float32 twin as a bundle: same labels and preprocessing, other bytes."""
    return write_bundle(
        tmp_path / "float32",
        FLOAT_TWIN.read_bytes(),
        list(default_loaded.labels),
        default_loaded.preprocessing,
        version="float32-twin",
        quantization="float32",
        architecture=default_loaded.architecture,
    )


def test_reload_swaps_in_a_checked_bundle(
    service: RunningService,
    stub: classifier_pb2_grpc.ClassifierStub,
    admin: classifier_pb2_grpc.ClassifierStub,
    default_loaded: Bundle,
    float_twin: Bundle,
) -> None:
    photo = sample_of(default_loaded.labels[0])
    before = classify(stub, photo)
    info = admin.ReloadModel(
        classifier_pb2.ReloadModelRequest(bundle_path=str(float_twin.path)), timeout=30
    )
    assert info.model_version == "float32-twin"
    assert info.model_sha256 == float_twin.sha256 != default_loaded.sha256
    assert info.quantization == "float32"
    assert json.loads(info.manifest_json)["version"] == "float32-twin"
    after = classify(stub, photo)
    assert after.model_version == "float32-twin"
    # The twin agrees on the photo, with scores of its own: the new model answered.
    assert after.predictions[0].label == before.predictions[0].label == default_loaded.labels[0]
    assert after.predictions[0].score != pytest.approx(before.predictions[0].score, abs=1e-4)
    assert stub.GetModelInfo(classifier_pb2.GetModelInfoRequest(), timeout=5).model_version == (
        "float32-twin"
    )
    text = scrape(service)
    assert 'smartbin_model_reloads_total{outcome="success"} 1.0' in text
    assert 'version="float32-twin"' in text and 'quantization="float32"' in text
    # An empty path reloads the configured bundle folder.
    info = admin.ReloadModel(classifier_pb2.ReloadModelRequest(), timeout=30)
    assert info.model_version == default_loaded.version
    assert info.model_sha256 == default_loaded.sha256
    again = classify(stub, photo)
    assert again.model_version == default_loaded.version
    assert again.predictions[0].score == pytest.approx(before.predictions[0].score, abs=1e-6)


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
    admin: classifier_pb2_grpc.ClassifierStub,
    default_bundle: Path,
    default_loaded: Bundle,
    tmp_path: Path,
    damage: Callable[[Path], None],
    reason: str,
) -> None:
    bad = copy_bundle(default_bundle, tmp_path / "bad", version="broken")
    damage(bad)
    with pytest.raises(grpc.RpcError) as caught:
        admin.ReloadModel(classifier_pb2.ReloadModelRequest(bundle_path=str(bad)), timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason in caught.value.details()
    assert f"model {default_loaded.version} keeps serving" in caught.value.details()
    assert classify(stub, a_photo()).model_version == default_loaded.version
    text = scrape(service)
    assert 'smartbin_model_reloads_total{outcome="failed"} 1.0' in text
    assert 'smartbin_model_reloads_total{outcome="success"} 0.0' in text


def test_reload_loads_only_from_the_bundle_folders(default_bundle: Path, tmp_path: Path) -> None:
    bundles = tmp_path / "bundles"
    served = copy_bundle(default_bundle, bundles / "current", version="current")
    elsewhere = copy_bundle(default_bundle, tmp_path / "elsewhere" / "v2", version="outside")
    (bundles / "link").symlink_to(elsewhere)
    running = create_server(local_config(served))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.admin_port}") as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            for offered in (str(elsewhere), "../elsewhere/v2", "link", "/etc"):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.ReloadModel(
                        classifier_pb2.ReloadModelRequest(bundle_path=offered), timeout=30
                    )
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, offered
                assert "reload_dirs" in caught.value.details()
                # The caller learns which folders are open, not where they are on the bin.
                assert str(bundles) not in caught.value.details()
            assert classify(stub, a_photo()).model_version == "current"
            # A bundle copied next to the served one loads by its folder name.
            copy_bundle(default_bundle, bundles / "v3", version="next-to-it")
            request = classifier_pb2.ReloadModelRequest(bundle_path="v3")
            assert stub.ReloadModel(request, timeout=30).model_version == "next-to-it"
    finally:
        running.stop(grace=1)


def test_a_call_in_flight_finishes_on_the_model_it_started_on(
    service: RunningService,
    stub: classifier_pb2_grpc.ClassifierStub,
    admin: classifier_pb2_grpc.ClassifierStub,
    default_bundle: Path,
    default_loaded: Bundle,
    tmp_path: Path,
) -> None:
    old = service.runtime.models.current
    new = copy_bundle(default_bundle, tmp_path / "v2", version="v2")
    with futures.ThreadPoolExecutor(1) as pool:
        held = old._idle.get()  # hold the old interpreter: the call stops just before invoke
        in_flight = pool.submit(classify, stub, a_photo())
        time.sleep(0.5)  # it has read the model, decoded and preprocessed by now
        admin.ReloadModel(classifier_pb2.ReloadModelRequest(bundle_path=str(new)), timeout=30)
        assert classify(stub, a_photo()).model_version == "v2"
        assert not in_flight.done()
        old._idle.put(held)
        assert in_flight.result(timeout=10).model_version == default_loaded.version


@pytest.fixture
def watched_service(default_bundle: Path, tmp_path: Path) -> Iterator[RunningService]:
    folder = copy_bundle(default_bundle, tmp_path / "current", version="watched")
    running = create_server(local_config(folder, watch_bundle_seconds=0.05))
    yield running
    running.stop(grace=1)


def test_a_watched_bundle_folder_is_reloaded_when_its_files_change(
    watched_service: RunningService,
) -> None:
    folder = watched_service.runtime.config.bundle
    models = watched_service.runtime.models
    assert models.current.bundle.version == "watched"
    set_manifest(folder, version="dropped-in")
    wait_for(lambda: models.current.bundle.version == "dropped-in")
    corrupt_model(folder)
    wait_for(
        lambda: 'smartbin_model_reloads_total{outcome="failed"} 1.0' in scrape(watched_service)
    )
    assert models.current.bundle.version == "dropped-in"
    assert 'smartbin_model_reloads_total{outcome="success"} 1.0' in scrape(watched_service)


def test_a_new_category_is_served_after_a_reload_with_no_code_change(
    default_bundle: Path, default_loaded: Bundle, tmp_path: Path
) -> None:
    """Labels are data: a bundle whose manifest names an output anew is served under that name.

    The model is the shipped one; the manifest gives one of its outputs a category the code has
    never heard of, as a retrained bundle with a new category would."""
    old_labels = default_loaded.labels
    renamed = old_labels[-1]
    assert NEW_CATEGORY not in old_labels
    labels = [NEW_CATEGORY if label == renamed else label for label in old_labels]
    version = f"{default_loaded.version}+{NEW_CATEGORY}"
    bundle = copy_bundle(default_bundle, tmp_path / "new-category", labels=labels, version=version)
    photo = sample_of(renamed)
    camera_folder = tmp_path / "camera"
    camera_folder.mkdir()
    shutil.copy(photo, camera_folder / photo.name)
    config = local_config(
        default_bundle,
        camera={"type": "replay", "folder": camera_folder, "frame_interval_seconds": 0.05},
        reload_dirs=[tmp_path],
    )
    running = create_server(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            assert classify(stub, photo).predictions[0].label == renamed  # before the reload
            request = classifier_pb2.ReloadModelRequest(bundle_path=str(bundle))
            with grpc.insecure_channel(f"127.0.0.1:{running.admin_port}") as admin_channel:
                admin = classifier_pb2_grpc.ClassifierStub(admin_channel)
                info = admin.ReloadModel(request, timeout=60)
            assert list(info.labels) == labels
            assert info.model_version == version
            event = stub.Capture(classifier_pb2.CaptureRequest(top_k=1), timeout=10)
            assert event.predictions[0].label == NEW_CATEGORY
            assert event.model_version == version
            reply = classify(stub, photo)
            assert reply.predictions[0].label == NEW_CATEGORY
            assert sorted(p.label for p in reply.predictions) == sorted(labels)
            text = scrape(running)
            assert f'smartbin_classifications_total{{label="{NEW_CATEGORY}"}} 2.0' in text
            assert f'smartbin_classifications_total{{label="{renamed}"}} 1.0' in text
            assert f'version="{version}"' in text
    finally:
        running.stop(grace=1)
