"""``smartbin-bench-peers``: the service against what a user would run instead, in one run.

Same model, same photo, same load loop and concurrency for every peer:

- the bare pipeline (decode + preprocess + invoke, no transport) in a process of its own, with
  the service's malloc settings: the floor every figure is divided by;
- ``smartbin-serve`` with one interpreter, and with one per core (config ``interpreters``);
- ``smartbin-serve`` on the bundle with its float32 model added as an alternative: it times both
  as it starts and serves the faster (so its start time includes that timing);
- a REST service, FastAPI under uvicorn, the JPEG POSTed to it, classified with the contract's
  preprocessing and the same int8 TFLite model;
- the same REST service running the float32 model in ONNX Runtime (the .tflite translated to
  ONNX, same weights: smartbin_tools.peers.onnx_export).

Each runs as a child process, started, warmed with three calls, then loaded at each concurrency
for ``--seconds``; figures are p50/p95/p99, calls/s, CPU time per call (server and client
together) and resident memory, each also as a ratio to the bare pipeline. ``--rounds`` above 1
runs the peers again in reverse order and keeps each figure's median. Needs the tools' extra:
``pip install -e './tools[peers]'``. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from smartbin.bundle import BundleError, add_alternative, load_bundle, sha256_file
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc
from smartbin_tools.bench import CLASSIFY_SIZE, cores, machine, sample_jpeg
from smartbin_tools.load import ClassifyLoad
from smartbin_tools.loop import CallLoad
from smartbin_tools.paths import DEFAULT_BUNDLE_DIR, DEFAULT_FLOAT_TWIN, REPOSITORY, SAMPLES_DIR
from smartbin_tools.service import serve_args, spawn_child, spawn_service
from smartbin_tools.stats import stats_ms

WARM_CALLS = 3
READY_LINE = re.compile(r"serving on port (\d+)")
FIGURES = ("p50_ms", "p95_ms", "p99_ms", "calls_per_second", "cpu_ms_per_call")


def peers_installed() -> str | None:
    """None when the peers' packages import; else what is missing, as an install hint."""
    missing = []
    for module in ("fastapi", "uvicorn", "onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        return f"{', '.join(missing)} missing: pip install -e './tools[peers]'"
    return None


# --- the clients ----------------------------------------------------------------------------


class HttpStatusError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class HttpLoad(CallLoad):
    """Threads POSTing the photo to a REST peer's /classify, each over its own kept-alive
    connection, reading the JSON answer."""

    failures = (OSError, http.client.HTTPException, HttpStatusError)

    def __init__(self, port: int, photo: bytes, concurrency: int, timeout: float = 30.0) -> None:
        super().__init__(concurrency)
        self.port, self.photo, self.timeout = port, photo, timeout
        self._local = threading.local()

    def call(self, index: int) -> None:
        post(self.port, self.photo, self._local, self.timeout)

    def code(self, error: BaseException) -> str:
        return (
            f"HTTP {error.status}" if isinstance(error, HttpStatusError) else type(error).__name__
        )


def post(port: int, photo: bytes, local: threading.local, timeout: float = 30.0) -> Any:
    """POST ``photo`` to /classify on ``local``'s connection (made on first use); the answer."""
    connection = getattr(local, "connection", None)
    if connection is None:
        connection = local.connection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=timeout
        )
    try:
        connection.request("POST", "/classify", photo, {"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        connection.close()
        local.connection = None
        raise
    if response.status != 200:
        raise HttpStatusError(response.status)
    return json.loads(body)


# --- the peers ------------------------------------------------------------------------------


@dataclass
class Running:
    """A started peer: its process, how to load it and how to ask it once."""

    process: psutil.Process
    start_seconds: float
    make_load: Callable[[int], CallLoad]
    ask: Callable[[bytes], str]  # the top label for a photo
    serves: Callable[[], str]


@dataclass(frozen=True)
class Peer:
    key: str
    name: str
    start: Callable[[], Any]  # a context manager yielding Running


@contextmanager
def grpc_peer(bundle: Path, photo: bytes, config: Path | None) -> Iterator[Running]:
    with (
        spawn_service(serve_args(bundle, config)) as service,
        grpc.insecure_channel(service.target) as channel,
    ):
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        request = classifier_pb2.ClassifyRequest(image=photo)
        yield Running(
            service.psutil_process,
            service.start_seconds,
            lambda level: ClassifyLoad(stub, [request], level),
            lambda image: (
                stub.Classify(classifier_pb2.ClassifyRequest(image=image), timeout=30)
                .predictions[0]
                .label
            ),
            lambda: (
                stub.GetModelInfo(classifier_pb2.GetModelInfoRequest(), timeout=10).quantization
            ),
        )


@contextmanager
def rest_peer(bundle: Path, photo: bytes, engine: str, onnx: Path | None) -> Iterator[Running]:
    command = [sys.executable, "-m", "smartbin_tools.peers.rest", "--bundle", str(bundle)]
    command += ["--engine", engine, *(["--onnx", str(onnx)] if onnx else [])]
    child = spawn_child(command, READY_LINE, f"REST peer ({engine})", cwd=REPOSITORY)
    port = int(child.match.group(1))
    local = threading.local()
    try:
        yield Running(
            psutil.Process(child.process.pid),
            child.start_seconds,
            lambda level: HttpLoad(port, photo, level),
            lambda image: post(port, image, local)["predictions"][0]["label"],
            lambda: "int8" if engine == "tflite" else "float32",
        )
    finally:
        connection = getattr(local, "connection", None)
        if connection is not None:
            connection.close()
        child.process.terminate()
        try:
            child.process.wait(30)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def measure(running: Running, photo: bytes, levels: list[int], seconds: float) -> dict[str, Any]:
    """The sample photos' answers, warm-up, resident memory, then each concurrency for
    ``seconds``."""
    answers = {path.name: running.ask(path.read_bytes()) for path in sample_photos()}
    top = running.ask(photo)
    for _ in range(WARM_CALLS - 1):
        running.ask(photo)
    rss_loaded = running.process.memory_info().rss
    client = psutil.Process()
    results: dict[str, Any] = {}
    for level in levels:
        load = running.make_load(level)
        load.start(seconds)
        server_cpu, client_cpu = cpu_seconds(running.process), cpu_seconds(client)
        elapsed = load.join()
        server_cpu = cpu_seconds(running.process) - server_cpu
        client_cpu = cpu_seconds(client) - client_cpu
        ok = [call.seconds for call in load.calls if call.code == "OK"]
        if not ok:
            codes = sorted({call.code for call in load.calls})
            raise RuntimeError(f"no call succeeded at concurrency {level}: {codes}")
        results[str(level)] = {
            **stats_ms(ok),
            "calls_per_second": len(ok) / elapsed,
            "errors": len(load.calls) - len(ok),
            "server_cpu_ms_per_call": server_cpu * 1000 / len(ok),
            "client_cpu_ms_per_call": client_cpu * 1000 / len(ok),
            "cpu_ms_per_call": (server_cpu + client_cpu) * 1000 / len(ok),
        }
    return {
        "start_seconds": running.start_seconds,
        "top_label": top,
        "answers": answers,
        "serves": running.serves(),
        "rss_loaded_mb": rss_loaded / 2**20,
        "rss_after_mb": running.process.memory_info().rss / 2**20,
        "levels": results,
    }


def measure_bare(bundle: Path, photo_file: Path, levels: list[int], seconds: float) -> Any:
    command = [sys.executable, "-m", "smartbin_tools.peers.bare", "--bundle", str(bundle)]
    command += ["--photo", str(photo_file), "--seconds", str(seconds), "--concurrency"]
    command += [str(level) for level in levels]
    command += ["--ask", *(str(path) for path in sample_photos())]
    # The service's own malloc settings (two arenas, large buffers mapped: edge_service.memory),
    # so that the floor's memory is the pipeline's and not glibc's defaults'.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=REPOSITORY, check=False, env=env
    )
    if done.returncode:
        raise RuntimeError(f"the bare pipeline failed:\n{done.stderr}")
    return json.loads(done.stdout)


# --- the run --------------------------------------------------------------------------------


def with_alternative(bundle: Path, float_model: Path, folder: Path) -> Path:
    """A copy of ``bundle`` carrying ``float_model`` as its float32 alternative."""
    target = folder / "with-float32"
    shutil.copytree(bundle, target)
    float_metrics = load_bundle(bundle).manifest.metrics.get("float", {})
    add_alternative(target, float_model.read_bytes(), "float32", float_metrics)
    return target


def peers(args: argparse.Namespace, work: Path, photo: bytes, onnx: Path) -> list[Peer]:
    photo_file = work / "photo.jpg"
    photo_file.write_bytes(photo)
    one, many = work / "one.yaml", work / "many.yaml"
    one.write_text("interpreters: 1\n")
    many.write_text(f"interpreters: {args.interpreters}\n")
    both = with_alternative(args.bundle, args.float_model, work)
    levels, seconds = args.concurrency, args.seconds

    @contextmanager
    def bare() -> Iterator[dict[str, Any]]:
        yield measure_bare(args.bundle, photo_file, levels, seconds)

    return [
        Peer("bare", "bare pipeline, int8 (the floor)", bare),
        Peer(
            "serve-1", "smartbin-serve, 1 interpreter", lambda: grpc_peer(args.bundle, photo, one)
        ),
        Peer(
            f"serve-{args.interpreters}",
            f"smartbin-serve, {args.interpreters} interpreters",
            lambda: grpc_peer(args.bundle, photo, many),
        ),
        Peer(
            "serve-fastest",
            "smartbin-serve, int8 + float32 bundle",
            lambda: grpc_peer(both, photo, one),
        ),
        Peer(
            "rest-tflite",
            "FastAPI + uvicorn, TFLite int8",
            lambda: rest_peer(args.bundle, photo, "tflite", None),
        ),
        Peer(
            "rest-onnxruntime",
            "FastAPI + uvicorn, ONNX Runtime float32",
            lambda: rest_peer(args.bundle, photo, "onnxruntime", onnx),
        ),
    ]


def run_peer(peer: Peer, photo: bytes, levels: list[int], seconds: float) -> dict[str, Any]:
    with peer.start() as started:
        if isinstance(started, dict):  # the bare pipeline measures itself
            return started
        return measure(started, photo, levels, seconds)


def sample_photos() -> list[Path]:
    """The service's sample photos, one per category, each named after it."""
    return sorted(SAMPLES_DIR.glob("*.jpg"))


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the rounds (the first round's for the rest)."""
    merged = json.loads(json.dumps(rounds[0]))
    for key in ("start_seconds", "rss_loaded_mb", "rss_after_mb"):
        merged[key] = float(np.median([r[key] for r in rounds]))
    for level, figures in merged["levels"].items():
        for key in figures:
            values = [r["levels"][level][key] for r in rounds]
            if all(isinstance(v, (int, float)) for v in values):
                figures[key] = float(np.median(values))
    return merged


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Every peer's figures over the bare pipeline's, at the same concurrency."""
    floor = results["bare"]
    out: dict[str, Any] = {}
    for key, result in results.items():
        out[key] = {
            "rss": result["rss_after_mb"] / floor["rss_after_mb"],
            "levels": {
                level: {f: figures[f] / floor["levels"][level][f] for f in FIGURES}
                for level, figures in result["levels"].items()
            },
        }
    return out


def run(args: argparse.Namespace, progress: Callable[[str], None] = print) -> dict[str, Any]:
    bundle = load_bundle(args.bundle)
    onnx_path = args.onnx_cache / f"{sha256_file(args.float_model)[:16]}.onnx"
    progress(f"ONNX model: {onnx_path}")
    from smartbin_tools.peers.onnx_export import export

    export(args.float_model, onnx_path)
    photo = sample_jpeg(*CLASSIFY_SIZE)
    result: dict[str, Any] = {
        "machine": machine(),
        "model": {
            "version": bundle.version,
            "architecture": bundle.architecture,
            "input_size": bundle.preprocessing.input_size,
            "int8": str(bundle.model_path),
            "float32": str(args.float_model),
            "onnx": str(onnx_path),
        },
        "settings": {
            "seconds_per_level": args.seconds,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "interpreters": args.interpreters,
            "photo": "x".join(map(str, CLASSIFY_SIZE)),
        },
    }
    with tempfile.TemporaryDirectory(prefix="smartbin-peers-") as work:
        listed = peers(args, Path(work), photo, onnx_path)
        if args.only:
            listed = [p for p in listed if p.key == "bare" or p.key in args.only]
        rounds: dict[str, list[dict[str, Any]]] = {p.key: [] for p in listed}
        for number in range(args.rounds):
            for peer in listed if number % 2 == 0 else listed[::-1]:
                progress(f"round {number + 1}/{args.rounds}: {peer.name}...")
                rounds[peer.key].append(run_peer(peer, photo, args.concurrency, args.seconds))
    result["names"] = {p.key: p.name for p in listed}
    result["rounds"] = rounds
    result["peers"] = {key: median_of(r) for key, r in rounds.items()}
    result["ratios"] = ratios(result["peers"])
    result["machine"]["load_average_end"] = os.getloadavg()
    return result


def format_table(result: dict[str, Any]) -> str:
    m, model = result["machine"], result["model"]
    load = ", ".join(f"{v:.1f}" for v in m["load_average_start"])
    load_end = ", ".join(f"{v:.1f}" for v in m["load_average_end"])
    s = result["settings"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['arch']}, vector extensions "
        f"{' '.join(m.get('cpu_flags', [])) or 'none found'}; load average {load} at the start, "
        f"{load_end} at the end",
        f"model: {model['architecture']} {model['input_size']} px, {model['version']}; photo "
        f"{s['photo']} JPEG; {s['seconds_per_level']:g} s per level, {s['rounds']} round(s)",
        "",
        f"{'peer':<42}{'conc':>5}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'calls/s':>9}"
        f"{'CPU ms':>8}{'RSS MB':>8}{'start s':>8}  serves",
    ]
    names = result["names"]
    for key, peer in result["peers"].items():
        for i, (level, f) in enumerate(peer["levels"].items()):
            tail = (
                f"{peer['rss_after_mb']:8.1f}{peer['start_seconds']:8.2f}  {peer['serves']}"
                if i == 0
                else ""
            )
            lines.append(
                f"{names[key] if i == 0 else '':<42}{level:>5}{f['p50_ms']:9.2f}{f['p95_ms']:9.2f}"
                f"{f['p99_ms']:9.2f}{f['calls_per_second']:9.1f}{f['cpu_ms_per_call']:8.2f}" + tail
            )
    lines += [
        "CPU ms: CPU time per call, server and client together (the bare pipeline: its own "
        "process); RSS: after the load; start: to ready (model loaded, port open)",
        "",
        "as ratios to the bare pipeline at the same concurrency:",
        f"{'peer':<42}{'conc':>5}{'p50':>7}{'p95':>7}{'p99':>7}{'calls/s':>9}{'CPU':>7}{'RSS':>7}",
    ]
    for key, r in result["ratios"].items():
        for i, (level, f) in enumerate(r["levels"].items()):
            lines.append(
                f"{names[key] if i == 0 else '':<42}{level:>5}{f['p50_ms']:7.2f}{f['p95_ms']:7.2f}"
                f"{f['p99_ms']:7.2f}{f['calls_per_second']:9.2f}{f['cpu_ms_per_call']:7.2f}"
                + (f"{r['rss']:7.2f}" if i == 0 else "")
            )
    agree = [names[k] for k, p in result["peers"].items() if p["answers"] != reference(result)]
    lines += [
        "",
        "every peer gives each sample photo the label smartbin-serve gives it"
        if not agree
        else f"these peers answer otherwise than smartbin-serve: {', '.join(agree)}",
    ]
    return "\n".join(lines)


def reference(result: dict[str, Any]) -> dict[str, str]:
    """The sample photos' labels as smartbin-serve answers them (the first service run)."""
    first = next(key for key in result["peers"] if key.startswith("serve-"))
    answers: dict[str, str] = result["peers"][first]["answers"]
    return answers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`: "))
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE_DIR, help="int8 bundle")
    parser.add_argument(
        "--float-model",
        type=Path,
        default=DEFAULT_FLOAT_TWIN,
        help="the bundle's float32 .tflite twin (smartbin-convert --float-twin)",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=1, help="runs of all peers; medians kept")
    parser.add_argument(
        "--interpreters", type=int, default=cores(), help="the second service's interpreters"
    )
    parser.add_argument("--only", nargs="+", help="these peers' keys (and the bare pipeline)")
    parser.add_argument(
        "--onnx-cache", type=Path, default=Path("runs/peers"), help="where the ONNX model goes"
    )
    parser.add_argument("--json", type=Path, default=Path("runs/peers.json"))
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or min(args.concurrency) < 1:
        parser.error("--seconds, --rounds and --concurrency must be positive")
    if not args.float_model.is_file():
        parser.error(f"float32 model {args.float_model} not found: pass --float-model")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    missing = peers_installed()
    if missing:
        sys.exit(f"smartbin-bench-peers: {missing}")
    started = time.perf_counter()
    try:
        result = run(args, progress=lambda text: print(text, file=sys.stderr, flush=True))
    except (BundleError, ValueError, RuntimeError) as err:
        sys.exit(f"smartbin-bench-peers: {err}")
    result["seconds"] = time.perf_counter() - started
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()
