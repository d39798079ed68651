"""Classification events and the hub that fans them out to watchers.

Each watcher has its own bounded deque. Publishing never blocks: when a watcher's deque is full
its oldest event is dropped and counted, and the watcher learns how many it missed with its
next event.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from edge_service.classify import Answer
from edge_service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)


class TooManyWatchers(Exception):
    """The hub already has as many watchers as it allows."""


@dataclass(frozen=True)
class Event:
    event_id: int
    timestamp: float  # Unix time of the capture
    trigger: str  # "rpc", "gpio", "motion"
    answer: Answer


class Watcher:
    """One subscriber's queue of events."""

    def __init__(self, size: int) -> None:
        self._events: deque[Event] = deque()
        self._size = size
        self._missed = 0
        self._ready = threading.Condition()
        self.closed = False

    def put(self, event: Event) -> bool:
        """Queue the event; returns False when the oldest queued event was dropped for it."""
        with self._ready:
            dropped = len(self._events) >= self._size
            if dropped:
                self._events.popleft()
                self._missed += 1
            self._events.append(event)
            self._ready.notify()
        return not dropped

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify_all()

    def get(self, timeout: float) -> tuple[Event, int] | None:
        """The next event and how many were dropped before it, or None after ``timeout``."""
        with self._ready:
            if not self._events and not self.closed:
                self._ready.wait(timeout)
            if not self._events:
                return None
            missed, self._missed = self._missed, 0
            return self._events.popleft(), missed


class EventHub:
    """Fans each published event out to every open watcher."""

    def __init__(self, queue_size: int, max_watchers: int, metrics: ServiceMetrics) -> None:
        self._queue_size = queue_size
        self._max_watchers = max_watchers
        self._metrics = metrics
        self._watchers: set[Watcher] = set()
        self._lock = threading.Lock()
        self._closed = False

    def publish(self, event: Event) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            if not watcher.put(event):
                self._metrics.events_dropped.inc()

    @contextmanager
    def subscribe(self) -> Iterator[Watcher]:
        """A watcher that receives every event published while the context is open.

        Raises:
            TooManyWatchers: ``max_watchers`` are already open.
        """
        watcher = Watcher(self._queue_size)
        with self._lock:
            if self._closed:
                watcher.close()  # shutting down: the stream ends at once
            elif len(self._watchers) >= self._max_watchers:
                raise TooManyWatchers(
                    f"{len(self._watchers)} event streams are open, the limit is "
                    f"{self._max_watchers}: close one or raise max_watchers"
                )
            self._watchers.add(watcher)
            self._metrics.watchers.set(len(self._watchers))
        try:
            yield watcher
        finally:
            with self._lock:
                self._watchers.discard(watcher)
                self._metrics.watchers.set(len(self._watchers))

    def close(self) -> None:
        """End every watcher's stream (shutdown); later subscriptions end at once."""
        with self._lock:
            self._closed = True
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.close()
