"""The capture loop: triggers in, debounced, photographed, classified and published as events.

Triggers (GPIO edge, motion, the Capture RPC) go through ``admit``, which drops a GPIO or motion
trigger that comes within ``debounce_seconds`` of the previous capture and puts the rest on a
small queue without ever blocking the trigger. One thread takes them off the queue, waits for a
frame taken after the trigger, classifies it and publishes the event. The Capture RPC does the
same on its own gRPC thread so that it can return the answer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_service.camera import CameraFeed, Frame, create_camera
from edge_service.classify import Pipeline
from edge_service.config import ServiceConfig
from edge_service.events import Event, EventHub
from edge_service.metrics import ServiceMetrics
from edge_service.reload import ModelSlot
from edge_service.triggers import GpioTrigger, MotionTrigger

logger = logging.getLogger(__name__)

# A trigger waits here while the previous photo is classified; more than this are dropped.
TRIGGER_QUEUE_SIZE = 2


class CameraUnavailable(Exception):
    """No photo could be taken; the message says why."""


@dataclass(frozen=True)
class _Trigger:
    source: str
    not_before: float  # time.monotonic() the photo must be taken at or after
    frame: Frame | None  # the motion trigger brings its settled frame


class CaptureLoop:
    """Owns the camera feed, the triggers and the thread that turns triggers into events.

    Args:
        config: the service config; ``config.camera`` must be set.
        models: the served model, read once per capture.
        pipeline: the shared classification path.
        hub: where events are published.
        metrics: camera, trigger and stage metrics.
        on_camera_state: told ``(up, reason)`` on each camera change (health).

    Raises:
        TriggerError: a configured GPIO trigger cannot be set up.
    """

    def __init__(
        self,
        config: ServiceConfig,
        models: ModelSlot,
        pipeline: Pipeline,
        hub: EventHub,
        metrics: ServiceMetrics,
        on_camera_state: Callable[[bool, str], None],
    ) -> None:
        assert config.camera is not None
        self.camera_config = config.camera
        self.triggers_config = config.triggers
        self.models = models
        self.pipeline = pipeline
        self.hub = hub
        self.metrics = metrics
        self._on_camera_state = on_camera_state
        self._queue: queue.Queue[_Trigger | None] = queue.Queue(maxsize=TRIGGER_QUEUE_SIZE)
        self._admit_lock = threading.Lock()
        self._last_capture = float("-inf")
        self._event_ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        motion = config.triggers.motion
        self._motion = MotionTrigger(motion, self.admit) if motion else None
        self.feed = CameraFeed(
            create_camera(config.camera),
            config.camera,
            on_state=self._camera_state,
            on_frame=self._motion.on_frame if self._motion else None,
            on_error=metrics.camera_errors.inc,
        )
        metrics.camera_up.set(0)
        gpio = config.triggers.gpio
        self._gpio = GpioTrigger(gpio, self.admit) if gpio else None

    def start(self) -> None:
        self._thread.start()
        self.feed.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Release the GPIO pin, end the capture thread, close the camera."""
        if self._gpio is not None:
            self._gpio.close()
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # wake the capture thread now
        if self._thread.ident is not None:
            self._thread.join(timeout)
        self.feed.stop(timeout)

    def admit(self, source: str, frame: Frame | None = None, debounce: bool = True) -> str:
        """Decide what becomes of a trigger and count it; never blocks.

        Returns:
            the outcome: "accepted", "debounced", "camera_down" or "dropped" (queue full).
        """
        now = time.monotonic()
        with self._admit_lock:
            if debounce and now - self._last_capture < self.triggers_config.debounce_seconds:
                outcome = "debounced"
            elif self.feed.down:
                outcome = "camera_down"
            else:
                outcome = "accepted"
                self._last_capture = now
        if outcome == "accepted" and source != "rpc":
            gpio = self.triggers_config.gpio
            delay = gpio.delay_seconds if gpio and source == "gpio" else 0.0
            try:
                self._queue.put_nowait(_Trigger(source, now + delay, frame))
            except queue.Full:
                outcome = "dropped"
        self.metrics.triggers.labels(source, outcome).inc()
        if outcome != "accepted":
            logger.info("%s trigger %s", source, outcome)
        return outcome

    def capture_now(self, timeout: float) -> Event:
        """Take a photo now for the Capture RPC, classify it and publish the event.

        Raises:
            CameraUnavailable: the camera is down or no frame came within ``timeout``.
        """
        requested = time.monotonic()
        if self.admit("rpc", debounce=False) != "accepted":
            raise CameraUnavailable(f"camera is down: {self.feed.last_error}; retrying")
        return self._capture("rpc", requested, None, timeout)

    def _capture(
        self, source: str, not_before: float, frame: Frame | None, timeout: float
    ) -> Event:
        started = max(not_before, time.monotonic())
        if frame is None:
            frame = self.feed.frame_after(not_before, timeout)
            if frame is None:
                reason = "camera is down" if self.feed.down else "no fresh frame"
                raise CameraUnavailable(
                    f"{reason} within {timeout:.1f} s ({self.feed.last_error}); retrying"
                )
            capture_seconds = max(frame.read_seconds, time.monotonic() - started)
        else:
            capture_seconds = frame.read_seconds
        taken_at = time.time() - (time.monotonic() - frame.taken_at)
        answer = self.pipeline.answer(
            self.models.current,
            frame.image,
            capture_seconds=capture_seconds,
            trigger=source,
            taken_at=taken_at,
        )
        event = Event(next(self._event_ids), taken_at, source, answer)
        self.hub.publish(event)
        best = answer.predictions[0]
        logger.info(
            "event %d (%s): %s %.2f%s",
            event.event_id,
            source,
            best.label,
            best.score,
            " unsure" if answer.unsure else "",
        )
        return event

    def _run(self) -> None:
        timeout = self.camera_config.capture_timeout_seconds
        while not self._stop.is_set():
            try:
                trigger = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if trigger is None:
                break
            try:
                self._capture(trigger.source, trigger.not_before, trigger.frame, timeout)
            except CameraUnavailable as err:
                logger.warning("%s trigger took no photo: %s", trigger.source, err)
            except Exception:  # one bad capture must not end the loop
                logger.exception("%s capture failed", trigger.source)

    def _camera_state(self, up: bool, reason: str) -> None:
        self.metrics.camera_up.set(1 if up else 0)
        if up and self._motion is not None:
            self._motion.reset()  # a reopened camera may see the scene differently
        self._on_camera_state(up, reason)
