"""``smartbin-bench``: what the service costs beyond the model, measured in one run.

Times the bare interpreter (the shipped int8 model and its float32 twin, one thread and all
cores) and decode + preprocess of a small and a camera-sized JPEG in this process; then starts
``smartbin-serve`` as a child process, times start to SERVING, reads its resident memory, runs
Classify over loopback taking turns with the bare pipeline (decode + preprocess + invoke in this
process), times the other routes that classify a photo (HTTP /api/v1/classify, the Open
Inference Protocol's ModelInfer over gRPC and /v2 infer over HTTP) taking turns with Classify,
and drives Classify at several concurrencies. Prints a table, writes the figures as JSON, and
states the ratios against their goals. Everything runs on one machine in one run, so
the ratios mean something on any machine even where the absolute figures do not.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from PIL import Image

from smartbin.bundle import Bundle, BundleError, load_bundle
from smartbin.model import Interpreter
from smartbin.preprocessing import decode_image, resize_and_crop
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc
from smartbin_tools.cpu import cpu_features
from smartbin_tools.load import ClassifyLoad
from smartbin_tools.paths import (
    SAMPLES_DIR,
    add_model_arguments,
    check_model_arguments,
)
from smartbin_tools.routes import ROUTE_NAMES, route_calls, web_config, web_port
from smartbin_tools.service import serve_args, spawn_service
from smartbin_tools.stats import stats_ms

# The photo sizes timed: a TrashNet-sized frame (also the one Classify is sent) and a
# full-HD camera frame.
IMAGE_SIZES = ((512, 384), (1920, 1080))
CLASSIFY_SIZE = IMAGE_SIZES[0]
SAMPLE_PHOTO = SAMPLES_DIR / "glass1.jpg"
JPEG_QUALITY = 90
# Invokes per block when the int8 and float32 models take turns: a short block keeps both
# models under the same load when the machine is busy with something else.
BLOCK = 5
# The concurrency whose calls/s is set against the ideal.
THROUGHPUT_LEVEL = "4"

# (key in "ratios", goal, True when the goal is an upper bound)
GOALS: dict[str, tuple[float, bool]] = {
    "int8_over_float32": (0.5, True),
    "classify_over_bare_pipeline": (1.3, True),
    "throughput_over_ideal": (0.8, False),
    "rss_mb": (120.0, True),
    "start_to_serving_seconds": (2.0, True),
    "http_classify_over_classify": (1.2, True),
    "v2_grpc_infer_over_classify": (1.1, True),
}


GOAL_NAMES = {
    "int8_over_float32": "int8 / float32 invoke, 1 thread",
    "classify_over_bare_pipeline": "Classify p50 / bare pipeline p50",
    "throughput_over_ideal": f"calls/s at concurrency {THROUGHPUT_LEVEL} / ideal",
    "rss_mb": "serving RSS, MB",
    "start_to_serving_seconds": "start to SERVING, s",
    "http_classify_over_classify": "HTTP classify p50 / Classify p50",
    "v2_grpc_infer_over_classify": "v2 gRPC ModelInfer p50 / Classify p50",
}


def cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "arch": platform.machine(),
        "cores": cores(),
        "cpu": platform.processor() or "unknown",
        "python": platform.python_version(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        # Other work on the machine stretches wall times; the CPU-time figures hold up better.
        "load_average_start": os.getloadavg(),
    }
    # The vector extensions decide whether int8 beats float32 here (smartbin_tools.cpu).
    features = cpu_features()
    info["cpu"] = features["cpu"]
    info["cpu_flags"] = features["flags"]
    info["int8_dot_product"] = features["int8_dot_product"]
    board = Path("/sys/firmware/devicetree/base/model")
    if board.is_file():
        info["board"] = board.read_text().strip("\x00\n ")
    for package in ("ai-edge-litert", "grpcio", "numpy", "pillow"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info


# --- the bare interpreter -------------------------------------------------------------------


class BareModel:
    """An interpreter and one fixed input: nothing but ``invoke``."""

    def __init__(self, path: Path, threads: int) -> None:
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.dtype = np.dtype(self.input["dtype"])

    def quantize(self, pixels: np.ndarray) -> np.ndarray:
        """The cheapest correct input for uint8 HWC pixels: a cast, or a flipped top bit."""
        if self.dtype == np.float32:
            return pixels.astype(np.float32)[np.newaxis]
        scale, zero_point = self.input["quantization"]
        if (self.dtype, scale, zero_point) != (np.int8, 1.0, -128):
            raise ValueError(f"input {self.dtype} {scale} {zero_point}: not a converter model")
        return np.bitwise_xor(pixels, 0x80).view(np.int8)[np.newaxis]

    def run(self, tensor: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], tensor)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])

    def time_invokes(self, count: int) -> tuple[list[float], float]:
        """Wall seconds of each of ``count`` invokes, and the CPU seconds they took in all."""
        times = []
        cpu = time.process_time()
        for _ in range(count):
            started = time.perf_counter()
            self.interpreter.invoke()
            times.append(time.perf_counter() - started)
        return times, time.process_time() - cpu


def check_twin(bundle: Bundle, float_model: Path) -> None:
    """Raises ValueError unless ``float_model`` is a float32 model of the bundle's shape."""
    twin = BareModel(float_model, 1)
    size = bundle.preprocessing.input_size
    shape = (1, size, size, 3)
    outputs = int(twin.output["shape"][-1])
    if twin.dtype != np.float32 or tuple(twin.input["shape"]) != shape:
        raise ValueError(
            f"{float_model} takes {twin.dtype} {tuple(twin.input['shape'])}, not float32 {shape}: "
            "pass the float32 twin of this bundle (smartbin-convert --float-twin)"
        )
    if outputs != len(bundle.labels):
        raise ValueError(
            f"{float_model} has {outputs} outputs, the bundle {len(bundle.labels)} labels: "
            "pass the float32 twin of this bundle (smartbin-convert --float-twin)"
        )


def bench_invoke(models: dict[str, Path], threads: int, repeats: int) -> dict[str, Any]:
    """Invoke times of each model at ``threads`` threads, the models taking turns in blocks."""
    loaded = {name: BareModel(path, threads) for name, path in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu = dict.fromkeys(models, 0.0)
    for model in loaded.values():
        model.interpreter.set_tensor(
            model.input["index"], np.zeros(model.input["shape"], model.dtype)
        )
        model.time_invokes(3)  # first invokes pack weights and warm caches
    while any(len(t) < repeats for t in times.values()):
        for name, model in loaded.items():
            block, block_cpu = model.time_invokes(min(BLOCK, repeats - len(times[name])))
            times[name] += block
            cpu[name] += block_cpu
    return {
        name: {**stats_ms(t), "cpu_ms_per_call": cpu[name] * 1000 / len(t)}
        for name, t in times.items()
    }


# --- decode and preprocess ------------------------------------------------------------------


def sample_jpeg(width: int, height: int) -> bytes:
    """A sample photo at ``width`` x ``height``, JPEG-encoded as a camera would send it."""
    with Image.open(SAMPLE_PHOTO) as photo:
        image = photo.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def bench_preprocess(jpeg: bytes, bundle: Bundle, repeats: int) -> dict[str, Any]:
    """Decode, preprocess and both together, with the service's own functions."""
    spec = bundle.preprocessing
    decode, prepare, total = [], [], []
    for _ in range(repeats + 2):
        started = time.perf_counter()
        image = decode_image(jpeg, min_size=spec.resize_size)
        decoded = time.perf_counter()
        resize_and_crop(image, spec)
        done = time.perf_counter()
        decode.append(decoded - started)
        prepare.append(done - decoded)
        total.append(done - started)
    return {
        "bytes": len(jpeg),
        "decode": stats_ms(decode[2:]),
        "preprocess": stats_ms(prepare[2:]),
        "total": stats_ms(total[2:]),
    }


class BarePipeline:
    """Decode + preprocess + invoke in this process, nothing else: the floor under Classify."""

    def __init__(self, bundle: Bundle, jpeg: bytes, threads: int) -> None:
        self.model = BareModel(bundle.model_path, threads)
        self.spec = bundle.preprocessing
        self.jpeg = jpeg

    def __call__(self) -> None:
        image = decode_image(self.jpeg, min_size=self.spec.resize_size)
        self.model.run(self.model.quantize(resize_and_crop(image, self.spec)))


def bench_pipeline_pairs(
    bare: BarePipeline,
    stub: classifier_pb2_grpc.ClassifierStub,
    server: psutil.Process,
    jpeg: bytes,
    repeats: int,
) -> dict[str, Any]:
    """The bare pipeline and Classify at concurrency 1, taking turns in short blocks.

    Taking turns puts both under the same load when other work shares the machine, so their
    ratio holds even where each wall time alone drifts. The server idles while the bare
    pipeline runs and this process idles while Classify runs.
    """
    request = classifier_pb2.ClassifyRequest(image=jpeg)
    times: dict[str, list[float]] = {"bare": [], "classify": []}
    cpu = {"bare": 0.0, "classify": 0.0}
    calls: dict[str, Callable[[], object]] = {
        "bare": bare,
        "classify": lambda: stub.Classify(request, timeout=30),
    }
    meters: dict[str, Callable[[], float]] = {
        "bare": time.process_time,
        "classify": lambda: cpu_seconds(server),
    }
    for call in calls.values():
        call()
    while len(times["bare"]) < repeats:
        count = min(BLOCK, repeats - len(times["bare"]))
        for name, call in calls.items():
            before = meters[name]()
            for _ in range(count):
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
            cpu[name] += meters[name]() - before
    return {
        "bare": {**stats_ms(times["bare"]), "cpu_ms_per_call": cpu["bare"] * 1000 / repeats},
        "classify": {
            **stats_ms(times["classify"]),
            "server_cpu_ms_per_call": cpu["classify"] * 1000 / repeats,
        },
    }


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU time of all the process's threads."""
    times = process.cpu_times()
    return float(times.user + times.system)


# --- the service ----------------------------------------------------------------------------


def bench_classify(
    stub: classifier_pb2_grpc.ClassifierStub,
    server: psutil.Process,
    jpeg: bytes,
    concurrency: int,
    seconds: float,
) -> dict[str, Any]:
    """``concurrency`` threads calling Classify back to back for ``seconds``.

    Besides latency and calls/s, the CPU time each call cost the server and this client:
    unlike wall time, it barely moves when other work shares the machine.
    """
    load = ClassifyLoad(stub, [classifier_pb2.ClassifyRequest(image=jpeg)], concurrency)
    client = psutil.Process()
    load.start(seconds)
    server_cpu, client_cpu = cpu_seconds(server), cpu_seconds(client)
    elapsed = load.join()
    server_cpu = cpu_seconds(server) - server_cpu
    client_cpu = cpu_seconds(client) - client_cpu
    ok = [call.seconds for call in load.calls if call.code == "OK"]
    if not ok:
        errors = dict(Counter(call.code for call in load.calls))
        raise RuntimeError(f"no Classify call succeeded at concurrency {concurrency}: {errors}")
    return {
        **stats_ms(ok),
        "calls_per_second": len(ok) / elapsed,
        "errors": len(load.calls) - len(ok),
        "error_codes": dict(Counter(call.code for call in load.calls if call.code != "OK")),
        "server_cpu_ms_per_call": server_cpu * 1000 / len(ok),
        "client_cpu_ms_per_call": client_cpu * 1000 / len(ok),
    }


def bench_routes(
    calls: dict[str, Callable[[], object]], server: psutil.Process, repeats: int
) -> dict[str, Any]:
    """Each route that classifies a photo, at concurrency 1, the routes taking turns in short
    blocks (so that other work on the machine weighs on all alike), with the server's CPU time
    per call, which other work barely moves."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    cpu = dict.fromkeys(calls, 0.0)
    for call in calls.values():
        call()  # the first call of each sets up its connection
    while len(times["grpc_classify"]) < repeats:
        count = min(BLOCK, repeats - len(times["grpc_classify"]))
        for name, call in calls.items():
            before = cpu_seconds(server)
            for _ in range(count):
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
            cpu[name] += cpu_seconds(server) - before
    return {
        name: {**stats_ms(t), "server_cpu_ms_per_call": cpu[name] * 1000 / len(t)}
        for name, t in times.items()
    }


def bench_service(args: argparse.Namespace, bare: BarePipeline, jpeg: bytes) -> dict[str, Any]:
    """Start to SERVING, resident memory, Classify beside the bare pipeline, the routes side by
    side, and Classify at each concurrency level."""
    with (
        web_config(args.config) as config,
        spawn_service(serve_args(args.bundle, config)) as service,
        grpc.insecure_channel(service.target) as channel,
    ):
        process = service.psutil_process
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        for _ in range(3):  # the first calls set up the connection and the model's caches
            stub.Classify(classifier_pb2.ClassifyRequest(image=jpeg), timeout=30)
        rss_loaded = process.memory_info().rss
        pairs = bench_pipeline_pairs(bare, stub, process, jpeg, args.repeats)
        with route_calls(channel, web_port(service.log), jpeg) as calls:
            routes = bench_routes(calls, process, args.repeats)
        levels = {
            str(level): bench_classify(stub, process, jpeg, level, args.seconds)
            for level in args.concurrency
        }
        rss_after = process.memory_info().rss
    return {
        "start_to_serving_seconds": service.start_seconds,
        "rss_loaded_mb": rss_loaded / 2**20,
        "rss_after_load_mb": rss_after / 2**20,
        "bare_pipeline": pairs["bare"],
        "classify_beside_bare": pairs["classify"],
        "routes": routes,
        "classify": levels,
    }


# --- the run --------------------------------------------------------------------------------


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """The goals' figures, and the same comparisons made in CPU time per call.

    The CPU-time figures count only the time threads actually ran, so they hold up on a
    machine busy with other work, where waiting for a core stretches every wall time.
    """
    cores_ = result["machine"]["cores"]
    one, many = result["invoke"]["1"], result["invoke"][str(cores_)]
    service = result["service"]
    bare, beside = service["bare_pipeline"], service["classify_beside_bare"]
    ideal = cores_ * 1000 / one["int8"]["p50_ms"]
    loaded = service["classify"].get(THROUGHPUT_LEVEL)
    nan = float("nan")
    routes = service["routes"]
    classify_p50 = routes["grpc_classify"]["p50_ms"]
    return {
        "int8_over_float32": one["int8"]["p50_ms"] / one["float32"]["p50_ms"],
        "int8_over_float32_all_cores": many["int8"]["p50_ms"] / many["float32"]["p50_ms"],
        "classify_over_bare_pipeline": beside["p50_ms"] / bare["p50_ms"],
        "ideal_calls_per_second": ideal,
        "throughput_over_ideal": loaded["calls_per_second"] / ideal if loaded else nan,
        "rss_mb": max(service["rss_loaded_mb"], service["rss_after_load_mb"]),
        "start_to_serving_seconds": service["start_to_serving_seconds"],
        "http_classify_over_classify": routes["http_classify"]["p50_ms"] / classify_p50,
        "v2_grpc_infer_over_classify": routes["v2_grpc_infer"]["p50_ms"] / classify_p50,
        "v2_http_infer_over_classify": routes["v2_http_infer"]["p50_ms"] / classify_p50,
        "cpu_http_classify_over_classify": routes["http_classify"]["server_cpu_ms_per_call"]
        / routes["grpc_classify"]["server_cpu_ms_per_call"],
        "cpu_v2_grpc_infer_over_classify": routes["v2_grpc_infer"]["server_cpu_ms_per_call"]
        / routes["grpc_classify"]["server_cpu_ms_per_call"],
        "cpu_v2_http_infer_over_classify": routes["v2_http_infer"]["server_cpu_ms_per_call"]
        / routes["grpc_classify"]["server_cpu_ms_per_call"],
        "cpu_classify_over_bare_pipeline": beside["server_cpu_ms_per_call"]
        / bare["cpu_ms_per_call"],
        "cpu_invoke_over_classify": one["int8"]["cpu_ms_per_call"]
        / (loaded["server_cpu_ms_per_call"] + loaded["client_cpu_ms_per_call"])
        if loaded
        else nan,
    }


def goals(figures: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each goal, its figure and whether it is met (None: not measured in this run)."""
    checked = {}
    for key, (goal, upper) in GOALS.items():
        value = figures[key]
        met = None if math.isnan(value) else bool(value <= goal if upper else value >= goal)
        checked[key] = {"value": value, "goal": goal, "upper_bound": upper, "met": met}
    return checked


def run(args: argparse.Namespace, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Every measurement, in one dict (the JSON written)."""
    bundle = load_bundle(args.bundle)
    n = cores()
    result: dict[str, Any] = {
        "machine": machine(),
        "model": {
            "version": bundle.version,
            "architecture": bundle.architecture,
            "input_size": bundle.preprocessing.input_size,
            "int8": str(bundle.model_path),
            "int8_bytes": bundle.model_path.stat().st_size,
            "float32": str(args.float_model),
            "float32_bytes": args.float_model.stat().st_size,
        },
        "settings": {
            "repeats": args.repeats,
            "seconds_per_level": args.seconds,
            "concurrency": args.concurrency,
            "classify_image": "x".join(map(str, CLASSIFY_SIZE)),
            "serve_config": str(args.config) if args.config else None,
        },
    }
    check_twin(bundle, args.float_model)
    models = {"int8": bundle.model_path, "float32": args.float_model}
    result["invoke"] = {}
    for threads in sorted({1, n}):
        progress(f"invoke, {threads} thread{'' if threads == 1 else 's'}...")
        result["invoke"][str(threads)] = bench_invoke(models, threads, args.repeats)
    jpegs = {f"{w}x{h}": sample_jpeg(w, h) for w, h in IMAGE_SIZES}
    progress("decode + preprocess...")
    result["preprocess"] = {
        size: bench_preprocess(jpeg, bundle, args.repeats) for size, jpeg in jpegs.items()
    }
    classify_jpeg = jpegs[result["settings"]["classify_image"]]
    progress(
        f"service: Classify beside the bare pipeline, then at concurrency "
        f"{', '.join(map(str, args.concurrency))} for {args.seconds:g} s each..."
    )
    bare = BarePipeline(bundle, classify_jpeg, n)
    result["service"] = bench_service(args, bare, classify_jpeg)
    result["machine"]["load_average_end"] = os.getloadavg()
    result["ratios"] = ratios(result)
    result["goals"] = goals(result["ratios"])
    return result


def format_table(result: dict[str, Any]) -> str:
    """The figures as a plain-text table, the goals last."""
    m, model, service = result["machine"], result["model"], result["service"]
    load = ", ".join(f"{v:.1f}" for v in m["load_average_start"])
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['arch']}"
        + (f" ({m['board']})" if "board" in m else "")
        + f", Python {m['python']}, ai-edge-litert {m['ai-edge-litert']}, load average {load}",
        f"vector extensions: {' '.join(m.get('cpu_flags', [])) or 'none found'}; int8 "
        + (
            "dot product: yes"
            if m.get("int8_dot_product")
            else "dot product: no (no VNNI or asimddp/i8mm: expect int8 no faster than float32)"
        ),
        f"model: {model['architecture']} {model['input_size']} px, {model['version']}",
        "",
        f"{'measure':<44}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'calls/s':>9}{'CPU ms':>8}",
    ]

    def row(name: str, s: dict[str, Any], rate: float | None = None) -> None:
        cpu = s.get("cpu_ms_per_call", s.get("server_cpu_ms_per_call"))
        if "client_cpu_ms_per_call" in s:
            cpu += s["client_cpu_ms_per_call"]
        rate_text = f"{rate:9.1f}" if rate is not None else " " * 9
        cpu_text = f"{cpu:8.2f}" if cpu is not None else ""
        line = (
            f"{name:<44}{s['p50_ms']:8.2f}{s['p95_ms']:8.2f}{s['p99_ms']:8.2f}{rate_text}{cpu_text}"
        )
        lines.append(line.rstrip())

    for threads, by_model in result["invoke"].items():
        for name, s in by_model.items():
            row(f"invoke {name}, {threads} thread{'' if threads == '1' else 's'}", s)
    for size, p in result["preprocess"].items():
        row(f"decode {size} JPEG ({p['bytes'] // 1024} KiB)", p["decode"])
        row(f"preprocess {size}", p["preprocess"])
        row(f"decode + preprocess {size}", p["total"])
    image = result["settings"]["classify_image"]
    row(f"bare pipeline {image}, {m['cores']} threads", service["bare_pipeline"])
    row("gRPC Classify, taking turns with it", service["classify_beside_bare"])
    for key, s in service["routes"].items():
        row(f"{ROUTE_NAMES[key]}, taking turns", s)
    for level, c in service["classify"].items():
        row(f"gRPC Classify, concurrency {level}", c, c["calls_per_second"])
    figures = result["ratios"]
    lines += [
        "CPU ms: CPU time per call of all threads (Classify: the server's, plus the client's "
        "under load)",
        "",
        f"ideal calls/s (cores x 1000 / int8 1-thread invoke p50 ms): "
        f"{figures['ideal_calls_per_second']:.1f}",
        f"int8 / float32 invoke, {m['cores']} threads: "
        f"{figures['int8_over_float32_all_cores']:.2f}",
        f"v2 HTTP infer p50 / Classify p50: {figures['v2_http_infer_over_classify']:.2f}; "
        "in server CPU time / Classify's: HTTP classify "
        f"{figures['cpu_http_classify_over_classify']:.2f}, v2 gRPC infer "
        f"{figures['cpu_v2_grpc_infer_over_classify']:.2f}, v2 HTTP infer "
        f"{figures['cpu_v2_http_infer_over_classify']:.2f}",
        f"in CPU time: Classify / bare pipeline {figures['cpu_classify_over_bare_pipeline']:.2f}, "
        f"int8 1-thread invoke / Classify at concurrency {THROUGHPUT_LEVEL} "
        f"{figures['cpu_invoke_over_classify']:.2f}",
        f"serving RSS: {service['rss_loaded_mb']:.1f} MB with the model loaded, "
        f"{service['rss_after_load_mb']:.1f} MB after the Classify load",
        "",
        f"{'goal':<44}{'value':>8}{'target':>8}{'met':>6}",
    ]
    for key, g in result["goals"].items():
        bound = ("<=" if g["upper_bound"] else ">=") + format(g["goal"], "g")
        met = {True: "yes", False: "NO", None: "n/a"}[g["met"]]
        lines.append(f"{GOAL_NAMES[key]:<44}{g['value']:8.2f}{bound:>8}{met:>6}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`: "))
    add_model_arguments(parser)
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="seconds of Classify load per concurrency"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 16], help="Classify calls in flight"
    )
    parser.add_argument(
        "--repeats", type=int, default=100, help="timed runs of each in-process measure"
    )
    parser.add_argument("--config", type=Path, help="smartbin-serve YAML config to serve with")
    parser.add_argument(
        "--json", type=Path, default=Path("runs/benchmark.json"), help="where to write figures"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.repeats < 1 or min(args.concurrency) < 1:
        parser.error("--seconds, --repeats and --concurrency must be positive")
    check_model_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        result = run(args, progress=lambda text: print(text, file=sys.stderr, flush=True))
    except (BundleError, ValueError, RuntimeError) as err:
        sys.exit(f"smartbin-bench: {err}")
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()
