"""The scale simulator (deploy/scale/simulate.py) and the horizontally scalable store's config
(deploy/scale/victoriametrics-cluster), against real servers.

The simulator runs here as a smoke (5 bins for 10 s, scraped every second); the measured runs
are in docs/scale.md. VictoriaMetrics: Debian packages the single-node server, vmalert and
vmauth but not the cluster's vminsert, vmselect and vmstorage, so the cluster's front door
(vmauth.yml, its tenant prefixes pointed at a single node) and its rules (vmalert) are tested,
and the cluster itself only as a valid compose file. Skipped without Debian's prometheus and
victoria-metrics, unless REQUIRE_PROMETHEUS=1.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from deploy_files import RULE_FILES, dashboard_expressions
from helpers import ROOT, free_port
from host_health import require

SCALE = ROOT / "deploy" / "scale"
SIMULATE = SCALE / "simulate.py"
CLUSTER = SCALE / "victoriametrics-cluster"
PASSWORDS = {"SMARTBIN_REMOTE_WRITE_PASSWORD": "bins-secret", "GRAFANA_DATASOURCE_PASSWORD": "g"}


def simulate(*args: str, work: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SIMULATE), "--work", str(work), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def queries_on_the_dashboard() -> int:
    expressions = [e for exprs in dashboard_expressions().values() for e in exprs]
    return len([expr for expr in expressions if not expr.startswith("label_values(")])


def series_per_bin() -> int:
    lines = (SCALE / "bin-page.prom").read_text().splitlines()
    return len([line for line in lines if line and not line.startswith("#")])


@pytest.mark.parametrize("store", ["prometheus", "victoriametrics"])
def test_the_simulator_fills_a_real_store_and_times_every_dashboard_query(
    store: str, tmp_path: Path
) -> None:
    require(("prometheus",), "prometheus")
    if store == "victoriametrics":
        require(("victoria-metrics",), "victoria-metrics")
    out = tmp_path / "figures.json"
    args = (
        "--store",
        store,
        "--bins",
        "5",
        "--interval",
        "1s",
        "--duration",
        "10",
        "--repeat",
        "1",
    )
    result = simulate(*args, "--json", str(out), work=tmp_path / "work")
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert figures["bins_seen"] == 5
    assert figures["series_per_bin"] == series_per_bin()
    assert figures["store_series"] >= 5 * series_per_bin()
    assert figures["samples_per_second"] > 0
    assert figures["agent_samples_failed"] == 0
    assert len(figures["queries"]) == queries_on_the_dashboard()
    assert "samples/s ingested" in result.stdout


def test_the_simulator_names_what_is_wrong_with_a_page(tmp_path: Path) -> None:
    page = tmp_path / "page.prom"
    page.write_text('smartbin_unsure_total{job="smartbin"} 3\n')
    result = simulate("--page", str(page), "--bins", "1", work=tmp_path)
    assert result.returncode != 0
    assert f"{page}:1: no bin label" in result.stderr


def test_the_shipped_rules_load_in_vmalert() -> None:
    vmalert = require(("vmalert",), "victoria-metrics")
    rules = [f"-rule={path}" for path in RULE_FILES]
    result = subprocess.run([vmalert, "-dryRun", *rules], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    compose = yaml.safe_load((CLUSTER / "compose.yml").read_text())
    mounted = " ".join(compose["services"]["vmalert"]["volumes"])
    for path in RULE_FILES:
        assert f"../../prometheus/{path.name}:" in mounted


def test_the_cluster_compose_file_is_valid() -> None:
    compose = Path(sys.executable).parent / "docker-compose"
    assert compose.exists(), "install the dev group (make .venv/.installed)"
    result = subprocess.run(
        [str(compose), "-f", str(CLUSTER / "compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, **PASSWORDS},
    )
    assert result.returncode == 0, result.stderr


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers, if only to refuse
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer"
            time.sleep(0.3)


def start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )


@pytest.fixture
def front_door(tmp_path: Path) -> Iterator[str]:
    """The shipped vmauth.yml in front of a single-node VictoriaMetrics, which stands in for
    both vminserts and vmselects (their tenant prefixes replaced by its root)."""
    vm_port, auth_port = free_port(), free_port()
    config = (CLUSTER / "vmauth.yml").read_text()
    for backend in ("vminsert-1:8480/insert", "vminsert-2:8480/insert"):
        config = config.replace(f"http://{backend}/0/prometheus/", f"http://127.0.0.1:{vm_port}/")
    for backend in ("vmselect-1:8481/select", "vmselect-2:8481/select"):
        config = config.replace(f"http://{backend}/0/prometheus/", f"http://127.0.0.1:{vm_port}/")
    assert "http://vminsert" not in config and "http://vmselect" not in config
    (tmp_path / "vmauth.yml").write_text(config)
    processes = [
        start(
            [
                require(("victoria-metrics",), "victoria-metrics"),
                f"-storageDataPath={tmp_path / 'vm'}",
                f"-httpListenAddr=127.0.0.1:{vm_port}",
                "-search.latencyOffset=0s",
            ],
            tmp_path / "vm.log",
        ),
        start(
            [
                require(("vmauth",), "victoria-metrics"),
                f"-auth.config={tmp_path / 'vmauth.yml'}",
                f"-httpListenAddr=127.0.0.1:{auth_port}",
            ],
            tmp_path / "vmauth.log",
            PASSWORDS,
        ),
    ]
    try:
        wait_ready(f"http://127.0.0.1:{vm_port}/health")
        wait_ready(f"http://127.0.0.1:{auth_port}/api/v1/query")
        yield f"http://127.0.0.1:{auth_port}"
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


def start_bin_agent(door: str, work: Path) -> subprocess.Popen:
    """deploy/prometheus/agent.yml as bin vm-bin, its password in a file, writing to ``door``;
    it scrapes itself (its edge service and node exporter are absent: up == 0 is data too)."""
    port = free_port()
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "agent.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    for job in config["scrape_configs"]:
        own = job["job_name"] == "agent"
        job["static_configs"][0]["targets"] = [f"127.0.0.1:{port if own else free_port()}"]
    password = work / "remote-write-password"
    password.write_text(PASSWORDS["SMARTBIN_REMOTE_WRITE_PASSWORD"])
    remote = config["remote_write"][0]
    remote["url"] = f"{door}/api/v1/write"
    remote["basic_auth"]["password_file"] = str(password)
    remote["queue_config"]["batch_send_deadline"] = "1s"
    (work / "agent.yml").write_text(yaml.safe_dump(config))
    command = [
        require(("prometheus",), "prometheus"),
        "--enable-feature=agent,expand-external-labels",
        f"--config.file={work / 'agent.yml'}",
        f"--storage.agent.path={work / 'agent-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return start(command, work / "agent.log", {"SMARTBIN_BIN": "vm-bin"})


def ask(url: str, user: str | None = None, password: str = "") -> tuple[int, dict]:
    request = urllib.request.Request(url)
    if user:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        return err.code, {}


def test_bins_write_and_grafana_reads_through_the_front_door(
    front_door: str, tmp_path: Path
) -> None:
    agent = start_bin_agent(front_door, tmp_path)
    query = f"{front_door}/api/v1/query?" + urllib.parse.urlencode({"query": 'up{bin="vm-bin"}'})
    grafana = ("grafana", PASSWORDS["GRAFANA_DATASOURCE_PASSWORD"])
    try:
        deadline = time.monotonic() + 60
        while True:
            status, answer = ask(query, *grafana)
            jobs = {s["metric"]["job"] for s in answer.get("data", {}).get("result", [])}
            if jobs == {"smartbin", "node", "agent"}:
                break
            assert time.monotonic() < deadline, f"no samples of bin vm-bin: {status} {answer}"
            time.sleep(0.5)
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    # Refused (401, or 400 from Debian's older vmauth): no password, a wrong one, and the bins'
    # own, which may write but not read.
    bins = ("smartbin-fleet", PASSWORDS["SMARTBIN_REMOTE_WRITE_PASSWORD"])
    for credentials in ((), ("grafana", "wrong"), bins):
        assert ask(query, *credentials)[0] in (400, 401, 403), credentials
