"""Fleet rollouts on the bin: poll the bundle store, download, check, swap, watch, roll back.

With a ``fleet:`` section in its config the bin polls ``rollout.json`` under ``fleet.store_url``
(smartbin.rollout describes the store) every ``poll_seconds`` over plain HTTP(S) GETs: no
cloud SDK on the bin. For a rollout it has not handled yet:

1. A bin that is not one of the rollout's canaries waits until the soak has ended, and then
   while no canary has reported that it serves the bundle, or while one reports that it rolled
   back or refused it (``held``).
2. It downloads the bundle's files into a hidden folder of ``fleet.bundles_dir``, checks each
   file's size and sha256 against the rollout, renames the folder to the rollout's id and swaps
   it in through the same checked reload as ``ReloadModel`` (manifest, model sha256, signature
   where ``bundle_signing`` asks, smoke inference). A refused bundle is not tried again; the
   old model keeps serving.
3. A canary then watches its answers until the soak ends: once the new model has given
   ``regression.min_answers`` answers, its unsure rate and its error rate are compared with the
   previous model's on this bin (from the service's own counters); one above by more than its
   margin rolls the bin back (``smartbin_rollout_rollbacks_total{reason="regression"}``).
4. Where it stands goes to ``status/<bin>.json`` in the store, through the pre-signed upload
   address the rollout carries for the bin, and to ``smartbin_rollout_state``.

Each rollout is applied at most once: ``state.json`` in ``bundles_dir`` (written atomically)
records the outcome of every rollout the bin handled, the bundle it serves and the previous
one, so after a restart the bin serves the rolled-out bundle again and a rollback, automatic or
by ``RollbackModel``, is not undone by the next poll.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydantic import ValidationError

from edge_service.bundle_trust import BundleTrust
from edge_service.config import FleetConfig, RegressionConfig, ServiceConfig
from edge_service.metrics import ServiceMetrics
from edge_service.reload import ModelSlot, ReloadError, ServedBundle
from smartbin.bundle import MANIFEST_NAME, Bundle, BundleError
from smartbin.files import write_atomically
from smartbin.rollout import (
    ROLLOUT_NAME,
    STATUS_FOLDER,
    BinState,
    BinStatus,
    Rollout,
)

logger = logging.getLogger(__name__)

STATE_NAME = "state.json"
# Hidden, so that a half-downloaded bundle is never taken for one.
INCOMING_PREFIX = ".incoming-"
CHUNK_BYTES = 1 << 16
# rollout.json and status objects are a few kB; anything far larger is not one.
MAX_RECORD_BYTES = 1 << 20
# The status codes that count as the bin's errors in a canary's error rate: the caller's own
# (INVALID_ARGUMENT, CANCELLED...) and a busy bin's (RESOURCE_EXHAUSTED) do not.
ERROR_CODES = frozenset({"UNKNOWN", "INTERNAL", "DATA_LOSS", "DEADLINE_EXCEEDED"})
ANSWERING_METHODS = frozenset({"Classify", "Capture"})
# Where a handled rollout ends for this bin: the report then stands, repeated on every poll.
SETTLED_STATES = frozenset({"serving", "rolled_back", "refused"})


class StoreError(Exception):
    """The store could not be reached, or answered with an error other than 'not found'."""


class RolloutRefused(Exception):
    """A published bundle failed its checks on this bin; the message says which."""


class ObjectTooLarge(Exception):
    """A downloaded object grew past the size the rollout gives it."""


class BundleStore:
    """Reads objects under the store's prefix, and writes through pre-signed addresses."""

    def __init__(self, base_url: str, ca: Path | None, timeout: float) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self._context = ssl.create_default_context(cafile=str(ca) if ca else None)

    def url(self, key: str) -> str:
        return urllib.parse.urljoin(self.base_url, urllib.parse.quote(key))

    def _open(self, request: urllib.request.Request | str) -> Any:
        context = self._context if self.base_url.startswith("https") else None
        return urllib.request.urlopen(request, timeout=self.timeout, context=context)

    def read(self, key: str) -> bytes | None:
        """A record's bytes; None when the store has no such object.

        Raises:
            StoreError: the store is unreachable, refused the read, or the object is larger
                than a record can be.
        """
        try:
            with self._open(self.url(key)) as response:
                data = bytes(response.read(MAX_RECORD_BYTES + 1))
            if len(data) > MAX_RECORD_BYTES:
                raise StoreError(f"{self.url(key)} is over {MAX_RECORD_BYTES} bytes: no record")
            return data
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise StoreError(f"{self.url(key)}: HTTP {err.code} {err.reason}") from err
        except (urllib.error.URLError, OSError) as err:
            raise StoreError(f"{self.url(key)}: {getattr(err, 'reason', err)}") from err

    def download(self, key: str, target: Path, limit: int) -> str:
        """Write the object to ``target``; returns its sha256. Stops past ``limit`` bytes.

        Raises:
            ObjectTooLarge: the object is larger than ``limit``.
            StoreError: the store is unreachable, or the object is missing.
        """
        digest = hashlib.sha256()
        written = 0
        try:
            with self._open(self.url(key)) as response, target.open("wb") as out:
                while chunk := response.read(CHUNK_BYTES):
                    written += len(chunk)
                    if written > limit:
                        raise ObjectTooLarge(f"{key} is larger than the {limit} bytes listed")
                    digest.update(chunk)
                    out.write(chunk)
        except urllib.error.HTTPError as err:
            raise StoreError(f"{self.url(key)}: HTTP {err.code} {err.reason}") from err
        except (urllib.error.URLError, OSError) as err:
            raise StoreError(f"{self.url(key)}: {getattr(err, 'reason', err)}") from err
        return digest.hexdigest()

    def put(self, url: str, data: bytes) -> None:
        """PUT ``data`` as JSON to a pre-signed address.

        Raises:
            StoreError: the upload failed (an expired address answers 403).
        """
        request = urllib.request.Request(
            url, data=data, method="PUT", headers={"Content-Type": "application/json"}
        )
        try:
            with self._open(request):
                pass
        except urllib.error.HTTPError as err:
            raise StoreError(f"status upload: HTTP {err.code} {err.reason}") from err
        except (urllib.error.URLError, OSError) as err:
            raise StoreError(f"status upload: {getattr(err, 'reason', err)}") from err


@dataclass
class FleetState:
    """``state.json``: the outcome of each rollout this bin handled, and its bundles."""

    handled: dict[str, str] = field(default_factory=dict)
    current: ServedBundle | None = None
    previous: ServedBundle | None = None

    @classmethod
    def read(cls, folder: Path) -> FleetState:
        """The saved state; an empty one when there is none or it is unreadable (logged)."""
        path = folder / STATE_NAME
        try:
            data = json.loads(path.read_text())
            return cls(
                handled=dict(data.get("handled", {})),
                current=ServedBundle.from_json(data["current"]) if data.get("current") else None,
                previous=(
                    ServedBundle.from_json(data["previous"]) if data.get("previous") else None
                ),
            )
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.error("%s is unreadable (%s): starting with no rollout history", path, err)
            return cls()

    def write(self, folder: Path) -> None:
        """Save atomically: a crash leaves the old file or the new one, never half of one."""
        data = {
            "handled": self.handled,
            "current": self.current.to_json() if self.current else None,
            "previous": self.previous.to_json() if self.previous else None,
        }
        write_atomically(folder / STATE_NAME, json.dumps(data, indent=2).encode())


def load_startup_bundle(config: ServiceConfig, trust: BundleTrust) -> Bundle:
    """The bundle to serve at start: on a fleet bin, the one its last rollout swapped in (kept
    in ``bundles_dir``), else the configured one.

    Raises:
        BundleError: the configured bundle cannot be served.
    """
    fleet = config.fleet
    if fleet is not None:
        current = FleetState.read(fleet.bundles_dir).current
        if current is not None and current.path.resolve().is_relative_to(
            fleet.bundles_dir.resolve()
        ):
            try:
                return trust.load(current.path)
            except BundleError as err:
                logger.error(
                    "the rolled-out bundle %s cannot be served (%s): serving %s",
                    current.path,
                    err,
                    config.bundle,
                )
    return trust.load(config.bundle)


def holds_rollout(folder: Path, rollout: Rollout) -> bool:
    """Whether the bundle at ``folder`` has the rollout's manifest, byte for byte (the manifest
    records the model's sha256, so the model too)."""
    try:
        digest = hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()
    except OSError:
        return False
    return digest == rollout.files[MANIFEST_NAME].sha256


@dataclass(frozen=True)
class Counts:
    """The service's counters at one moment: answers and unsure ones, calls and errors."""

    answers: float = 0.0
    unsure: float = 0.0
    calls: float = 0.0
    errors: float = 0.0

    def __sub__(self, other: Counts) -> Counts:
        return Counts(
            self.answers - other.answers,
            self.unsure - other.unsure,
            self.calls - other.calls,
            self.errors - other.errors,
        )

    @property
    def unsure_rate(self) -> float | None:
        return self.unsure / self.answers if self.answers else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.calls if self.calls else None


def read_counts(metrics: ServiceMetrics) -> Counts:
    """The answers, unsure answers, Classify/Capture calls and their errors counted so far."""
    answers = _total(metrics.classifications)
    unsure = _total(metrics.unsure)
    calls = errors = 0.0
    for family in metrics.requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels["method"] in ANSWERING_METHODS:
                calls += sample.value
                if sample.labels["code"] in ERROR_CODES:
                    errors += sample.value
    return Counts(answers, unsure, calls, errors)


def _total(counter: Any) -> float:
    return sum(
        sample.value
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


@dataclass(frozen=True)
class Verdict:
    regressed: bool
    reason: str
    new: Counts
    baseline: Counts


def judge(new: Counts, baseline: Counts, rules: RegressionConfig) -> Verdict:
    """Whether the new model regressed against the previous one on this bin.

    The unsure rates are compared once each model has ``min_answers`` answers; the error rates
    once the new model has that many calls (no calls on the old model counts as no errors).
    """
    enough = rules.min_answers
    reasons = []
    new_unsure, old_unsure = new.unsure_rate, baseline.unsure_rate
    if (
        new.answers >= enough
        and baseline.answers >= enough
        and new_unsure is not None
        and old_unsure is not None
        and new_unsure > old_unsure + rules.unsure_margin
    ):
        reasons.append(
            f"unsure rate {new_unsure:.0%} over {new.answers:.0f} answers against "
            f"{old_unsure:.0%} on the previous model (margin {rules.unsure_margin:.0%})"
        )
    new_errors = new.error_rate
    old_errors = baseline.error_rate or 0.0
    if (
        new.calls >= enough
        and new_errors is not None
        and new_errors > old_errors + rules.error_margin
    ):
        reasons.append(
            f"error rate {new_errors:.0%} over {new.calls:.0f} calls against {old_errors:.0%} "
            f"on the previous model (margin {rules.error_margin:.0%})"
        )
    return Verdict(bool(reasons), "; ".join(reasons), new, baseline)


@dataclass
class Watch:
    """A canary's watch over one rollout: the counters when it swapped, and the previous
    model's share of them."""

    rollout_id: str
    at_swap: Counts
    baseline: Counts


class FleetPoller:
    """Polls the store in a thread of its own and carries out rollouts on this bin."""

    def __init__(self, fleet: FleetConfig, slot: ModelSlot, metrics: ServiceMetrics) -> None:
        """Raises:
        ValueError: ``fleet.bundles_dir`` cannot be written.
        """
        self.fleet = fleet
        self.slot = slot
        self.metrics = metrics
        self.store = BundleStore(fleet.store_url, fleet.ca, fleet.timeout_seconds)
        self.state = FleetState.read(fleet.bundles_dir)
        self._lock = threading.Lock()  # the poll thread and the swap listener share the state
        try:
            fleet.bundles_dir.mkdir(parents=True, exist_ok=True)
            self._remember_served(ServedBundle.of(slot.current))
        except OSError as err:
            raise ValueError(
                f"fleet.bundles_dir {fleet.bundles_dir} is not a folder this service can "
                f"write ({err.strerror or err}): create it for the service's user"
            ) from err
        self._served_since = Counts()  # the counters when the served model was swapped in
        self._watch: Watch | None = None
        self._reported: tuple[str, ...] = ()
        # What the last settled report said (words and figures), repeated on later polls.
        self._settled: tuple[str, Verdict | None] = ("", None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-poll", daemon=True)
        slot.swap_listeners.append(self._on_swap)
        metrics.rollout_state.state("idle")

    def _remember_served(self, served: ServedBundle) -> None:
        """At start: the slot learns the previous bundle from the saved state."""
        saved = self.state
        if saved.current is not None and saved.current == served and saved.previous:
            self.slot.previous = saved.previous
        self.state.current = served
        self.state.previous = self.slot.previous
        self.state.write(self.fleet.bundles_dir)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception:  # the poller must outlive any one bad poll
                logger.exception("fleet poll failed")
            if self._stop.wait(self.fleet.poll_seconds):
                return

    def _on_swap(self, old: ServedBundle, new: ServedBundle) -> None:
        with self._lock:
            self.state.current, self.state.previous = new, old
            self.state.write(self.fleet.bundles_dir)
        self._served_since = read_counts(self.metrics)

    # One poll: what the store says, and what this bin does about it.

    def poll(self) -> None:
        """Fetch the rollout and take the next step in it."""
        rollout = self._fetch()
        if rollout is None:
            return
        outcome = self.state.handled.get(rollout.rollout_id)
        if self._watch is not None and self._watch.rollout_id != rollout.rollout_id:
            self._watch = None  # a newer rollout replaced the one being watched
        if outcome is None and self._serves(rollout):
            outcome = self._record(rollout, "serving")
        if outcome is not None:
            self._follow(rollout, outcome)
            return
        if rollout.halted:
            self._report(rollout, "halted", "the rollout was halted before this bin swapped")
            return
        if not rollout.is_canary(self.fleet.bin_id) and not self._may_proceed(rollout):
            return
        self._apply(rollout)

    def _fetch(self) -> Rollout | None:
        try:
            data = self.store.read(ROLLOUT_NAME)
        except StoreError as err:
            self.metrics.rollout_polls.labels("unreachable").inc()
            logger.warning("bundle store unreachable: %s", err)
            return None
        if data is None:
            self.metrics.rollout_polls.labels("ok").inc()
            return None
        try:
            rollout = Rollout.model_validate_json(data)
        except ValidationError as err:
            self.metrics.rollout_polls.labels("invalid").inc()
            logger.error("%s in the store is invalid: %s", ROLLOUT_NAME, err)
            return None
        self.metrics.rollout_polls.labels("ok").inc()
        return rollout

    def _serves(self, rollout: Rollout) -> bool:
        """Whether the bin already serves the rollout's bundle (same manifest bytes)."""
        return holds_rollout(self.slot.current.bundle.path, rollout)

    def _is_previous(self, rollout: Rollout) -> bool:
        """Whether the rollout's bundle is the one the bin served before (kept on disk)."""
        previous = self.slot.previous
        return previous is not None and holds_rollout(previous.path, rollout)

    def _record(self, rollout: Rollout, outcome: BinState) -> BinState:
        with self._lock:
            self.state.handled[rollout.rollout_id] = outcome
            self.state.write(self.fleet.bundles_dir)
        return outcome

    def _follow(self, rollout: Rollout, outcome: str) -> None:
        """A rollout this bin has handled: notice a swap back on the bin, judge a canary."""
        if outcome in ("serving", "watching") and not self._serves(rollout):
            self._watch = None
            self._record(rollout, "rolled_back")
            self._report(
                rollout, "rolled_back", "swapped back on the bin (RollbackModel or ReloadModel)"
            )
            return
        if outcome == "watching":
            self._judge(rollout)
            return
        if outcome in SETTLED_STATES:
            self._report(rollout, cast(BinState, outcome), *self._settled)

    def _may_proceed(self, rollout: Rollout) -> bool:
        """A bin that is not a canary: whether the soak is over and the canaries are well."""
        if time.time() < rollout.soak_ends_at:
            until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rollout.soak_ends_at))
            self._report(rollout, "waiting", f"the canaries soak until {until}")
            return False
        if not rollout.canary:
            return True
        states = {name: self._canary_state(rollout, name) for name in rollout.canary}
        failed = [name for name, state in states.items() if state in ("rolled_back", "refused")]
        if failed:
            self._report(rollout, "held", f"canary {', '.join(failed)} rolled back or refused")
            return False
        if not any(state in ("serving", "watching") for state in states.values()):
            self._report(rollout, "held", "no canary has reported serving the bundle yet")
            return False
        return True

    def _canary_state(self, rollout: Rollout, name: str) -> str:
        try:
            data = self.store.read(f"{STATUS_FOLDER}/{name}.json")
            status = BinStatus.model_validate_json(data) if data else None
        except (StoreError, ValidationError) as err:
            logger.warning("status of canary %s unreadable: %s", name, err)
            return "unknown"
        if status is None or status.rollout_id != rollout.rollout_id:
            return "unknown"
        return status.state

    def _apply(self, rollout: Rollout) -> None:
        """Download, check and serve the rollout's bundle; a canary starts watching."""
        old_since = self._served_since  # the old model's start, moved on by the swap
        try:
            if self._is_previous(rollout):  # a fleet rollback: no download
                self.slot.rollback("fleet")
            else:
                self.slot.reload(self._download(rollout))
        except StoreError as err:
            self.metrics.rollout_downloads.labels("failed").inc()
            logger.warning("rollout %s: download failed, trying again: %s", rollout.rollout_id, err)
            return
        except (RolloutRefused, ReloadError) as err:
            self._record(rollout, "refused")
            self._report(rollout, "refused", str(err))
            logger.error("rollout %s refused: %s", rollout.rollout_id, err)
            return
        self._prune()
        if rollout.is_canary(self.fleet.bin_id) and time.time() < rollout.soak_ends_at:
            at_swap = self._served_since
            self._watch = Watch(rollout.rollout_id, at_swap, at_swap - old_since)
            self._record(rollout, "watching")
            self._report(rollout, "watching", "canary: comparing answers with the previous model")
        else:
            self._record(rollout, "serving")
            self._report(rollout, "serving", "")

    def _download(self, rollout: Rollout) -> Path:
        """The rollout's files in ``bundles_dir/<rollout_id>``, each checked.

        Raises:
            RolloutRefused: a file's size or sha256 differs from the rollout's.
            StoreError: the store failed; the next poll tries again.
        """
        root = self.fleet.bundles_dir
        incoming = root / f"{INCOMING_PREFIX}{rollout.rollout_id}"
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir()
        try:
            for name, expected in rollout.files.items():
                key = rollout.bundle_prefix + name
                try:
                    digest = self.store.download(key, incoming / name, expected.bytes)
                except ObjectTooLarge as err:
                    self.metrics.rollout_downloads.labels("corrupt").inc()
                    raise RolloutRefused(f"{err}: the upload was replaced; publish again") from err
                if digest != expected.sha256:
                    self.metrics.rollout_downloads.labels("corrupt").inc()
                    raise RolloutRefused(
                        f"{name} downloaded with sha256 {digest[:12]}, but the rollout lists "
                        f"{expected.sha256[:12]}: the upload is corrupt or was replaced; "
                        "publish the bundle again"
                    )
            target = root / rollout.rollout_id
            shutil.rmtree(target, ignore_errors=True)
            os.replace(incoming, target)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        self.metrics.rollout_downloads.labels("verified").inc()
        return target

    def _prune(self) -> None:
        """Keep the newest ``keep_bundles`` downloaded bundles, and always the served and the
        previous one; remove downloads a stop cut short."""
        root = self.fleet.bundles_dir
        for stale in root.glob(f"{INCOMING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        keep = {b.path.resolve() for b in (self.state.current, self.state.previous) if b}
        folders = sorted(
            (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for folder in folders[self.fleet.keep_bundles :]:
            if folder.resolve() not in keep:
                shutil.rmtree(folder, ignore_errors=True)
                logger.info("removed old bundle %s", folder)

    def _judge(self, rollout: Rollout) -> None:
        """A canary during its soak: roll back on a regression, serve on when the soak ends."""
        watch = self._watch
        if watch is None:  # a restart during the soak: watch from now on
            now = read_counts(self.metrics)
            watch = self._watch = Watch(rollout.rollout_id, now, Counts())
        verdict = judge(
            read_counts(self.metrics) - watch.at_swap, watch.baseline, self.fleet.regression
        )
        if verdict.regressed:
            self._roll_back(rollout, verdict)
            return
        if time.time() >= rollout.soak_ends_at:
            self._watch = None
            self._record(rollout, "serving")
            self._report(rollout, "serving", "canary: the soak passed", verdict)
            return
        self._report(
            rollout, "watching", "canary: comparing answers with the previous model", verdict
        )

    def _roll_back(self, rollout: Rollout, verdict: Verdict) -> None:
        self._watch = None
        try:
            self.slot.rollback("regression")
        except ReloadError as err:
            logger.error(
                "rollout %s regressed (%s) but cannot roll back: %s",
                rollout.rollout_id,
                verdict.reason,
                err,
            )
            self._report(rollout, "watching", f"regressed, and the rollback failed: {err}", verdict)
            return
        reason = f"rolled back: {verdict.reason}"
        logger.warning("rollout %s: %s", rollout.rollout_id, reason)
        self._record(rollout, "rolled_back")
        self._report(rollout, "rolled_back", reason, verdict)

    def _report(
        self, rollout: Rollout, state: BinState, reason: str, verdict: Verdict | None = None
    ) -> None:
        """Say where the bin stands: the metric, and the store when the rollout gives an
        upload address for this bin (only when something changed)."""
        self.metrics.rollout_state.state(state)
        if state in SETTLED_STATES:
            self._settled = (reason, verdict)
        status = BinStatus(
            bin=self.fleet.bin_id,
            rollout_id=rollout.rollout_id,
            state=state,
            version=self.slot.current.bundle.version,
            previous_version=self.slot.previous_version,
            reason=reason,
            answers=int(verdict.new.answers) if verdict else 0,
            unsure_rate=verdict.new.unsure_rate if verdict else None,
            baseline_unsure_rate=verdict.baseline.unsure_rate if verdict else None,
            error_rate=verdict.new.error_rate if verdict else None,
            baseline_error_rate=verdict.baseline.error_rate if verdict else None,
        )
        seen = (rollout.rollout_id, state, status.version, reason, str(status.answers))
        url = rollout.status_urls.get(self.fleet.bin_id)
        if seen == self._reported or url is None:
            return
        try:
            self.store.put(url, status.model_dump_json().encode())
        except StoreError as err:
            logger.warning("cannot report to the store: %s", err)
            return
        self._reported = seen
