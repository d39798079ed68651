"""Fleet rollout records: what ``smartbin-fleet`` publishes to the bundle store and what bins
report back.

The store is any HTTP(S) object store (S3-compatible, or a plain web server) under one prefix:

- ``rollout.json``: the :class:`Rollout` in force, written last when a bundle is published, so
  a bin never sees a rollout whose files are not all there;
- ``bundles/<rollout_id>/<file>``: the bundle's files, each listed in the rollout with its
  sha256;
- ``status/<bin>.json``: each bin's :class:`BinStatus`, written by the bin through the
  pre-signed upload address the rollout gives it;
- ``rollouts/<rollout_id>.json``: every rollout published, for ``smartbin-fleet rollback``.

Both the bins (edge_service/rollout.py) and the fleet tool read these with the models below, so
a key either side does not know is an error, not silently ignored.
"""

from __future__ import annotations

import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from smartbin.bundle import MANIFEST_NAME

ROLLOUT_FORMAT_VERSION = 1
ROLLOUT_NAME = "rollout.json"
BUNDLES_FOLDER = "bundles"
STATUS_FOLDER = "status"
HISTORY_FOLDER = "rollouts"
# Bin ids and rollout ids become object keys and folder names: no slashes, no leading dot.
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"

# Where a bin stands in a rollout:
#   waiting      not a canary: the soak has not ended yet
#   held         not a canary: a canary rolled back, so this bin keeps its model
#   halted       the operator halted the rollout before this bin swapped
#   watching     a canary serving the new bundle during the soak, comparing its answers
#   serving      serving the rollout's bundle (a canary whose soak passed, or any other bin)
#   rolled_back  swapped back to its previous bundle (a regression, or RollbackModel)
#   refused      the bundle failed its checks (sha256, signature, smoke test): not served
BinState = Literal["waiting", "held", "halted", "watching", "serving", "rolled_back", "refused"]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RolloutFile(_Record):
    """One file of the published bundle: its digest and size, checked after the download."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Rollout(_Record):
    """``rollout.json``: which bundle the fleet should serve, and how it gets there."""

    format_version: Literal[1] = 1  # ROLLOUT_FORMAT_VERSION
    rollout_id: str = Field(pattern=NAME_PATTERN)
    version: str = Field(min_length=1, description="the bundle's manifest version")
    files: dict[str, RolloutFile] = Field(description="file name -> digest, manifest included")
    canary: tuple[str, ...] = Field(
        default=(), description="bins that swap first and are watched during the soak"
    )
    soak_seconds: float = Field(ge=0.0, description="how long the canaries serve alone")
    created_at: float = Field(description="Unix time of publication")
    halted: bool = Field(False, description="no bin that has not swapped yet swaps")
    # Pre-signed upload addresses for status/<bin>.json, by bin id; a bin without one does
    # not report to the store (its metrics and GetModelInfo still say where it stands).
    status_urls: dict[str, str] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _plain_names_with_manifest(cls, files: dict[str, RolloutFile]) -> dict[str, RolloutFile]:
        for name in files:
            if "/" in name or "\\" in name or name.startswith(".") or not name:
                raise ValueError(f"file name {name!r} must be a plain name inside the bundle")
        if MANIFEST_NAME not in files:
            raise ValueError(f"the rollout lists no {MANIFEST_NAME}")
        return files

    @field_validator("canary")
    @classmethod
    def _bin_names(cls, canary: tuple[str, ...]) -> tuple[str, ...]:
        for name in canary:
            check_bin_id(name)
        return canary

    @property
    def bundle_prefix(self) -> str:
        """Where the bundle's files lie, relative to the store's prefix."""
        return f"{BUNDLES_FOLDER}/{self.rollout_id}/"

    @property
    def soak_ends_at(self) -> float:
        return self.created_at + self.soak_seconds

    def is_canary(self, bin_id: str) -> bool:
        return bin_id in self.canary


class BinStatus(_Record):
    """``status/<bin>.json``: what a bin serves and where it stands in the current rollout."""

    bin: str = Field(pattern=NAME_PATTERN)
    rollout_id: str = ""
    state: BinState
    version: str = Field(description="the model version the bin serves")
    previous_version: str = ""
    reason: str = ""
    # Over the canary's window: its answers on the new model, and the rates it compared.
    answers: int = 0
    unsure_rate: float | None = None
    baseline_unsure_rate: float | None = None
    error_rate: float | None = None
    baseline_error_rate: float | None = None
    updated_at: float = Field(default_factory=time.time)


def check_bin_id(name: str) -> str:
    """Raises ValueError, saying what a bin id may hold, when ``name`` is not one."""
    if not re.match(NAME_PATTERN, name):
        raise ValueError(
            f"bin id {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', not starting "
            "with '.' or '-'"
        )
    return name
