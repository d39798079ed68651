"""A bin's host as the monitoring tests see it: Debian's node exporter reading a Raspberry Pi's
temperature sensor, and deploy/edge/smartbin-throttled writing the Pi's throttling flags for
its textfile collector, from a file that stands in for ``vcgencmd get_throttled``.

The machines tests run on have no Pi sensor, so node exporter reads a folder laid out as a Pi's
/sys (``--path.sysfs``): one thermal zone, ``cpu-thermal``, as Raspberry Pi OS names it. Memory
and filesystems are the test machine's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT

THROTTLED_SCRIPT = ROOT / "deploy" / "edge" / "smartbin-throttled"
NODE_EXPORTER = "prometheus-node-exporter"  # Debian's name; upstream's binary is node_exporter
# The collectors the agent keeps series of (agent.yml); the others would read the fake /sys.
NODE_COLLECTORS = ("thermal_zone", "hwmon", "filesystem", "meminfo", "loadavg", "stat", "textfile")


def require(names: tuple[str, ...], package: str) -> str:
    """The first of ``names`` on PATH; skips the test without any, or fails it where
    REQUIRE_PROMETHEUS=1 (CI's deploy checks install the Debian packages)."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    message = f"{names[0]} not found: apt-get install {package}"
    if os.environ.get("REQUIRE_PROMETHEUS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def node_exporter() -> str:
    """Node exporter: Debian's name first, then upstream's."""
    return require((NODE_EXPORTER, "node_exporter"), "prometheus-node-exporter")


def fake_pi_sysfs(folder: Path, millidegrees: int) -> Path:
    """A /sys with the Pi's CPU thermal zone at ``millidegrees`` (the kernel's unit)."""
    zone = folder / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "policy").write_text("step_wise\n")
    (zone / "temp").write_text(f"{millidegrees}\n")
    return folder


def write_throttled(textfile_dir: Path, answer: str) -> subprocess.CompletedProcess[str]:
    """Run smartbin-throttled as its timer does, with ``answer`` as vcgencmd's output."""
    fake = textfile_dir.parent / "vcgencmd-answer"
    fake.write_text(answer + "\n")
    textfile_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [str(THROTTLED_SCRIPT), str(textfile_dir)],
        env={**os.environ, "SMARTBIN_THROTTLED_FROM": str(fake)},
        capture_output=True,
        text=True,
    )


def start_node_exporter(
    port: int, work: Path, throttled: str = "throttled=0x0"
) -> subprocess.Popen:
    """Node exporter on loopback: the fake Pi's temperature (51.5 °C), its throttling flags
    (``throttled``: vcgencmd's answer), this machine's memory and filesystems."""
    sysfs = fake_pi_sysfs(work / "sys", 51_540)
    textfile_dir = work / "node-textfile"
    result = write_throttled(textfile_dir, throttled)
    assert result.returncode == 0, result.stderr
    command = [
        node_exporter(),
        f"--web.listen-address=127.0.0.1:{port}",
        f"--path.sysfs={sysfs}",
        f"--collector.textfile.directory={textfile_dir}",
        "--collector.disable-defaults",
        *(f"--collector.{name}" for name in NODE_COLLECTORS),
    ]
    log = (work / "node-exporter.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
