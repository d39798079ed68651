"""``smartbin-profile``: where the int8 and float32 models spend an invoke, op by op, on this CPU.

LiteRT's Python interpreter exposes no op profiler, so each op of a model is cut out into a model
of its own (its inputs, its weights, its outputs) and timed alone: with the default delegate
(XNNPACK, as the service runs it) and, with ``--builtin``, with TFLite's own kernels. A model of
one op shows whether XNNPACK takes that op (a DELEGATE node replaces it) or leaves it to the
builtin kernels; the whole model shows into how many delegated parts the graph falls. Times are
the CPU time of the invoking thread (one thread, the default), which other work on the machine
barely moves; their sum comes within a few per cent of the whole model's invoke.

Prints the CPU and its vector extensions, the whole models, a table by op type and the ops where
int8 and float32 differ most. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from ai_edge_litert.tools import flatbuffer_utils

from smartbin.bundle import BundleError, load_bundle
from smartbin_tools.cpu import cpu_features
from smartbin_tools.paths import add_model_arguments

OP_NAMES = {
    value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")
}
WARMUP = 2


@dataclass(frozen=True)
class OpModel:
    """One op of a model, cut out into a .tflite of its own."""

    index: int
    name: str
    inputs: list[list[int]]
    outputs: list[list[int]]
    content: bytes


@dataclass(frozen=True)
class OpTime:
    index: int
    name: str
    inputs: list[list[int]]
    outputs: list[list[int]]
    ms: float
    delegated: bool
    builtin_ms: float | None = None


def op_name(model: Any, op: Any) -> str:
    code = model.operatorCodes[op.opcodeIndex]
    return OP_NAMES.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")


def split_ops(path: Path) -> list[OpModel]:
    """Each op of the model's first subgraph as a model of its own: the tensors it reads and
    writes, the constant ones with their data, the others its inputs and outputs."""
    model = flatbuffer_utils.read_model(str(path))
    graph = model.subgraphs[0]
    pieces = []
    for index, op in enumerate(graph.operators):
        buffers = [schema.BufferT()]
        sub = schema.SubGraphT()
        sub.tensors, sub.inputs, sub.outputs = [], [], []
        renumbered: dict[int, int] = {}
        for old in (t for t in (*op.inputs, *op.outputs) if t >= 0 and t not in renumbered):
            renumbered[old] = len(sub.tensors)
            tensor = copy.copy(graph.tensors[old])
            data = model.buffers[tensor.buffer].data
            if data is not None and len(data):  # a constant: weights, bias, shape
                buffers.append(model.buffers[tensor.buffer])
                tensor.buffer = len(buffers) - 1
            else:
                tensor.buffer = 0
                (sub.outputs if old in op.outputs else sub.inputs).append(renumbered[old])
            sub.tensors.append(tensor)
        piece = copy.copy(op)
        piece.inputs = [renumbered[t] if t >= 0 else -1 for t in op.inputs]
        piece.outputs = [renumbered[t] for t in op.outputs]
        sub.operators = [piece]
        single = schema.ModelT()
        single.version = model.version
        single.operatorCodes = model.operatorCodes
        single.buffers = buffers
        single.subgraphs = [sub]
        pieces.append(
            OpModel(
                index,
                op_name(model, op),
                [list(graph.tensors[t].shape) for t in op.inputs if t >= 0],
                [list(graph.tensors[t].shape) for t in op.outputs],
                bytes(flatbuffer_utils.convert_object_to_bytearray(single)),
            )
        )
    return pieces


def clock(threads: int) -> Any:
    """The invoking thread's CPU time on one thread; wall time when XNNPACK's pool helps."""
    return time.thread_time if threads == 1 else time.perf_counter


def time_invokes(
    content: bytes | None,
    threads: int,
    repeats: int,
    path: Path | None = None,
    resolver: OpResolverType = OpResolverType.AUTO,
    latest_features: bool = False,
) -> tuple[float, Interpreter]:
    """The median ms of ``repeats`` invokes of a model (on zeros), and its interpreter."""
    interpreter = Interpreter(
        model_content=content,
        model_path=str(path) if path else None,
        num_threads=threads,
        experimental_op_resolver_type=resolver,
        experimental_default_delegate_latest_features=latest_features,
    )
    interpreter.allocate_tensors()
    for details in interpreter.get_input_details():
        interpreter.set_tensor(details["index"], np.zeros(details["shape"], details["dtype"]))
    now = clock(threads)
    times = []
    for i in range(WARMUP + repeats):
        started = now()
        interpreter.invoke()
        if i >= WARMUP:
            times.append(now() - started)
    return float(np.median(times)) * 1000, interpreter


def delegate_nodes(interpreter: Interpreter) -> int:
    return sum(op["op_name"] == "DELEGATE" for op in interpreter._get_ops_details())


def profile_model(path: Path, threads: int, repeats: int, builtin: bool) -> dict[str, Any]:
    """The whole model (default delegate, with its latest features, and without it) and each
    of its ops alone."""
    whole_ms, interpreter = time_invokes(None, threads, repeats, path=path)
    latest_ms, _ = time_invokes(None, threads, repeats, path=path, latest_features=True)
    ops = split_ops(path)
    times = []
    for op in ops:
        ms, single = time_invokes(op.content, threads, repeats)
        builtin_ms = None
        if builtin:
            builtin_ms, _ = time_invokes(
                op.content, threads, max(3, repeats // 4), resolver=BUILTIN_ONLY
            )
        times.append(
            OpTime(
                op.index, op.name, op.inputs, op.outputs, ms, delegate_nodes(single) > 0, builtin_ms
            )
        )
    result: dict[str, Any] = {
        "path": str(path),
        "input": str(np.dtype(interpreter.get_input_details()[0]["dtype"])),
        "ops": len(ops),
        "delegate_partitions": delegate_nodes(interpreter),
        "ops_delegated": sum(t.delegated for t in times),
        "invoke_ms": whole_ms,
        "invoke_latest_features_ms": latest_ms,
        "sum_of_ops_ms": sum(t.ms for t in times),
        "op_times": [asdict(t) for t in times],
    }
    if builtin:
        result["invoke_builtin_ms"], _ = time_invokes(
            None, threads, max(3, repeats // 4), path=path, resolver=BUILTIN_ONLY
        )
    return result


BUILTIN_ONLY = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES


def by_type(op_times: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "ms": 0.0})
    for t in op_times:
        totals[t["name"]]["count"] += 1
        totals[t["name"]]["ms"] += t["ms"]
    return dict(totals)


def shape_text(shapes: list[list[int]]) -> str:
    return " ".join("x".join(map(str, s)) for s in shapes if s)


def format_profile(result: dict[str, Any], top: int) -> str:
    m = result["machine"]
    unit = "CPU ms" if result["threads"] == 1 else "ms"
    load = ", ".join(f"{v:.1f}" for v in m["load_average"])
    lines = [
        f"machine: {m['cpu']}, vector extensions: {' '.join(m['flags']) or 'none found'}, "
        f"int8 dot product: {'yes' if m['int8_dot_product'] else 'no'}, load average {load}",
        f"{result['threads']} thread{'s' if result['threads'] > 1 else ''}, median of "
        f"{result['repeats']} invokes, {unit} of the invoking thread"
        if result["threads"] == 1
        else f"{result['threads']} threads, median wall time of {result['repeats']} invokes",
        "",
    ]
    models = result["models"]
    for name, r in models.items():
        builtin = (
            f", without XNNPACK {r['invoke_builtin_ms']:.2f}" if "invoke_builtin_ms" in r else ""
        )
        lines.append(
            f"{name:<8} {r['input']} input, {r['ops']} ops, {r['ops_delegated']} taken by XNNPACK "
            f"alone, {r['delegate_partitions']} delegated part(s) in the whole graph; whole model "
            f"{r['invoke_ms']:.2f} {unit} (latest delegate features "
            f"{r['invoke_latest_features_ms']:.2f}{builtin}), its ops one by one "
            f"{r['sum_of_ops_ms']:.2f}"
        )
    names = list(models)
    if len(names) != 2:
        return "\n".join(lines)
    a, b = names
    types_a, types_b = by_type(models[a]["op_times"]), by_type(models[b]["op_times"])
    lines += ["", f"{'op':<20}{'count':>6}{a + ' ' + unit:>16}{b + ' ' + unit:>18}{'ratio':>7}"]
    for op in sorted(types_a, key=lambda k: -types_a[k]["ms"]):
        ta, tb = types_a[op], types_b.get(op, {"ms": float("nan")})
        ratio = ta["ms"] / tb["ms"] if tb["ms"] else float("nan")
        lines.append(f"{op:<20}{ta['count']:>6.0f}{ta['ms']:>16.2f}{tb['ms']:>18.2f}{ratio:>7.2f}")
    ops_a, ops_b = models[a]["op_times"], models[b]["op_times"]
    if [o["name"] for o in ops_a] == [o["name"] for o in ops_b]:
        lines += ["", f"the {top} ops where {a} and {b} differ most (input shapes -> output):"]
        pairs = sorted(zip(ops_a, ops_b, strict=True), key=lambda p: -abs(p[0]["ms"] - p[1]["ms"]))
        for oa, ob in pairs[:top]:
            lines.append(
                f"#{oa['index']:<3} {oa['name']:<18} {a} {oa['ms']:6.2f}  {b} {ob['ms']:6.2f}  "
                f"{shape_text(oa['inputs'])} -> {shape_text(oa['outputs'])}"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`: "))
    add_model_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    parser.add_argument("--repeats", type=int, default=20, help="timed invokes of each model")
    parser.add_argument("--top", type=int, default=12, help="ops listed one by one")
    parser.add_argument(
        "--builtin", action="store_true", help="also time TFLite's own kernels (slow)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be positive")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    bundle = load_bundle(args.bundle)
    models = {bundle.quantization: bundle.model_path}
    for alternative in bundle.manifest.alternatives:
        models.setdefault(alternative.quantization, bundle.path_of(alternative))
    if args.float_model is not None and "float32" not in models:
        models["float32"] = args.float_model
    features = cpu_features()
    return {
        "machine": {**features, "load_average": os.getloadavg()},
        "threads": args.threads,
        "repeats": args.repeats,
        "models": {
            name: profile_model(path, args.threads, args.repeats, args.builtin)
            for name, path in models.items()
        },
        "load_average_end": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = run(args)
    except (BundleError, ValueError, OSError) as err:
        sys.exit(f"smartbin-profile: {err}")
    print(format_profile(result, args.top))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()
