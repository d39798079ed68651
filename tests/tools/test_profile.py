"""smartbin-profile cuts each model into its ops and times them; smartbin_tools.cpu reads the
vector extensions that decide int8 against float32. Timings are printed, never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smartbin_tools import opprofile
from smartbin_tools.cpu import cpu_features, cpu_model, int8_dot_product, vector_flags

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse4_2 avx f16c fma avx2 sha_ni
"""
XEON = """model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: avx avx2 fma avx512f avx512bw avx512_vnni avx_vnni amx_int8 amx_tile
"""
PI4 = """processor\t: 0
Features\t: fp asimd evtstrm crc32 cpuid
CPU part\t: 0xd08
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""
PI5 = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull crc32 atomics fphp asimdhp cpuid lrcpc dcpop asimddp
CPU part\t: 0xd0b
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""


@pytest.mark.parametrize(
    ("cpuinfo", "name", "flags", "dot"),
    [
        (X86, "AMD EPYC 7B13", ["avx", "avx2", "fma", "f16c"], False),
        (
            XEON,
            "Intel(R) Xeon(R) Platinum 8481C",
            [
                "avx",
                "avx2",
                "fma",
                "avx512f",
                "avx512bw",
                "avx512_vnni",
                "avx_vnni",
                "amx_int8",
                "amx_tile",
            ],
            True,
        ),
        (PI4, "Arm Cortex-A72", ["asimd"], False),
        (PI5, "Arm Cortex-A76", ["asimd", "asimdhp", "asimddp"], True),
    ],
)
def test_the_cpu_and_its_vector_extensions_are_read_from_cpuinfo(
    cpuinfo: str, name: str, flags: list[str], dot: bool
) -> None:
    assert cpu_model(cpuinfo) == name
    assert vector_flags(cpuinfo) == flags
    assert int8_dot_product(flags) is dot


def test_this_machines_cpu_is_described() -> None:
    features = cpu_features()
    assert features["cpu"] and isinstance(features["flags"], list)


def test_each_op_alone_is_timed_and_the_graph_is_taken_by_xnnpack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "profile.json"
    opprofile.main(["--repeats", "1", "--top", "3", "--json", str(out)])
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    models = result["models"]
    assert set(models) == {"int8", "float32"}
    int8, float32 = models["int8"], models["float32"]
    assert int8["input"] == "int8" and float32["input"] == "float32"
    # The same network: the same ops in the same order, every one of them taken by XNNPACK,
    # and the whole graph in one delegated part.
    assert [o["name"] for o in int8["op_times"]] == [o["name"] for o in float32["op_times"]]
    assert int8["ops"] == len(int8["op_times"]) > 50
    for model in models.values():
        assert model["ops_delegated"] == model["ops"]
        assert model["delegate_partitions"] == 1
        assert all(o["ms"] > 0 for o in model["op_times"])
    stem = next(o for o in int8["op_times"] if o["name"] == "CONV_2D")
    assert stem["inputs"][0][-1] == 3  # the first convolution reads the 3 colour channels
    assert "CONV_2D" in table and "differ most" in table
