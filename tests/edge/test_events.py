"""The event hub's promises to slow watchers, and the bounds of the unsure-photo folder."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image

from edge_service.classify import Answer, Timings
from edge_service.config import UnsureImagesConfig
from edge_service.events import Event, EventHub, TooManyWatchers
from edge_service.metrics import ServiceMetrics
from edge_service.unsure_store import UnsureStore
from smartbin.model import Prediction


def event(event_id: int) -> Event:
    answer = Answer((Prediction("a", 0.9), Prediction("b", 0.1)), "v1", False, Timings())
    return Event(event_id, 0.0, "rpc", answer)


def test_a_slow_watcher_loses_its_oldest_events_and_is_told_how_many() -> None:
    metrics = ServiceMetrics()
    hub = EventHub(queue_size=3, max_watchers=2, metrics=metrics)
    with hub.subscribe() as slow, hub.subscribe() as fast:
        got_fast = []
        for i in range(1, 9):
            hub.publish(event(i))  # returns at once even though `slow` never reads
            got_fast.append(fast.get(timeout=1))
        assert [(e.event_id, missed) for e, missed in got_fast] == [(i, 0) for i in range(1, 9)]
        assert slow.get(timeout=1) == (event(6), 5)  # 1..5 were dropped for 6..8
        assert slow.get(timeout=1) == (event(7), 0)
        assert slow.get(timeout=1) == (event(8), 0)
        assert slow.get(timeout=0.01) is None
    assert metrics.events_dropped._value.get() == 5
    assert metrics.watchers._value.get() == 0


def test_closing_the_hub_wakes_watchers_and_refuses_beyond_the_limit() -> None:
    hub = EventHub(queue_size=3, max_watchers=1, metrics=ServiceMetrics())
    with hub.subscribe() as watcher:
        with pytest.raises(TooManyWatchers, match="limit is 1"), hub.subscribe():
            pass
        results = []
        reader = threading.Thread(target=lambda: results.append(watcher.get(timeout=30)))
        reader.start()
        hub.close()
        reader.join(5)
        assert results == [None] and watcher.closed
    with hub.subscribe() as late:
        assert late.closed


def photo() -> Image.Image:
    """The same picture every time, so every kept file has the same size."""
    return Image.linear_gradient("L").resize((64, 64)).convert("RGB")


def test_unsure_photos_are_bounded_by_bytes_and_count_oldest_first(tmp_path: Path) -> None:
    folder = tmp_path / "unsure"
    size = len(UnsureStore(UnsureImagesConfig(folder=folder)).keep(photo(), "x").read_bytes())
    config = UnsureImagesConfig(folder=folder, max_files=100, max_bytes=int(size * 3.5))
    store = UnsureStore(config)  # finds the photo kept above
    kept = [store.keep(photo(), label="glass/jar") for _ in range(5)]
    assert store.files == kept[-3:]
    assert store.total_bytes <= config.max_bytes
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in kept[-3:]]
    assert all(p.name.endswith("-glass_jar.jpg") for p in store.files)
    # A restart with a smaller limit trims the folder to it.
    smaller = UnsureStore(UnsureImagesConfig(folder=folder, max_files=1))
    assert smaller.files == kept[-1:]
    assert [p.name for p in folder.iterdir()] == [kept[-1].name]
