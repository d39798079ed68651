"""The service's log: one line per event, and a repeated message once per minute, not per call.

A caller that repeats a failing call, a camera that stays unplugged, or a bug that fails every
call (gRPC logs each with its traceback) would otherwise write the same lines over and over, and
hide what else happens. :class:`RepeatFilter` lets the first of identical records through
(traceback and all) and drops the ones that follow within ``window`` seconds; the first one
after that says how many were dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

REPEAT_WINDOW_SECONDS = 60.0
# Distinct messages remembered; the least recently seen is forgotten first.
REMEMBERED = 512


class RepeatFilter(logging.Filter):
    """Drops records identical (logger, level, message, exception) to one let through within
    the last ``window`` seconds; counts them and names the count on the next one let through."""

    def __init__(self, window: float = REPEAT_WINDOW_SECONDS) -> None:
        super().__init__()
        self.window = window
        self._seen: OrderedDict[tuple[str, int, str, str], tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage(), _exception_text(record))
        now = time.monotonic()
        with self._lock:
            shown_at, dropped = self._seen.get(key, (float("-inf"), 0))
            if now - shown_at < self.window:
                self._seen[key] = (shown_at, dropped + 1)
                self._seen.move_to_end(key)
                return False
            self._seen[key] = (now, 0)
            self._seen.move_to_end(key)
            while len(self._seen) > REMEMBERED:
                self._seen.popitem(last=False)
        if dropped:
            record.msg = f"{record.msg} [{dropped} more like this in the last {self.window:.0f} s]"
        return True


def _exception_text(record: logging.LogRecord) -> str:
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        return f"{type(error).__name__}: {error}"
    return ""


def rate_limit_repeats(logger: logging.Logger | None = None) -> RepeatFilter:
    """Put one :class:`RepeatFilter` on every handler of ``logger`` (the root logger), which
    sees what every module logs, gRPC's included."""
    repeat = RepeatFilter()
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(repeat)
    return repeat
