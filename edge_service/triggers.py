"""What makes the bin take a photo: a GPIO input (lid switch, IR beam) or motion in the frame.

Each trigger calls ``fire(source, frame)``; the capture loop debounces and queues the capture.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_service.camera import Frame
from edge_service.config import GpioTriggerConfig, MotionTriggerConfig

logger = logging.getLogger(__name__)

Fire = Callable[[str, Frame | None], Any]

# Motion is judged on a small greyscale thumbnail: cheap on a Pi and blind to sensor noise.
THUMBNAIL_SIZE = (64, 48)


class TriggerError(ValueError):
    """A configured trigger cannot be set up (a configuration error); the message says why."""


class GpioTrigger:
    """Fires on one edge of a GPIO input, read by gpiozero on its own callback thread.

    gpiozero picks its pin factory (lgpio, RPi.GPIO...) or uses ``Device.pin_factory`` when set;
    tests set gpiozero's ``MockFactory`` there.
    """

    source = "gpio"

    def __init__(self, config: GpioTriggerConfig, fire: Fire) -> None:
        try:
            from gpiozero import DigitalInputDevice, GPIOZeroError  # type: ignore[import-untyped]
        except ImportError as err:
            raise TriggerError(
                "gpiozero is not installed: install the edge with its gpio extra "
                "(pip install './edge_service[gpio]')"
            ) from err
        try:
            self._device = DigitalInputDevice(
                config.pin,
                pull_up=config.pull_up,
                active_state=config.active_high,
                bounce_time=config.bounce_seconds,
            )
        except (GPIOZeroError, ValueError, OSError) as err:
            raise TriggerError(f"GPIO pin {config.pin!r} cannot be used: {err}") from err
        handler = lambda: fire(self.source, None)  # noqa: E731
        if config.edge == "activated":
            self._device.when_activated = handler
        else:
            self._device.when_deactivated = handler
        logger.info("GPIO trigger on pin %s (%s)", config.pin, config.edge)

    def close(self) -> None:
        self._device.close()


def thumbnail(frame: Frame) -> np.ndarray:
    small = frame.image.convert("L").resize(THUMBNAIL_SIZE)
    return np.asarray(small, dtype=np.float32) / 255.0


def difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel change between two thumbnails, 0 (same) to 1."""
    return float(np.abs(a - b).mean())


class MotionTrigger:
    """Fires once per change of scene, with the first frame after the scene holds still.

    The scene before the change is the reference: a change larger than ``change_threshold``
    starts a motion; ``settle_frames`` frames in a row that differ from their predecessor by
    less than ``settle_threshold`` end it. The settled frame fires unless the scene went back to
    how it looked when the camera started (the empty bin) or to the reference.
    """

    source = "motion"

    def __init__(self, config: MotionTriggerConfig, fire: Fire) -> None:
        self.config = config
        self._fire = fire
        self._empty: np.ndarray | None = None
        self._reference: np.ndarray | None = None
        self._previous: np.ndarray | None = None
        self._still = 0
        self._moving = False

    def reset(self) -> None:
        """Forget the scene (the camera reopened, maybe pointing elsewhere)."""
        self._empty = self._reference = self._previous = None
        self._moving = False

    def on_frame(self, frame: Frame) -> None:
        current = thumbnail(frame)
        previous, self._previous = self._previous, current
        if self._reference is None or previous is None:
            self._empty = self._reference = current
            return
        if not self._moving:
            if difference(current, self._reference) > self.config.change_threshold:
                self._moving, self._still = True, 0
            return
        if difference(current, previous) >= self.config.settle_threshold:
            self._still = 0
            return
        self._still += 1
        if self._still < self.config.settle_frames:
            return
        self._moving = False
        changed = difference(current, self._reference) > self.config.change_threshold
        assert self._empty is not None
        emptied = difference(current, self._empty) <= self.config.change_threshold
        self._reference = current
        if changed and not emptied:
            self._fire(self.source, frame)
