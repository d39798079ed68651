"""What the CPU offers the model's kernels: its name and the vector extensions that decide
whether int8 beats float32 (docs/benchmarks.md, "int8 against float32").

XNNPACK, the engine LiteRT runs the models with on a CPU, picks its kernels by these: on x86,
int8 convolutions multiply four bytes in one step with VNNI (``avx512_vnni``, ``avx_vnni``) and
only pairs of 16-bit values without it (AVX2), where float32 is as fast; on Arm, ``asimddp``
(the dot product, Cortex-A76 and later: Pi 5) and ``i8mm`` do the same for int8.
"""

from __future__ import annotations

import platform
from pathlib import Path

# The /proc/cpuinfo flags worth printing beside a benchmark's figures, by architecture.
X86_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni")
X86_FLAG_PREFIXES = ("avx512", "amx")
ARM_FLAGS = ("asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")


# Arm's "CPU part" numbers of the cores on the boards a bin runs on.
ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd08": "Cortex-A72",
    "0xd0b": "Cortex-A76",
    "0xd4b": "Cortex-A78C",
    "0xd46": "Cortex-A510",
}


def cpu_model(cpuinfo: str) -> str:
    """The CPU's name in /proc/cpuinfo text: "model name" on x86; on Arm the core named by its
    "CPU part" (a Pi's "Model" line names the board), else the "Model" line."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if fields.get("model name"):
        return fields["model name"]
    part = fields.get("CPU part", "").lower()
    if part:
        return f"Arm {ARM_PARTS.get(part, 'part ' + part)}"
    return fields.get("Model") or platform.processor() or "unknown"


def vector_flags(cpuinfo: str) -> list[str]:
    """The vector extensions among the first CPU's flags, in a fixed order."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    else:
        return []
    named = [flag for flag in (*X86_FLAGS, *ARM_FLAGS) if flag in flags]
    more = sorted(f for f in flags if f.startswith(X86_FLAG_PREFIXES) and f not in named)
    return named + more


def int8_dot_product(flags: list[str]) -> bool:
    """Whether the CPU has an int8 dot-product instruction XNNPACK uses for int8 models."""
    return bool({"avx512_vnni", "avx_vnni", "asimddp", "i8mm"} & set(flags)) or any(
        f.startswith("amx") for f in flags
    )


def cpu_features(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """``{"cpu": name, "flags": [...], "int8_dot_product": bool}`` for this machine."""
    text = cpuinfo_path.read_text() if cpuinfo_path.is_file() else ""
    flags = vector_flags(text)
    return {"cpu": cpu_model(text), "flags": flags, "int8_dot_product": int8_dot_product(flags)}
