"""Keeps the photos the model was unsure about, for relabelling and the next training run.

Files are named ``<unix-ms>-<n>-<best label>.jpg`` so that name order is age order and a person
sorting them sees the model's guess. The folder is bounded by file count and bytes; the oldest
files go first. The store reports how full it is and every photo it could not keep in the
service's metrics (``smartbin_unsure_photo*``), so a full or read-only card shows on the fleet
dashboard instead of only in the bin's log.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from PIL import Image

from edge_service.config import UnsureImagesConfig
from edge_service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
# OSError numbers that name what the operator must fix; any other one is an "io_error".
FAILURE_REASON_BY_ERRNO = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "disk_full",
    errno.EROFS: "not_writable",
    errno.EACCES: "not_writable",
    errno.EPERM: "not_writable",
}


def failure_reason(err: OSError) -> str:
    """The ``reason`` label of a failed write: disk_full, not_writable or io_error."""
    return FAILURE_REASON_BY_ERRNO.get(err.errno or 0, "io_error")


def jpeg_bytes(image: Image.Image, encoded: bytes | None = None) -> bytes:
    """The photo as JPEG: the caller's own bytes when they are JPEG already, else re-encoded."""
    if encoded is not None and encoded.startswith(JPEG_MAGIC):
        return encoded
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


class UnsureStore:
    """A folder of photos bounded by count and bytes.

    Args:
        config: the folder and its limits.
        metrics: where the folder's size and failed writes are reported; None: nowhere.

    Raises:
        ValueError: the folder cannot be created or read.
    """

    def __init__(self, config: UnsureImagesConfig, metrics: ServiceMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.folder = config.folder
        self._lock = threading.Lock()
        self._count = 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            existing = sorted(p for p in self.folder.glob("*.jpg") if p.is_file())
            sizes = [(p, p.stat().st_size) for p in existing]
        except OSError as err:
            raise ValueError(f"unsure_images folder {self.folder} cannot be used: {err}") from err
        self._files: deque[tuple[Path, int]] = deque(sizes)
        self._bytes = sum(size for _, size in self._files)
        self._details: dict[Path, dict[str, Any]] = {}  # what the model said (describe())
        self._evict()  # the limits may have shrunk since the last run
        self._publish()

    @property
    def files(self) -> list[Path]:
        with self._lock:
            return [path for path, _ in self._files]

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def keep(self, image: Image.Image, label: str, encoded: bytes | None = None) -> Path | None:
        """Write the photo; returns its path, or None when it could not be kept."""
        data = jpeg_bytes(image, encoded)
        if len(data) > self.config.max_bytes:
            logger.warning("unsure photo of %d bytes exceeds max_bytes; not kept", len(data))
            self._count_failure("too_large")
            return None
        safe_label = re.sub(r"[^\w.-]+", "_", label)[:40]
        with self._lock:
            self._count += 1
            name = f"{int(time.time() * 1000):013d}-{self._count:06d}-{safe_label}.jpg"
            path = self.folder / name
            try:
                partial = path.with_suffix(".part")
                partial.write_bytes(data)
                partial.replace(path)
            except OSError as err:
                logger.warning("cannot keep unsure photo in %s: %s", self.folder, err)
                with contextlib.suppress(OSError):  # no half-written photo left behind
                    partial.unlink(missing_ok=True)
                self._count_failure(failure_reason(err))
                return None
            self._files.append((path, len(data)))
            self._bytes += len(data)
            self._evict()
            self._publish()
        return path

    def _count_failure(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.unsure_photo_write_failures.labels(reason).inc()

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.unsure_photos.set(len(self._files))
            self.metrics.unsure_photo_bytes.set(self._bytes)

    def _evict(self) -> None:
        while self._files and (
            len(self._files) > self.config.max_files or self._bytes > self.config.max_bytes
        ):
            path, size = self._files.popleft()
            self._bytes -= size
            path.unlink(missing_ok=True)
            self._details.pop(path, None)

    # The review page (edge_service/web/review.py) lists the kept photos with what the model
    # said, and takes out those an operator has filed. What the model said is kept in memory,
    # not beside the photos, so that the folder holds photos only: after a restart, a photo
    # kept before it shows the best guess its name carries.

    def describe(self, path: Path, details: dict[str, Any]) -> None:
        """Remember what the model said about the kept photo at ``path`` (taken_at, trigger,
        model_version, guesses), for as long as the photo is kept."""
        with self._lock:
            if any(kept == path for kept, _ in self._files):
                self._details[path] = details

    def details(self, path: Path) -> dict[str, Any]:
        """What :meth:`describe` was told about ``path``; {} when nothing was."""
        with self._lock:
            return dict(self._details.get(path, {}))

    def find(self, name: str) -> Path | None:
        """The kept photo called ``name`` (a file name, never a path), or None."""
        with self._lock:
            return next((path for path, _ in self._files if path.name == name), None)

    def take(self, path: Path) -> None:
        """Remove a kept photo and its details from the store (it was filed elsewhere)."""
        with self._lock:
            for index, (kept, size) in enumerate(self._files):
                if kept == path:
                    del self._files[index]
                    self._bytes -= size
                    break
            path.unlink(missing_ok=True)
            self._details.pop(path, None)
            self._publish()
