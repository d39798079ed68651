"""The floor of ``smartbin-bench-peers``: the bare pipeline in a process of its own.

Decode + preprocess + invoke (the contract's ``prepare`` and ``TFLiteClassifier``, one
interpreter on all cores, as ``smartbin-serve`` runs by default), called back to back by the
tools' load loop with no transport at all. A process of its own, without gRPC loaded, so that its
resident memory is the model's and Python's alone.

It loads the bundle, writes ``ready`` on stdout, then answers one JSON line per command line on
stdin: ``{"ask": PATH}`` -> the photo's top label; ``{"load": CONCURRENCY, "seconds": S}`` ->
the latencies of S seconds of calls on the benchmark photo, and the process's CPU seconds for
them; ``{"rss": true}`` -> resident bytes. End of input ends it.

    python -m smartbin_tools.peers.bare --bundle DIR --photo FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import psutil

from smartbin.bundle import load_bundle
from smartbin_tools.loop import CallLoad
from smartbin_tools.peers.engines import TFLiteEngine


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


def answer(command: dict[str, Any], engine: TFLiteEngine, photo: bytes) -> dict[str, Any]:
    process = psutil.Process()
    if "ask" in command:
        return {"label": engine.classify(Path(command["ask"]).read_bytes())[0].label}
    if "load" in command:
        load = PipelineLoad(engine, photo, int(command["load"]))
        load.start(float(command["seconds"]))
        cpu = cpu_seconds(process)
        elapsed = load.join()
        return {
            "seconds": [call.seconds for call in load.calls if call.code == "OK"],
            "errors": sum(call.code != "OK" for call in load.calls),
            "elapsed": elapsed,
            "cpu": cpu_seconds(process) - cpu,
        }
    if "rss" in command:
        return {"rss": process.memory_info().rss}
    raise ValueError(f"unknown command {command}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--photo", type=Path, required=True)
    args = parser.parse_args(argv)
    engine = TFLiteEngine(load_bundle(args.bundle))
    photo = args.photo.read_bytes()
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(answer(json.loads(line), engine, photo)), flush=True)


if __name__ == "__main__":
    main()
