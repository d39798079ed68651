"""The floor of ``smartbin-bench-peers``: the bare pipeline in a process of its own.

Decode + preprocess + invoke (the contract's ``prepare`` and ``TFLiteClassifier``, one
interpreter on all cores, as ``smartbin-serve`` runs by default), called back to back by the
peers' own load loop at each concurrency, with no transport at all. Its own process, so that its
resident memory is the model's and Python's alone. Prints its figures as JSON on stdout.

    python -m smartbin_tools.peers.bare --bundle DIR --photo FILE --concurrency 1 4 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import psutil

from smartbin.bundle import load_bundle
from smartbin_tools.loop import CallLoad
from smartbin_tools.peers.engines import TFLiteEngine
from smartbin_tools.stats import stats_ms

WARM_CALLS = 3


class PipelineLoad(CallLoad):
    """Threads classifying one photo in this process."""

    def __init__(self, engine: TFLiteEngine, photo: bytes, concurrency: int) -> None:
        super().__init__(concurrency)
        self.engine = engine
        self.photo = photo

    def call(self, index: int) -> None:
        self.engine.classify(self.photo)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def run(
    bundle_dir: Path, photo: bytes, levels: list[int], seconds: float, ask: list[Path]
) -> dict[str, Any]:
    process = psutil.Process()
    started = time.perf_counter()
    engine = TFLiteEngine(load_bundle(bundle_dir))
    load_seconds = time.perf_counter() - started
    answers = {path.name: engine.classify(path.read_bytes())[0].label for path in ask}
    top = engine.classify(photo)[0].label
    for _ in range(WARM_CALLS - 1):
        engine.classify(photo)
    rss_loaded = process.memory_info().rss
    results: dict[str, Any] = {}
    for level in levels:
        load = PipelineLoad(engine, photo, level)
        load.start(seconds)
        cpu = cpu_seconds(process)
        elapsed = load.join()
        cpu = cpu_seconds(process) - cpu
        ok = [call.seconds for call in load.calls if call.code == "OK"]
        results[str(level)] = {
            **stats_ms(ok),
            "calls_per_second": len(ok) / elapsed,
            "errors": len(load.calls) - len(ok),
            "cpu_ms_per_call": cpu * 1000 / max(len(ok), 1),
        }
    return {
        "start_seconds": load_seconds,
        "top_label": top,
        "answers": answers,
        "serves": engine.classifier.model.quantization,
        "rss_loaded_mb": rss_loaded / 2**20,
        "rss_after_mb": process.memory_info().rss / 2**20,
        "levels": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--photo", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--ask", type=Path, nargs="*", default=[], help="photos to answer")
    args = parser.parse_args(argv)
    result = run(args.bundle, args.photo.read_bytes(), args.concurrency, args.seconds, args.ask)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
