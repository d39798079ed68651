"""Writing files that a crash or a reader never sees half-written (labelled photos on the bin,
the fleet's rollout state, a collected training folder)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename: ``path`` holds
    the old content or the whole new one, never part of it, even across a power cut."""
    partial = path.with_name(f".{path.name}.part")
    with open(partial, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    partial.replace(path)
