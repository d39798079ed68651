"""The bin's camera side, end to end: replay/OpenCV cameras, GPIO and motion triggers, Capture,
WatchEvents, unsure photos and a camera that goes away and comes back."""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import PHOTOS, ROOT, local_config, metric, scrape, wait_for
from PIL import Image
from pydantic import ValidationError

from edge_service.camera import create_camera
from edge_service.config import ServiceConfig, load_config
from edge_service.server import RunningService, create_server
from smartbin.bundle import Bundle
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

CAMERA = "smartbin.v1.Camera"
HAVE_OPENCV = importlib.util.find_spec("cv2") is not None
FAST_CAMERA = {"frame_interval_seconds": 0.03, "retry_min_seconds": 0.05, "retry_max_seconds": 0.2}


@contextmanager
def running(config: ServiceConfig) -> Iterator[SimpleNamespace]:
    service = create_server(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield SimpleNamespace(
            service=service,
            stub=classifier_pb2_grpc.ClassifierStub(channel),
            health=health_pb2_grpc.HealthStub(channel),
        )
    finally:
        service.stop(grace=1)
        channel.close()


def health_of(bin_: SimpleNamespace, name: str) -> int:
    return bin_.health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status


def camera_is(bin_: SimpleNamespace, status: int) -> Callable[[], bool]:
    return lambda: health_of(bin_, CAMERA) == status


def camera_errors(service: RunningService) -> float:
    return metric(service, "smartbin_camera_errors_total ")


def photos(count: int) -> list[Path]:
    """``count`` real photos, each of a different category."""
    folders = sorted(path for path in PHOTOS.iterdir() if path.is_dir())
    return [sorted(folder.glob("*.jpg"))[0] for folder in folders][:count]


@pytest.fixture
def replay_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "replay"
    folder.mkdir()
    for i, path in enumerate(photos(3)):
        shutil.copy(path, folder / f"{i:02d}.jpg")
    return folder


def replay_camera(folder: Path, **settings: object) -> dict:
    return {"type": "replay", "folder": folder, **FAST_CAMERA, **settings}


class EventWatcher:
    """Reads a WatchEvents stream on a thread, as a bin display would."""

    def __init__(self, stub: classifier_pb2_grpc.ClassifierStub) -> None:
        self.events: list[classifier_pb2.ClassificationEvent] = []
        self.error: grpc.RpcError | None = None
        self.stream = stub.WatchEvents(classifier_pb2.WatchEventsRequest())
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                self.events.append(event)
        except grpc.RpcError as err:
            self.error = err


def test_capture_classifies_a_camera_photo_and_watchers_see_it(
    default_bundle: Path, default_loaded: Bundle, replay_folder: Path
) -> None:
    config = local_config(default_bundle, camera=replay_camera(replay_folder))
    with running(config) as bin_:
        wait_for(camera_is(bin_, health_pb2.HealthCheckResponse.SERVING))
        watchers = [EventWatcher(bin_.stub), EventWatcher(bin_.stub)]
        wait_for(lambda: "smartbin_watchers 2.0" in scrape(bin_.service))
        event = bin_.stub.Capture(classifier_pb2.CaptureRequest(top_k=2), timeout=10)
        assert event.trigger == "rpc"
        assert len(event.predictions) == 2
        assert event.model_version == default_loaded.version
        assert event.predictions[0].label in default_loaded.labels
        assert event.timings.capture_seconds > 0
        assert abs(event.timestamp - time.time()) < 60
        for watcher in watchers:
            wait_for(lambda w=watcher: len(w.events) == 1)
            seen = watcher.events[0]
            assert seen.event_id == event.event_id
            assert len(seen.predictions) == len(default_loaded.labels)  # watchers get all
            assert seen.missed_events == 0
        second = bin_.stub.Capture(classifier_pb2.CaptureRequest(), timeout=10)
        assert second.event_id > event.event_id
        text = scrape(bin_.service)
        assert 'smartbin_triggers_total{outcome="accepted",source="rpc"} 2.0' in text
        assert 'smartbin_stage_seconds_count{stage="capture"} 2.0' in text
        assert "smartbin_camera_up 1.0" in text
        service = bin_.service
    # Shutdown ends the open streams cleanly instead of cutting them at the grace deadline.
    for watcher in watchers:
        watcher.thread.join(5)
        assert not watcher.thread.is_alive() and watcher.error is None
    assert service.runtime.capture is not None and not service.runtime.capture.feed.up


def test_too_many_watchers_is_resource_exhausted(default_bundle: Path) -> None:
    with running(local_config(default_bundle, max_watchers=1)) as bin_:
        first = EventWatcher(bin_.stub)
        wait_for(lambda: "smartbin_watchers 1.0" in scrape(bin_.service))
        second = EventWatcher(bin_.stub)
        second.thread.join(5)
        assert second.error is not None
        assert second.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_watchers" in second.error.details()
        assert first.error is None


def test_capture_without_a_camera_is_unavailable_and_classify_serves(
    channel: grpc.Channel,
) -> None:
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Capture(classifier_pb2.CaptureRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no camera configured" in caught.value.details()
    request = classifier_pb2.ClassifyRequest(image=photos(1)[0].read_bytes())
    assert stub.Classify(request, timeout=10).predictions


def test_a_vanished_camera_is_reported_and_retried_while_classify_keeps_serving(
    default_bundle: Path, replay_folder: Path
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    with running(local_config(default_bundle, camera=replay_camera(replay_folder))) as bin_:
        wait_for(camera_is(bin_, serving))
        hidden = replay_folder.rename(replay_folder.with_name("unplugged"))
        wait_for(camera_is(bin_, not_serving))
        assert "smartbin_camera_up 0.0" in scrape(bin_.service)
        wait_for(lambda: camera_errors(bin_.service) >= 3)  # the read, then failed reopens
        with pytest.raises(grpc.RpcError) as caught:
            bin_.stub.Capture(classifier_pb2.CaptureRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "camera is down" in caught.value.details()
        assert health_of(bin_, "") == serving
        assert health_of(bin_, "smartbin.v1.Classifier") == serving
        request = classifier_pb2.ClassifyRequest(image=photos(1)[0].read_bytes())
        assert bin_.stub.Classify(request, timeout=10).predictions

        hidden.rename(replay_folder)
        wait_for(camera_is(bin_, serving))
        assert bin_.stub.Capture(classifier_pb2.CaptureRequest(), timeout=10).predictions
        text = scrape(bin_.service)
        assert "smartbin_camera_up 1.0" in text
        assert 'smartbin_triggers_total{outcome="camera_down",source="rpc"} 1.0' in text


def blocked_reader(fifos: list[Path]) -> int:
    """The write end of whichever FIFO a reader is blocked on (the others have no reader)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for fifo in fifos:
            try:
                descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody reads this one
                continue
            os.set_blocking(descriptor, True)
            return descriptor
        time.sleep(0.02)
    raise AssertionError("no camera read is blocked on a FIFO")


def test_a_camera_read_that_hangs_is_reported_and_recovers(
    default_bundle: Path, replay_folder: Path
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    camera = replay_camera(replay_folder, stall_seconds=0.5)
    with running(local_config(default_bundle, camera=camera)) as bin_:
        wait_for(camera_is(bin_, serving))
        # A FIFO with no writer blocks the read inside open(2), as a stuck driver would.
        photos_by_name = {p: p.read_bytes() for p in sorted(replay_folder.iterdir())}
        for path in photos_by_name:
            path.unlink()
            os.mkfifo(path)
        wait_for(camera_is(bin_, not_serving))
        assert "smartbin_camera_up 0.0" in scrape(bin_.service)
        with pytest.raises(grpc.RpcError) as caught:
            bin_.stub.Capture(classifier_pb2.CaptureRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "stuck" in caught.value.details()

        descriptor = blocked_reader(list(photos_by_name))
        for path, content in photos_by_name.items():  # the other photos come back first
            if not os.path.samefile(path, f"/proc/self/fd/{descriptor}"):
                path.unlink()
                path.write_bytes(content)
        blocked = next(p for p in photos_by_name if stat.S_ISFIFO(p.stat().st_mode))
        os.write(descriptor, photos_by_name[blocked])
        os.close(descriptor)  # the hung read returns with a whole photo
        blocked.unlink()
        blocked.write_bytes(photos_by_name[blocked])
        wait_for(camera_is(bin_, serving))
        assert bin_.stub.Capture(classifier_pb2.CaptureRequest(), timeout=10).predictions


@pytest.mark.parametrize(
    "camera, reason",
    [
        ({"type": "picamera2"}, "picamera2 is not importable"),
        (
            {"type": "opencv", "device": "/nonexistent/video0.avi"},
            # The edge-only environment has no OpenCV: then the guarded import is what is checked.
            "OpenCV cannot open camera" if HAVE_OPENCV else "OpenCV is not installed",
        ),
    ],
)
def test_a_camera_that_cannot_open_leaves_the_service_up(
    default_bundle: Path, camera: dict, reason: str
) -> None:
    if camera["type"] == "picamera2" and importlib.util.find_spec("picamera2"):
        pytest.skip("picamera2 is installed here: this checks the guarded import")
    config = local_config(default_bundle, camera={**camera, **FAST_CAMERA})
    with running(config) as bin_:
        assert health_of(bin_, "") == health_pb2.HealthCheckResponse.SERVING
        wait_for(lambda: "smartbin_camera_errors_total 2.0" in scrape(bin_.service))
        assert health_of(bin_, CAMERA) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            bin_.stub.Capture(classifier_pb2.CaptureRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reason in caught.value.details()


def test_opencv_camera_reads_a_video_stream(
    default_bundle: Path, default_loaded: Bundle, tmp_path: Path
) -> None:
    cv2 = pytest.importorskip("cv2")
    video = tmp_path / "bin.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    frame = np.asarray(Image.open(photos(1)[0]).convert("RGB").resize((160, 120)))
    for _ in range(20):
        writer.write(frame[:, :, ::-1].copy())
    writer.release()
    config = local_config(default_bundle, camera={"type": "opencv", "device": str(video)})
    with running(config) as bin_:
        event = bin_.stub.Capture(classifier_pb2.CaptureRequest(top_k=1), timeout=10)
        assert event.predictions[0].label in default_loaded.labels
        assert event.timings.capture_seconds > 0


@pytest.fixture
def mock_pins() -> Iterator[object]:
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    previous = Device.pin_factory
    Device.pin_factory = MockFactory()
    yield Device.pin_factory
    Device.pin_factory.reset()
    Device.pin_factory = previous


def test_lid_switch_triggers_a_photo_and_repeats_are_debounced(
    default_bundle: Path, default_loaded: Bundle, replay_folder: Path, mock_pins: object
) -> None:
    config = local_config(
        default_bundle,
        camera=replay_camera(replay_folder),
        triggers={"gpio": {"pin": 17, "bounce_seconds": None}, "debounce_seconds": 30},
    )
    with running(config) as bin_:
        wait_for(camera_is(bin_, health_pb2.HealthCheckResponse.SERVING))
        watcher = EventWatcher(bin_.stub)
        wait_for(lambda: "smartbin_watchers 1.0" in scrape(bin_.service))
        lid = mock_pins.pin(17)  # type: ignore[attr-defined]
        for _ in range(3):  # the lid closes (switch to ground) and rattles twice
            lid.drive_low()
            lid.drive_high()
        wait_for(lambda: len(watcher.events) == 1)
        assert watcher.events[0].trigger == "gpio"
        assert len(watcher.events[0].predictions) == len(default_loaded.labels)
        text = scrape(bin_.service)
        assert 'smartbin_triggers_total{outcome="accepted",source="gpio"} 1.0' in text
        assert 'smartbin_triggers_total{outcome="debounced",source="gpio"} 2.0' in text
    # Stopping released the pin: the next service can claim it.
    with running(config):
        pass


def test_a_busy_gpio_pin_is_a_clear_startup_error(
    default_bundle: Path, replay_folder: Path, mock_pins: object
) -> None:
    config = local_config(
        default_bundle, camera=replay_camera(replay_folder), triggers={"gpio": {"pin": 17}}
    )
    with running(config), pytest.raises(ValueError, match="GPIO pin 17 cannot be used"):
        create_server(config)


def test_motion_fires_once_when_an_item_lands_and_the_scene_settles(
    default_bundle: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "motion"
    folder.mkdir()
    for name in ("00-empty.png", "01-empty.png"):
        Image.new("RGB", (160, 120), (250, 250, 250)).save(folder / name)
    shutil.copy(photos(1)[0], folder / "02-item.jpg")
    config = local_config(
        default_bundle,
        camera=replay_camera(folder, loop=False),
        triggers={"motion": {"settle_frames": 2}},
    )
    with running(config) as bin_:
        watcher = EventWatcher(bin_.stub)
        wait_for(lambda: len(watcher.events) == 1)
        assert watcher.events[0].trigger == "motion"
        time.sleep(0.3)  # ten more frames of the same still scene
        assert len(watcher.events) == 1
        assert 'smartbin_triggers_total{outcome="accepted",source="motion"} 1.0' in scrape(
            bin_.service
        )


def test_unsure_answers_are_marked_and_their_photos_kept_newest_first(
    default_bundle: Path, replay_folder: Path, tmp_path: Path
) -> None:
    kept = tmp_path / "unsure"
    config = local_config(
        default_bundle,
        camera=replay_camera(replay_folder),
        confidence_threshold=1.0,  # nothing is certain: every answer is unsure
        unsure_images={"folder": kept, "max_files": 2},
    )
    uploads = photos(3)
    with running(config) as bin_:
        for path in uploads:
            request = classifier_pb2.ClassifyRequest(image=path.read_bytes())
            assert bin_.stub.Classify(request, timeout=10).unsure
        event = bin_.stub.Capture(classifier_pb2.CaptureRequest(), timeout=10)
        assert event.unsure
        assert "smartbin_unsure_total 4.0" in scrape(bin_.service)
    files = sorted(kept.iterdir())
    assert len(files) == 2  # the two oldest uploads were dropped
    assert files[0].read_bytes() == uploads[2].read_bytes()  # uploaded JPEGs are kept verbatim
    assert files[1].name.endswith(f"-{event.predictions[0].label}.jpg")
    assert Image.open(files[1]).size == Image.open(replay_folder / "00.jpg").size


def test_camera_config_errors_name_the_choices(default_bundle: Path) -> None:
    with pytest.raises(ValidationError, match="'picamera2', 'opencv', 'replay'"):
        local_config(default_bundle, camera={"type": "webcam"})
    with pytest.raises(ValidationError, match="triggers need a camera"):
        local_config(default_bundle, triggers={"motion": {}})
    with pytest.raises(ValueError, match="unknown camera type 'webcam'"):
        create_camera(SimpleNamespace(type="webcam"))  # type: ignore[arg-type]


def test_the_example_bin_config_is_valid() -> None:
    config = load_config(ROOT / "examples" / "bin.yaml")
    assert config.camera is not None and config.camera.type == "picamera2"
    assert config.triggers.gpio is not None and config.triggers.motion is not None
