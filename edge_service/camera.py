"""Camera sources behind one small interface, and the feed thread that keeps one running.

A source is anything with ``open()``, ``read()`` and ``close()``; ``read()`` returns an upright
RGB photo. ``create_camera`` picks the source from the config's ``type``. ``CameraFeed`` reads
frames at a steady pace, keeps the latest one for triggers, reopens a failed camera with
exponential backoff and reports every up/down change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from edge_service.config import (
    CameraConfig,
    OpenCVCameraConfig,
    PiCameraConfig,
    ReplayCameraConfig,
)
from smartbin.preprocessing import ImageDecodeError, decode_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class CameraError(Exception):
    """The camera cannot be opened or stopped delivering frames; the message says why."""


class Camera(Protocol):
    def open(self) -> None: ...

    def read(self) -> Image.Image: ...

    def close(self) -> None: ...


class PiCamera:
    """The Raspberry Pi camera. picamera2 comes from Raspberry Pi OS's apt repository, not PyPI,
    so it is imported when the camera opens: elsewhere the camera is reported down, not fatal."""

    def __init__(self, config: PiCameraConfig) -> None:
        self.config = config
        self._camera: Any = None

    def open(self) -> None:
        try:
            from picamera2 import Picamera2  # type: ignore[import-not-found]
        except ImportError as err:
            raise CameraError(
                f"picamera2 is not importable ({err}): on Raspberry Pi OS run "
                "`apt install python3-picamera2` and make the venv with --system-site-packages"
            ) from err
        try:
            camera = Picamera2(self.config.index)
            size = (self.config.width, self.config.height)
            # queue=False: a capture waits for the next frame rather than take a queued one.
            config = camera.create_preview_configuration(main={"size": size}, queue=False)
            camera.configure(config)
            camera.start()
        except Exception as err:  # libcamera raises RuntimeError, IndexError, OSError...
            raise CameraError(f"picamera2 camera {self.config.index} did not start: {err}") from err
        self._camera = camera

    def read(self) -> Image.Image:
        try:
            # capture_image converts the stream's pixel order (XBGR8888...) to a PIL image.
            return self._camera.capture_image("main").convert("RGB")
        except Exception as err:
            raise CameraError(f"picamera2 capture failed: {err}") from err

    def close(self) -> None:
        if self._camera is not None:
            camera, self._camera = self._camera, None
            try:
                camera.stop()
            finally:
                camera.close()


class OpenCVCamera:
    """A V4L2/USB camera, video file or stream URL through ``cv2.VideoCapture``."""

    def __init__(self, config: OpenCVCameraConfig) -> None:
        self.config = config
        self._capture: Any = None

    def open(self) -> None:
        try:
            import cv2
        except ImportError as err:
            raise CameraError(
                "OpenCV is not installed: install the edge with its camera-opencv extra "
                "(pip install './edge_service[camera-opencv]')"
            ) from err
        capture = cv2.VideoCapture(self.config.device)
        if not capture.isOpened():
            capture.release()
            raise CameraError(f"OpenCV cannot open camera {self.config.device!r}")
        # A small buffer keeps frames fresh: V4L2 otherwise queues several old ones.
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        if self.config.width:
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.config.width)
        if self.config.height:
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.config.height)
        self._capture = capture

    def read(self) -> Image.Image:
        ok, bgr = self._capture.read()
        if not ok or bgr is None:
            raise CameraError(f"camera {self.config.device!r} delivered no frame")
        return Image.fromarray(bgr[:, :, ::-1].copy())

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


class ReplayCamera:
    """Photos of a folder in name order, as if a camera saw them one after the other."""

    def __init__(self, config: ReplayCameraConfig) -> None:
        self.config = config
        self._paths: list[Path] = []
        self._next = 0

    def open(self) -> None:
        folder = self.config.folder
        if not folder.is_dir():
            raise CameraError(f"replay folder {folder} does not exist")
        self._paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._paths:
            raise CameraError(f"replay folder {folder} holds no images")
        self._next = 0

    def read(self) -> Image.Image:
        path = self._paths[self._next]
        if self._next + 1 < len(self._paths):
            self._next += 1
        elif self.config.loop:
            self._next = 0
        try:
            return decode_image(path.read_bytes())
        except (OSError, ImageDecodeError) as err:
            raise CameraError(f"replay image {path} cannot be read: {err}") from err

    def close(self) -> None:
        self._paths = []


CAMERA_TYPES: dict[str, Callable[[Any], Camera]] = {
    "picamera2": PiCamera,
    "opencv": OpenCVCamera,
    "replay": ReplayCamera,
}


def create_camera(config: CameraConfig) -> Camera:
    """Build the camera source named by ``config.type``.

    Raises:
        ValueError: the type names no known source.
    """
    try:
        make = CAMERA_TYPES[config.type]
    except KeyError:
        raise ValueError(
            f"unknown camera type {config.type!r}: use one of {', '.join(CAMERA_TYPES)}"
        ) from None
    return make(config)


@dataclass(frozen=True)
class Frame:
    image: Image.Image
    taken_at: float  # time.monotonic() when the read started
    read_seconds: float


class CameraFeed:
    """Reads a camera on its own thread and keeps the latest frame.

    Args:
        camera: the source to read.
        config: pacing and retry settings.
        on_state: called with True when frames flow again, False when the camera fails.
        on_frame: called on the feed thread with each new frame (the motion trigger).
        on_error: called with each failed open or read.
    """

    def __init__(
        self,
        camera: Camera,
        config: CameraConfig,
        on_state: Callable[[bool, str], None],
        on_frame: Callable[[Frame], None] | None = None,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.camera = camera
        self.config = config
        self._on_state = on_state
        self._on_frame = on_frame
        self._on_error = on_error
        self._latest: Frame | None = None
        self._up = False
        self._down = False  # failed since the last frame; neither while the first open runs
        self.last_error = "camera not opened yet"
        self._read_started: float | None = None  # time.monotonic() of the read in progress
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="camera-feed", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="camera-watchdog", daemon=True)

    @property
    def up(self) -> bool:
        """Frames are arriving."""
        return self._up

    @property
    def down(self) -> bool:
        """The camera failed and is being retried."""
        return self._down

    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread.ident is None:
            return  # never started
        self._watchdog.join(timeout)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("camera feed did not stop within %.1f s", timeout)

    def frame_after(self, moment: float, timeout: float) -> Frame | None:
        """The first frame whose read started at or after ``moment`` (time.monotonic()).

        Waits while the camera starts; returns None when the camera is down or no such frame
        comes within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._stop.is_set():
                frame = self._latest
                if frame is not None and frame.taken_at >= moment:
                    return frame
                left = deadline - time.monotonic()
                if left <= 0 or self._down:
                    return None
                self._changed.wait(left)
        return None

    def _run(self) -> None:
        retry = self.config.retry_min_seconds
        while not self._stop.is_set():
            try:
                self.camera.open()
                retry = self.config.retry_min_seconds
                self._read_until_failure()
            except CameraError as err:
                self._failed(str(err))
            except Exception as err:  # a driver bug must not end the feed thread
                logger.exception("camera raised an unexpected error")
                self._failed(f"unexpected camera error: {err!r}")
            finally:
                self._close_quietly()
            if not self._stop.is_set():
                logger.info("reopening the camera in %.1f s", retry)
                self._stop.wait(retry)
                retry = min(retry * 2, self.config.retry_max_seconds)
        self._set_state(False, "stopped")

    def _read_until_failure(self) -> None:
        interval = self.config.frame_interval_seconds
        while not self._stop.is_set():
            started = self._read_started = time.monotonic()
            try:
                image = self.camera.read()
            finally:
                self._read_started = None
            frame = Frame(image, started, time.monotonic() - started)
            with self._changed:
                self._latest = frame
                self._changed.notify_all()
            self._set_state(True, "frames arriving")
            if self._on_frame is not None:
                self._on_frame(frame)
            self._stop.wait(max(0.0, interval - (time.monotonic() - started)))

    def _watch(self) -> None:
        """Report the camera down while a read hangs; the next frame brings it back up.

        A driver stuck inside a read raises nothing, so without this the camera would look up
        (health, ``smartbin_camera_up``) while every trigger timed out.
        """
        stall = self.config.stall_seconds
        while not self._stop.wait(min(stall / 4, 1.0)):
            started = self._read_started
            if self._up and started is not None and time.monotonic() - started > stall:
                self._failed(
                    f"a frame read has not returned for {stall:.1f} s: the camera is stuck"
                )

    def _failed(self, reason: str) -> None:
        self.last_error = reason
        if self._on_error is not None:
            self._on_error()
        if self._up:
            logger.error("camera down: %s", reason)
        else:
            logger.warning("camera unavailable: %s", reason)
        self._set_state(False, reason)

    def _set_state(self, up: bool, reason: str) -> None:
        if up and self._up:
            return  # every frame confirms the camera is up; report only the change
        with self._changed:
            self._up, self._down = up, not up
            self._changed.notify_all()
        if up:
            logger.info("camera up: %s", reason)
        self._on_state(up, reason)

    def _close_quietly(self) -> None:
        try:
            self.camera.close()
        except Exception:  # closing a broken camera may fail too; the reopen starts clean
            logger.debug("camera close failed", exc_info=True)
