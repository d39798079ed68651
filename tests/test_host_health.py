"""Host health: the Pi's throttling flags through node exporter, the host alerts' unit tests, and
the agent keeping every series the host alerts and the dashboard read.

The real path (node exporter and the agent feeding a central Prometheus) is covered by
tests/test_monitoring.py; these need only promtool and node exporter, skipped without them unless
REQUIRE_PROMETHEUS=1.
"""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from deploy_files import DEPLOY, HOST_RULES, dashboard_expressions, rule_expressions
from helpers import free_port
from host_health import require, start_node_exporter, write_throttled

PROMETHEUS_DIR = DEPLOY / "prometheus"
REASONS = ("under_voltage", "frequency_capped", "throttled", "soft_temp_limit")
# What node exporter and the agent export, as the alerts and panels name them.
HOST_METRIC = re.compile(r"\b(?:node|prometheus)_\w+|smartbin_host_\w+")


def scrape_node(throttled: str, work: Path) -> dict[str, float]:
    """Node exporter's page, as name{labels} -> value, with ``throttled`` as vcgencmd's answer."""
    port = free_port()
    process = start_node_exporter(port, work, throttled)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "node exporter did not start"
                time.sleep(0.2)
        lines = page.read().decode().splitlines()
    finally:
        process.terminate()
        process.wait(timeout=10)
    samples = (line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))
    return {series: float(value) for series, value in samples}


def test_host_alerts_pass_their_unit_tests() -> None:
    result = subprocess.run(
        [
            require(("promtool",), "prometheus"),
            "test",
            "rules",
            str(PROMETHEUS_DIR / "host_alerts_test.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_throttling_flags_reach_node_exporter_decoded(tmp_path: Path) -> None:
    # 0x50005: under-voltage and throttled now, and both since boot (vcgencmd's bits 0, 2, 16, 18).
    page = scrape_node("throttled=0x50005", tmp_path)
    now = {reason: page[f'smartbin_host_throttled{{reason="{reason}"}}'] for reason in REASONS}
    since_boot = {
        reason: page[f'smartbin_host_throttled_since_boot{{reason="{reason}"}}']
        for reason in REASONS
    }
    expected = {"under_voltage": 1, "frequency_capped": 0, "throttled": 1, "soft_temp_limit": 0}
    assert now == expected
    assert since_boot == expected
    assert page["smartbin_host_throttled_readable"] == 1
    assert page["node_textfile_scrape_error"] == 0
    assert page['node_thermal_zone_temp{type="cpu-thermal",zone="0"}'] == 51.54


@pytest.mark.parametrize("answer", ["", 'error=1 error_msg="Command not registered"', "0x5zz"])
def test_an_unreadable_answer_is_reported_and_leaves_no_stale_flags(
    tmp_path: Path, answer: str
) -> None:
    textfile_dir = tmp_path / "textfile"
    assert write_throttled(textfile_dir, "throttled=0x50005").returncode == 0
    result = write_throttled(textfile_dir, answer)
    assert result.returncode == 1
    assert "vcgencmd get_throttled" in result.stderr
    written = (textfile_dir / "smartbin_throttled.prom").read_text()
    assert "smartbin_host_throttled_readable 0" in written
    assert "smartbin_host_throttled{" not in written  # not yesterday's flags
    assert [path.name for path in textfile_dir.iterdir()] == ["smartbin_throttled.prom"]


def kept_by_agent(job_name: str) -> re.Pattern[str]:
    """The agent job's keep rule on metric names, as Prometheus applies it (anchored)."""
    agent = yaml.safe_load((PROMETHEUS_DIR / "agent.yml").read_text())
    (job,) = [job for job in agent["scrape_configs"] if job["job_name"] == job_name]
    (keep,) = [
        rule
        for rule in job["metric_relabel_configs"]
        if rule["action"] == "keep" and rule["source_labels"] == ["__name__"]
    ]
    return re.compile(keep["regex"])


def test_the_agent_keeps_every_host_series_the_alerts_and_dashboard_read() -> None:
    host_alerts = yaml.safe_load(HOST_RULES.read_text())["groups"]
    expressions = [rule["expr"] for group in host_alerts for rule in group["rules"]]
    expressions += [expr for exprs in dashboard_expressions().values() for expr in exprs]
    used = {name for expr in expressions for name in HOST_METRIC.findall(expr)}
    node, agent = kept_by_agent("node"), kept_by_agent("agent")
    dropped = {
        name
        for name in used
        if not (
            node.fullmatch(name)
            if name.startswith(("node_", "smartbin_host_"))
            else agent.fullmatch(name)
        )
    }
    assert used, "no host metric found: the pattern above is broken"
    assert not dropped, f"the agent drops series its alerts or dashboard read: {sorted(dropped)}"


def test_the_dashboard_has_host_and_agent_rows() -> None:
    expressions = dashboard_expressions()
    text = " ".join(expr for exprs in expressions.values() for expr in exprs)
    for needed in (
        "node_thermal_zone_temp",
        "smartbin_host_throttled",
        "node_filesystem_avail_bytes",
        "node_memory_MemAvailable_bytes",
        "smartbin_unsure_photo_bytes",
        "smartbin_unsure_photo_write_failures_total",
        "prometheus_remote_storage_samples_pending",
        "prometheus_remote_storage_samples_failed_total",
    ):
        assert needed in text, f"the fleet dashboard lacks {needed}"


def test_prometheus_loads_the_host_alerts() -> None:
    central = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert HOST_RULES.name in central["rule_files"]
    assert {"SmartbinHostHot", "SmartbinHostDiskAlmostFull", "SmartbinAgentCannotSend"} <= set(
        rule_expressions()
    )
