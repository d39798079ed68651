"""``smartbin-compare``: a table of bundles: float/int8 accuracy, size and int8 latency here.

Every bundle is timed in the same process on the same machine, so the rows compare fairly.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path
from typing import Any

from smartbin.bundle import load_bundle
from smartbin_tools.bench import bench_invoke


def bundle_row(folder: Path, repeats: int) -> dict[str, Any]:
    bundle = load_bundle(folder)
    report = json.loads((folder / "report.json").read_text())
    row: dict[str, Any] = {
        "bundle": folder.name,
        "architecture": bundle.architecture,
        "input": bundle.preprocessing.input_size,
        "float_test": report["float"]["test"]["accuracy"],
        "int8_test": report["int8"]["test"]["accuracy"],
        "int8_val": report["int8"]["val"]["accuracy"],
        "agreement_test": report["agreement"]["test"],
        "int8_shifted": report.get("int8_test_shifted", {}).get("mean", float("nan")),
        "int8_mb": report["model_bytes"]["int8"] / 1e6,
        "float_mb": report["model_bytes"]["float32"] / 1e6,
    }
    for threads in (1, 2):
        timing = bench_invoke({"int8": bundle.model_path}, threads, repeats)["int8"]
        row[f"int8_ms_{threads}t"] = timing["p50_ms"]
    return row


def _percent(value: float) -> str:
    return "not measured" if math.isnan(value) else f"{value:.2%}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | input | float test | int8 test | int8 val | int8 test, camera shifts "
        "| float/int8 agree | int8 MB | int8 ms (1 thread) | int8 ms (2 threads) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['architecture']} | {r['input']} | {r['float_test']:.2%} | {r['int8_test']:.2%} "
            f"| {r['int8_val']:.2%} | {_percent(r['int8_shifted'])} | {r['agreement_test']:.2%} "
            f"| {r['int8_mb']:.2f} "
            f"| {r['int8_ms_1t']:.1f} | {r['int8_ms_2t']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path, help="bundle folders to compare")
    parser.add_argument("--repeats", type=int, default=50, help="timed invokes per setting")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = [bundle_row(folder, args.repeats) for folder in args.bundles]
    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"python {platform.python_version()}"
    )
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
