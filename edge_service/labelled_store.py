"""Photos an operator has filed under a label, on the bin's disk, ready to become training data.

The folder is laid out as a training folder: ``<folder>/<label>/<photo id>.jpg``, each photo
with a sidecar ``<photo id>.json`` that says when and on which bin it was taken, which model
answered with which guesses, and when it was filed. Photos filed as "not an item" (an empty
bin, a hand, the lid) go to ``.not-an-item/``, a name no label can take; the trainer skips
folders whose names start with a dot, so they never become a category by accident.

Each file is written to a temporary name and renamed into place, the photo first and its
sidecar last: the sidecar is what makes a photo filed, so a crash leaves at most a photo
without a sidecar, which the next start removes.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_service.config import LabelledImagesConfig
from edge_service.recent import Guess, PhotoRecord
from smartbin.files import write_atomically

logger = logging.getLogger(__name__)

# The folder photos filed as "not an item" go to; labels cannot start with a dot.
NOT_AN_ITEM = ".not-an-item"
SIDECAR_SUFFIX = ".json"
PHOTO_SUFFIX = ".jpg"
MAX_LABEL_LENGTH = 48
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# Names Windows keeps for devices, whatever the extension: a folder so named cannot be made.
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul"} | {
    f"{kind}{n}" for kind in ("com", "lpt") for n in range(1, 10)
}


class LabelError(ValueError):
    """A label that cannot name a folder on every system; the message says what to use."""


class StoreFull(Exception):
    """The store holds labelled_images.max_files or max_bytes already."""


def normalise_new_label(text: str) -> str:
    """A category name typed by an operator, as a folder name: trimmed, lower case, spaces as
    hyphens ("Coffee cups" -> "coffee-cups").

    Raises:
        LabelError: the result is not a valid label (see :func:`check_label`).
    """
    return check_label(re.sub(r"\s+", "-", text.strip().lower()))


def check_label(label: str) -> str:
    """Return ``label`` when it can name a folder on Linux, macOS and Windows alike.

    Raises:
        LabelError: it is empty, too long, has characters other than letters, digits, "-" and
            "_", starts with neither a letter nor a digit, or is a Windows device name.
    """
    if label == NOT_AN_ITEM:
        return label
    if not label or len(label) > MAX_LABEL_LENGTH or not _LABEL.match(label):
        raise LabelError(
            f"label {label!r} cannot name a folder: use 1 to {MAX_LABEL_LENGTH} letters, digits, "
            "'-' or '_', starting with a letter or digit"
        )
    if label.lower() in _WINDOWS_DEVICES:
        raise LabelError(f"label {label!r} is a device name on Windows: choose another name")
    return label


@dataclass(frozen=True)
class LabelledPhoto:
    """One filed photo: its sidecar's content and where its JPEG lies."""

    photo_id: str
    label: str
    taken_at: float
    labelled_at: float
    bin_id: str
    model_version: str
    trigger: str
    guesses: tuple[Guess, ...]
    sha256: str
    size: int
    path: Path

    def sidecar(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = self.path.name
        data["guesses"] = [asdict(guess) for guess in self.guesses]
        return data

    @classmethod
    def from_sidecar(cls, data: dict[str, Any], path: Path) -> LabelledPhoto:
        return cls(
            photo_id=str(data["photo_id"]),
            label=str(data["label"]),
            taken_at=float(data["taken_at"]),
            labelled_at=float(data["labelled_at"]),
            bin_id=str(data["bin_id"]),
            model_version=str(data["model_version"]),
            trigger=str(data.get("trigger", "")),
            guesses=tuple(Guess(str(g["label"]), float(g["score"])) for g in data["guesses"]),
            sha256=str(data["sha256"]),
            size=int(data["size"]),
            path=path,
        )


class LabelledStore:
    """The filed photos of one bin, bounded by count and bytes.

    Raises:
        ValueError: the folder cannot be created or read.
    """

    def __init__(self, config: LabelledImagesConfig, bin_id: str) -> None:
        self.config = config
        self.folder = config.folder
        self.bin_id = bin_id
        self._lock = threading.Lock()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._photos = {photo.photo_id: photo for photo in self._scan()}
        except OSError as err:
            raise ValueError(f"labelled_images folder {self.folder} cannot be used: {err}") from err

    def _scan(self) -> list[LabelledPhoto]:
        """Read every sidecar; remove what a crash left half done."""
        found: list[LabelledPhoto] = []
        for leftover in self.folder.glob("*/.*.part"):
            leftover.unlink(missing_ok=True)
        for photo in self.folder.glob(f"*/*{PHOTO_SUFFIX}"):
            sidecar = photo.with_suffix(SIDECAR_SUFFIX)
            if not sidecar.exists():
                logger.warning("removing %s: its sidecar was never written", photo)
                photo.unlink(missing_ok=True)
                continue
            try:
                found.append(LabelledPhoto.from_sidecar(json.loads(sidecar.read_text()), photo))
            except (ValueError, KeyError, TypeError) as err:
                logger.warning("skipping %s: unreadable sidecar (%s)", photo, err)
        return found

    def photos(self) -> list[LabelledPhoto]:
        """Every filed photo, oldest taken first."""
        with self._lock:
            return sorted(self._photos.values(), key=lambda p: p.photo_id)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(photo.size for photo in self._photos.values())

    def counts(self) -> dict[str, int]:
        """Photos per label."""
        counts: dict[str, int] = {}
        for photo in self.photos():
            counts[photo.label] = counts.get(photo.label, 0) + 1
        return dict(sorted(counts.items()))

    def file(self, record: PhotoRecord, label: str) -> LabelledPhoto:
        """File ``record`` under ``label`` (checked); filing a photo again moves it.

        Raises:
            LabelError: the label cannot name a folder.
            StoreFull: the store is at its limits.
            OSError: the disk refused the write (nothing half-written is left).
        """
        check_label(label)
        folder = self.folder / label
        path = folder / f"{record.photo_id}{PHOTO_SUFFIX}"
        photo = LabelledPhoto(
            photo_id=record.photo_id,
            label=label,
            taken_at=record.taken_at,
            labelled_at=time.time(),
            bin_id=self.bin_id,
            model_version=record.model_version,
            trigger=record.trigger,
            guesses=record.guesses,
            sha256=record.sha256,
            size=len(record.jpeg),
            path=path,
        )
        with self._lock:
            previous = self._photos.get(record.photo_id)
            self._check_room(photo, previous)
            folder.mkdir(exist_ok=True)
            write_atomically(path, record.jpeg)
            sidecar = json.dumps(photo.sidecar(), indent=1).encode()
            write_atomically(path.with_suffix(SIDECAR_SUFFIX), sidecar)
            if previous is not None and previous.path != path:
                previous.path.with_suffix(SIDECAR_SUFFIX).unlink(missing_ok=True)
                previous.path.unlink(missing_ok=True)
            self._photos[photo.photo_id] = photo
        logger.info("filed photo %s as %s", photo.photo_id, label)
        return photo

    def _check_room(self, photo: LabelledPhoto, previous: LabelledPhoto | None) -> None:
        count = len(self._photos) + (0 if previous else 1)
        size = sum(p.size for p in self._photos.values()) + photo.size
        size -= previous.size if previous else 0
        if count > self.config.max_files or size > self.config.max_bytes:
            raise StoreFull(
                f"the labelled photos in {self.folder} reached labelled_images.max_files "
                f"({self.config.max_files}) or max_bytes ({self.config.max_bytes}): collect "
                "them (smartbin-collect) and move them off the bin, or raise the limits"
            )
