"""Keeps the photos the model was unsure about, for relabelling and the next training run.

Files are named ``<unix-ms>-<n>-<best label>.jpg`` so that name order is age order and a person
sorting them sees the model's guess. The folder is bounded by file count and bytes; the oldest
files go first.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from collections import deque
from pathlib import Path

from PIL import Image

from edge_service.config import UnsureImagesConfig

logger = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"


def jpeg_bytes(image: Image.Image, encoded: bytes | None = None) -> bytes:
    """The photo as JPEG: the caller's own bytes when they are JPEG already, else re-encoded."""
    if encoded is not None and encoded.startswith(JPEG_MAGIC):
        return encoded
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


class UnsureStore:
    """A folder of photos bounded by count and bytes.

    Raises:
        ValueError: the folder cannot be created or read.
    """

    def __init__(self, config: UnsureImagesConfig) -> None:
        self.config = config
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
        self._evict()  # the limits may have shrunk since the last run

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
                return None
            self._files.append((path, len(data)))
            self._bytes += len(data)
            self._evict()
        return path

    def _evict(self) -> None:
        while self._files and (
            len(self._files) > self.config.max_files or self._bytes > self.config.max_bytes
        ):
            path, size = self._files.popleft()
            self._bytes -= size
            path.unlink(missing_ok=True)
