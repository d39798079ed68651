"""Memory for photos: one decode budget the whole service shares, and freed memory handed back.

A photo's decoded size has little to do with its file size: an 8-bit RGBA PNG of 6324 x 6324
compresses to 155 kB and, decoded and flattened to RGB, takes 306 MB. So before any pixel is
decoded, :func:`smartbin.preprocessing.decode_image` works out from the header what the decode
will hold at its peak (:class:`~smartbin.preprocessing.DecodeCost`), and the call reserves that
much from a :class:`DecodeBudget` of ``decode_budget_bytes`` shared by every call:

- an image that alone needs more than the whole budget is refused at once with
  :class:`TooLargeForBudget` (INVALID_ARGUMENT: it would never fit, so retrying cannot help);
- one that fits, but not beside the decodes already running, waits up to
  ``decode_wait_seconds`` (and its deadline) for memory to come free, then is refused with
  :class:`BudgetBusy` (RESOURCE_EXHAUSTED: the bin is busy, a later retry may succeed).

Waiters are not queued in order: whichever fits when memory comes free goes first, so camera-sized
photos keep flowing while a huge one waits, and under a flood of huge ones those are refused.

Once decoded, a call keeps only its RGB image reserved until it ends. glibc keeps freed memory
for reuse unless told otherwise; :func:`tune_malloc` makes large buffers go back to the system
as soon as they are freed, and :func:`trim` returns what the heaps kept after a large decode.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from types import TracebackType

from smartbin.preprocessing import DecodeCost

MB = 1_000_000
# glibc's mallopt parameter number for the size above which malloc maps memory of its own
# (malloc.h), handed back to the system on free.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
# Copies of its request message a call is counted for: the parsed request and the image field
# it reads, and gRPC's own as messages arrive (2.4 to 2.6 were measured at the peak).
MESSAGE_COPIES = 3
# When the budget empties after at least this much was given back, glibc is asked to return
# what its heaps kept (malloc_trim).
TRIM_AFTER_BYTES = 16 * 2**20


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD_BYTES) -> None:
    """Allocate buffers of ``mmap_threshold`` bytes and more with mmap, so that freeing them
    returns them to the system at once.

    glibc raises its threshold (up to 32 MB) each time such a buffer is freed, after which a
    decoded photo's 16 MB blocks come from the heap and stay resident after the call: one
    40-megapixel PNG left the service 110 MB larger for good. A fixed threshold keeps the
    service at its baseline between large photos; a camera-sized photo stays below it. Elsewhere
    (musl, macOS) there is nothing to do.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, mmap_threshold)


def trim() -> None:
    """Return the free memory glibc's heaps hold to the system (nothing elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def megabytes(n: int) -> str:
    return f"{n / MB:.0f} MB" if n >= 10 * MB else f"{n / MB:.1f} MB"


class BudgetRefused(Exception):
    """The photo cannot be decoded within the decode budget; the message says why."""


class TooLargeForBudget(BudgetRefused):
    """Decoding this photo alone needs more than the whole budget."""


class BudgetBusy(BudgetRefused):
    """The photo fits the budget, but no memory came free for it in time."""


class DecodeBudget:
    """``capacity`` bytes for the photos the service holds: the request messages of the calls
    being served, and the decodes.

    A request message is in memory once it has arrived: :meth:`hold_request` only counts it,
    and says no (the call is then refused) when the messages held would pass the capacity. A
    decode reserves its peak before it starts: it waits for the messages and decodes held to
    leave room for it, or for no other decode to be running, so that one decode always makes
    progress. Memory for photos so stays within the capacity, or, when messages fill it, the
    messages and one decode.

    Args:
        capacity: bytes for request messages and decodes together.
        wait_seconds: longest wait for room to decode, unless a call's deadline is sooner.
    """

    def __init__(self, capacity: int, wait_seconds: float) -> None:
        self.capacity = capacity
        self.wait_seconds = wait_seconds
        self._used = 0
        self._requests = 0  # of _used: request messages
        self._decodes = 0  # decodes holding a reservation
        self._released = 0  # bytes given back since memory was last returned to the system
        self._changed = threading.Condition()

    @property
    def used(self) -> int:
        return self._used

    @property
    def requests_held(self) -> int:
        return self._requests

    def hold_request(self, message_bytes: int) -> int | None:
        """Count a request message that has arrived, ``MESSAGE_COPIES`` times. Returns the
        bytes counted, to hand to :meth:`release_request`; None when the messages held would
        pass the capacity."""
        held = MESSAGE_COPIES * message_bytes
        with self._changed:
            if self._requests + held > self.capacity:
                return None
            self._requests += held
            self._used += held
        return held

    def release_request(self, held: int) -> None:
        with self._changed:
            self._requests -= held
        self._give_back(held)

    def lease(self, time_left: float | None = None, message_bytes: int = 0) -> Lease:
        """A reservation, empty until :meth:`Lease.admit`; released when the block ends.

        Args:
            time_left: the call's remaining deadline, which caps the wait.
            message_bytes: the size of the call's own request message (held already): a decode
                that does not fit beside it is refused as too large.
        """
        wait = self.wait_seconds if time_left is None else min(self.wait_seconds, time_left)
        return Lease(self, max(wait, 0.0), MESSAGE_COPIES * message_bytes)

    def _take(self, cost: DecodeCost, own_request: int, wait: float) -> int:
        """Reserve what decoding takes; returns the bytes reserved."""
        need = cost.peak_bytes
        if need + own_request > self.capacity:
            raise TooLargeForBudget(
                f"decoding {cost.describe()} takes about {megabytes(need + own_request)} of "
                f"memory, more than this bin's whole decode budget of {megabytes(self.capacity)} "
                "(decode_budget_bytes): send a smaller image, or a JPEG, which decodes reduced"
            )
        deadline = time.monotonic() + wait
        with self._changed:
            while self._decodes and self._used + need > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BudgetBusy(
                        f"decoding {cost.describe()} takes about {megabytes(need)}, and "
                        f"{megabytes(self._used)} of this bin's {megabytes(self.capacity)} "
                        f"decode budget stayed taken by other photos for {wait:.1f} s: "
                        "retry later, or send a smaller image"
                    )
                self._changed.wait(left)
            self._used += need
            self._decodes += 1
        return need

    def _give_back(self, n: int, decode_ended: bool = False) -> None:
        with self._changed:
            self._used -= n
            self._decodes -= decode_ended
            self._released += n
            # Once a burst of large photos is over, hand what the heaps kept back (once).
            idle_after_burst = self._used == 0 and self._released >= TRIM_AFTER_BYTES
            if idle_after_burst:
                self._released = 0
            self._changed.notify_all()
        if idle_after_burst:
            trim()


class Lease:
    """One call's decode in a :class:`DecodeBudget`; use it as a context manager and pass
    :meth:`admit` to ``decode_image``."""

    def __init__(self, budget: DecodeBudget, wait: float, own_request: int = 0) -> None:
        self.budget = budget
        self.wait = wait
        self.own_request = own_request
        self.held = 0
        self._cost: DecodeCost | None = None

    def admit(self, cost: DecodeCost) -> None:
        """Reserve ``cost.peak_bytes``, waiting up to the lease's wait.

        Raises:
            TooLargeForBudget: more than the whole budget.
            BudgetBusy: no room came free in time.
        """
        self.held = self.budget._take(cost, self.own_request, self.wait)
        self._cost = cost

    def settle(self) -> None:
        """The photo is decoded: keep only its RGB image reserved."""
        if self._cost is not None and self.held > self._cost.result_bytes:
            self.budget._give_back(self.held - self._cost.result_bytes)
            self.held = self._cost.result_bytes

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._cost is None:
            return
        self.budget._give_back(self.held, decode_ended=True)
        self.held = 0
