"""The bin's last answers with their photos, for the review page.

They are kept in memory, not on disk: every answer passes through here, and writing each photo
would wear a bin's SD card and keep photos of everything thrown away; only the photos an
operator files (edge_service/labelled_store.py) and the unsure ones (unsure_store.py) reach
the disk. The ring is bounded by count and by bytes, the oldest going first, and is lost on a
restart, which costs nothing: the next items fill it again.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from edge_service.unsure_store import jpeg_bytes
from smartbin.model import Prediction

if TYPE_CHECKING:
    from edge_service.classify import Answer

logger = logging.getLogger(__name__)

# The guesses kept with each photo: enough for an operator to see what the model hesitated on.
GUESSES_KEPT = 3


@dataclass(frozen=True)
class Guess:
    label: str
    score: float


@dataclass(frozen=True)
class PhotoRecord:
    """One photo the bin classified, as the review page and the labelled store see it.

    Attributes:
        photo_id: unique on this bin: the capture time in milliseconds and a content digest.
        jpeg: the photo as JPEG.
        taken_at: Unix time the photo was taken (or uploaded).
        trigger: what took it: "upload" (Classify), "rpc" (Capture), "gpio", "motion".
        model_version: the model that answered.
        guesses: the model's best labels, best first.
        unsure: whether the best score was under the unsure threshold.
    """

    photo_id: str
    jpeg: bytes
    taken_at: float
    trigger: str
    model_version: str
    guesses: tuple[Guess, ...]
    unsure: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.jpeg).hexdigest()


def photo_id_for(jpeg: bytes, taken_at: float) -> str:
    """``<unix ms>-<first 10 hex of sha256>``: sorts by age, the same photo gets the same id."""
    return f"{int(taken_at * 1000):013d}-{hashlib.sha256(jpeg).hexdigest()[:10]}"


def guesses_from(predictions: tuple[Prediction, ...]) -> tuple[Guess, ...]:
    return tuple(Guess(p.label, float(p.score)) for p in predictions[:GUESSES_KEPT])


class RecentAnswers:
    """A ring of the last ``max_items`` photos, at most ``max_bytes`` of JPEG in all.

    Args:
        max_items: photos kept; 0 keeps none.
        max_bytes: JPEG bytes kept; a photo larger than this alone is not kept.
    """

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._records: OrderedDict[str, PhotoRecord] = OrderedDict()
        self._bytes = 0

    def add(
        self,
        image: Image.Image,
        encoded: bytes | None,
        answer: Answer,
        trigger: str,
        taken_at: float | None = None,
    ) -> PhotoRecord | None:
        """Keep one answered photo; returns its record, or None when the ring keeps none.

        Args:
            image: the photo.
            encoded: its file, kept as is when it is a JPEG; else the photo is encoded.
            answer: what the model said.
            trigger: what took it ("upload", "rpc", "gpio", "motion").
            taken_at: Unix time it was taken; None: now.
        """
        if self.max_items == 0:
            return None
        jpeg = jpeg_bytes(image, encoded)
        if len(jpeg) > self.max_bytes:
            logger.info("recent photo of %d bytes exceeds review_recent_max_bytes", len(jpeg))
            return None
        when = time.time() if taken_at is None else taken_at
        record = PhotoRecord(
            photo_id_for(jpeg, when),
            jpeg,
            when,
            trigger,
            answer.model_version,
            guesses_from(answer.predictions),
            answer.unsure,
        )
        with self._lock:
            previous = self._records.pop(record.photo_id, None)
            if previous is not None:
                self._bytes -= len(previous.jpeg)
            self._records[record.photo_id] = record
            self._bytes += len(jpeg)
            while len(self._records) > self.max_items or self._bytes > self.max_bytes:
                _, oldest = self._records.popitem(last=False)
                self._bytes -= len(oldest.jpeg)
        return record

    def newest_first(self) -> list[PhotoRecord]:
        with self._lock:
            return list(reversed(self._records.values()))

    def get(self, photo_id: str) -> PhotoRecord | None:
        with self._lock:
            return self._records.get(photo_id)

    def remove(self, photo_id: str) -> None:
        """Forget a photo (it was filed): the page stops offering it."""
        with self._lock:
            record = self._records.pop(photo_id, None)
            if record is not None:
                self._bytes -= len(record.jpeg)
