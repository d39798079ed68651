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

Each runs as a child process. They are started one at a time (each start has the machine to
itself), asked the sample photos, warmed with three calls; then, at each concurrency, they take
turns under load, ``--turn`` seconds each, the order rotating every turn, until each has had
``--seconds``: other work on the machine then falls on every peer alike, as in smartbin-bench.
Figures are p50/p95/p99, calls/s, CPU time per call (server and client together) and resident
memory, each also as a ratio to the bare pipeline. Needs the tools' extra:
``pip install -e './tools[peers]'``. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil

from smartbin.bundle import BundleError, add_alternative, load_bundle, sha256_file
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc
from smartbin_tools.bench import CLASSIFY_SIZE, cores, machine, sample_jpeg
from smartbin_tools.load import ClassifyLoad
from smartbin_tools.loop import CallLoad
from smartbin_tools.paths import (
    REPOSITORY,
    SAMPLES_DIR,
    add_model_arguments,
    check_model_arguments,
)
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
class Block:
    """One turn of a peer under load: the latencies of the calls answered, the failed calls,
    the seconds it lasted and the CPU seconds the peer's process and this one spent."""

    seconds: list[float]
    errors: int
    elapsed: float
    server_cpu: float
    client_cpu: float = 0.0


@dataclass
class Running:
    """A started peer: a turn under load, a question, what it serves, its resident memory."""

    start_seconds: float
    block: Callable[[int, float], Block]  # (concurrency, seconds)
    ask: Callable[[bytes], str]  # the top label for a photo
    serves: Callable[[], str]
    rss: Callable[[], int]


@dataclass(frozen=True)
class Peer:
    key: str
    name: str
    start: Callable[[], Any]  # a context manager yielding Running


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def load_block(server: psutil.Process, load: CallLoad, seconds: float) -> Block:
    """``load`` for ``seconds``, with the CPU time of the server and of this process."""
    client = psutil.Process()
    load.start(seconds)
    server_cpu, client_cpu = cpu_seconds(server), cpu_seconds(client)
    elapsed = load.join()
    ok = [call.seconds for call in load.calls if call.code == "OK"]
    return Block(
        ok,
        len(load.calls) - len(ok),
        elapsed,
        cpu_seconds(server) - server_cpu,
        cpu_seconds(client) - client_cpu,
    )


@contextmanager
def grpc_peer(bundle: Path, photo: bytes, config: Path | None) -> Iterator[Running]:
    with (
        spawn_service(serve_args(bundle, config)) as service,
        grpc.insecure_channel(service.target) as channel,
    ):
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        request = classifier_pb2.ClassifyRequest(image=photo)
        process = service.psutil_process
        yield Running(
            service.start_seconds,
            lambda level, seconds: load_block(
                process, ClassifyLoad(stub, [request], level), seconds
            ),
            lambda image: (
                stub.Classify(classifier_pb2.ClassifyRequest(image=image), timeout=30)
                .predictions[0]
                .label
            ),
            lambda: (
                stub.GetModelInfo(classifier_pb2.GetModelInfoRequest(), timeout=10).quantization
            ),
            lambda: int(process.memory_info().rss),
        )


@contextmanager
def rest_peer(bundle: Path, photo: bytes, engine: str, onnx: Path | None) -> Iterator[Running]:
    command = [sys.executable, "-m", "smartbin_tools.peers.rest", "--bundle", str(bundle)]
    command += ["--engine", engine, *(["--onnx", str(onnx)] if onnx else [])]
    child = spawn_child(command, READY_LINE, f"REST peer ({engine})", cwd=REPOSITORY)
    port = int(child.match.group(1))
    process = psutil.Process(child.process.pid)
    local = threading.local()
    try:
        yield Running(
            child.start_seconds,
            lambda level, seconds: load_block(process, HttpLoad(port, photo, level), seconds),
            lambda image: post(port, image, local)["predictions"][0]["label"],
            lambda: "int8" if engine == "tflite" else "float32",
            lambda: int(process.memory_info().rss),
        )
    finally:
        connection = getattr(local, "connection", None)
        if connection is not None:
            connection.close()
        stop(child.process)


@contextmanager
def bare_peer(bundle: Path, photo_file: Path) -> Iterator[Running]:
    """The bare pipeline's process (peers.bare), driven over its stdin and stdout."""
    command = [sys.executable, "-m", "smartbin_tools.peers.bare", "--bundle", str(bundle)]
    command += ["--photo", str(photo_file)]
    # The service's own malloc settings (two arenas, large buffers mapped: edge_service.memory),
    # so that the floor's memory is the pipeline's and not glibc's defaults'.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    started = time.perf_counter()
    child = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPOSITORY, env=env
    )
    assert child.stdin is not None and child.stdout is not None
    stdin, stdout = child.stdin, child.stdout
    if stdout.readline().strip() != "ready":
        stop(child)
        raise RuntimeError("the bare pipeline did not start (its errors are above)")
    start_seconds = time.perf_counter() - started

    def ask(command: dict[str, Any]) -> Any:
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError("the bare pipeline ended (its errors are above)")
        return json.loads(line)

    def block(level: int, seconds: float) -> Block:
        done = ask({"load": level, "seconds": seconds})
        return Block(done["seconds"], done["errors"], done["elapsed"], done["cpu"])

    def label(image: bytes) -> str:
        photo = photo_file.with_name("asked.jpg")
        photo.write_bytes(image)
        answer: str = ask({"ask": str(photo)})["label"]
        return answer

    try:
        yield Running(
            start_seconds, block, label, lambda: "int8", lambda: int(ask({"rss": True})["rss"])
        )
    finally:
        stdin.close()
        stop(child)


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def summarise(blocks: list[Block]) -> dict[str, Any]:
    """A peer's turns at one concurrency as one set of figures."""
    ok = [s for b in blocks for s in b.seconds]
    if not ok:
        raise RuntimeError(f"no call succeeded ({sum(b.errors for b in blocks)} failed)")
    server = sum(b.server_cpu for b in blocks)
    client = sum(b.client_cpu for b in blocks)
    return {
        **stats_ms(ok),
        "calls_per_second": len(ok) / sum(b.elapsed for b in blocks),
        "errors": sum(b.errors for b in blocks),
        "server_cpu_ms_per_call": server * 1000 / len(ok),
        "client_cpu_ms_per_call": client * 1000 / len(ok),
        "cpu_ms_per_call": (server + client) * 1000 / len(ok),
    }


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
    return [
        Peer("bare", "bare pipeline, int8 (the floor)", lambda: bare_peer(args.bundle, photo_file)),
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


def sample_photos() -> list[Path]:
    """The service's sample photos, one per category, each named after it."""
    return sorted(SAMPLES_DIR.glob("*.jpg"))


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


def measure(
    running: dict[str, Running],
    photo: bytes,
    levels: list[int],
    seconds: float,
    turn: float,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Every peer's answers and memory, then each concurrency level with the peers taking
    turns of ``turn`` seconds until each has had ``seconds``; the order rotates every turn."""
    results: dict[str, Any] = {}
    for key, peer in running.items():
        answers = {path.name: peer.ask(path.read_bytes()) for path in sample_photos()}
        top = peer.ask(photo)
        for _ in range(WARM_CALLS - 1):
            peer.ask(photo)
        results[key] = {
            "start_seconds": peer.start_seconds,
            "top_label": top,
            "answers": answers,
            "serves": peer.serves(),
            "rss_loaded_mb": peer.rss() / 2**20,
            "levels": {},
        }
    keys = list(running)
    turns = max(1, math.ceil(seconds / turn - 1e-9))
    for level in levels:
        progress(f"concurrency {level}: {turns} turn(s) of {seconds / turns:.2g} s each...")
        blocks: dict[str, list[Block]] = {key: [] for key in keys}
        for number in range(turns):
            shift = number % len(keys)
            for key in keys[shift:] + keys[:shift]:
                blocks[key].append(running[key].block(level, seconds / turns))
        for key in keys:
            results[key]["levels"][str(level)] = summarise(blocks[key])
    for key, peer in running.items():
        results[key]["rss_after_mb"] = peer.rss() / 2**20
    return results


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
            "turn_seconds": args.turn,
            "concurrency": args.concurrency,
            "interpreters": args.interpreters,
            "photo": "x".join(map(str, CLASSIFY_SIZE)),
        },
    }
    with tempfile.TemporaryDirectory(prefix="smartbin-peers-") as work, ExitStack() as stack:
        listed = peers(args, Path(work), photo, onnx_path)
        if args.only:
            listed = [p for p in listed if p.key == "bare" or p.key in args.only]
        running: dict[str, Running] = {}
        for peer in listed:  # one at a time, so that each start has the machine to itself
            progress(f"starting {peer.name}...")
            running[peer.key] = stack.enter_context(peer.start())
        result["peers"] = measure(
            running, photo, args.concurrency, args.seconds, args.turn, progress
        )
    result["names"] = {p.key: p.name for p in listed}
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
        f"{s['photo']} JPEG; {s['seconds_per_level']:g} s per peer and level, in turns of "
        f"{s['turn_seconds']:g} s",
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
    add_model_arguments(parser)
    parser.add_argument(
        "--seconds", type=float, default=6.0, help="seconds of load per peer and concurrency"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--turn", type=float, default=2.0, help="seconds of each peer's turn under load"
    )
    parser.add_argument(
        "--interpreters", type=int, default=cores(), help="the second service's interpreters"
    )
    parser.add_argument("--only", nargs="+", help="these peers' keys (and the bare pipeline)")
    parser.add_argument(
        "--onnx-cache", type=Path, default=Path("runs/peers"), help="where the ONNX model goes"
    )
    parser.add_argument("--json", type=Path, default=Path("runs/peers.json"))
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.turn <= 0 or min(args.concurrency) < 1:
        parser.error("--seconds, --turn and --concurrency must be positive")
    check_model_arguments(parser, args)
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
