"""The alert rules and the fleet dashboard against a real Prometheus.

Needs Debian's `prometheus` package (prometheus and promtool on PATH). Without it these tests are
skipped, unless REQUIRE_PROMETHEUS=1 (set by .ci/deploy-checks), which makes its absence a failure.

One edge service (a real ``smartbin-serve`` process) is watched as two bins, the two ways a fleet
reports: Prometheus scrapes it directly as bin ``ci-scraped``, and a Prometheus agent configured
from deploy/prometheus/agent.yml, started by its launcher deploy/prometheus/smartbin-agent, scrapes
it as bin ``ci-agent`` and pushes by remote write. The central one asks every caller for a
password (a web config made by deploy/prometheus/make-credentials), as in docker-compose.yml. The
agent also scrapes the bin's host (a node exporter, tests/host_health.py) and itself, as a bin does.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from deploy_files import (
    AGENT_LAUNCHER,
    DEPLOY,
    RULE_FILES,
    dashboard_expressions,
    make_credentials,
    rule_expressions,
)
from helpers import free_port
from host_health import start_node_exporter

from edge_service.const import SAMPLES_DIR
from edge_service.healthcheck import check
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

PROMETHEUS_DIR = DEPLOY / "prometheus"
BINS = {"ci-scraped", "ci-agent"}
# Grafana's variables, as Grafana would fill them in for "All bins, the last 5 minutes".
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$bin": ".*",
}
# Panels that rightly show nothing on a healthy fleet.
NO_DATA_EXPECTED = {"Firing alerts": "a healthy fleet has none"}
STARTUP_SECONDS = 60


def tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} not found: apt-get install prometheus"
    if os.environ.get("REQUIRE_PROMETHEUS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def wait_for(
    condition: Callable[[], object], what: str, timeout: float = STARTUP_SECONDS
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def basic_auth(user: str, password: str) -> dict[str, str]:
    """The Authorization header of HTTP basic auth."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def http_json(url: str, headers: dict[str, str] | None = None) -> dict:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)


def http_status(url: str, headers: dict[str, str], data: bytes | None = None) -> int:
    """The HTTP status a GET (or, with ``data``, a POST) gets, error statuses included."""
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as err:
        return err.code


def ready(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        return http_status(f"{url}/-/ready", headers or {}) == 200
    except OSError:
        return False


@dataclass
class Prometheus:
    """A Prometheus on loopback, the URL of its HTTP API, the login it asks for (Grafana's) and
    the folder of credentials it was given."""

    url: str
    headers: dict[str, str]
    secrets: Path

    def query(self, expr: str) -> dict:
        """Run an instant query; the reply's ``data`` (error replies raise with the message)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            reply = http_json(url, self.headers)
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{expr!r} failed: {err.read().decode()}") from err
        assert reply["status"] == "success", reply
        return reply["data"]

    def values(self, expr: str) -> list[float]:
        data = self.query(expr)
        if data["resultType"] == "scalar":
            return [float(data["result"][1])]
        return [float(sample["value"][1]) for sample in data["result"]]


def start_process(command: list[str], log: Path, **kwargs: object) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, **kwargs)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_edge(port: int, metrics_port: int, admin_port: int, work: Path) -> subprocess.Popen:
    """``smartbin-serve`` with the image's config (default bundle, replay camera) on loopback."""
    config = yaml.safe_load((DEPLOY / "edge" / "config.yaml").read_text())
    config["camera"]["folder"] = str(SAMPLES_DIR)  # the photos the image copies to that folder
    config["admin"]["port"] = admin_port  # the loopback listener where ReloadModel is served
    config["unsure_images"] = {"folder": str(work / "unsure")}  # the store's metrics, too
    config.update(
        host="127.0.0.1",
        port=port,
        metrics_host="127.0.0.1",
        metrics_port=metrics_port,
        num_threads=1,
    )
    (work / "edge.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "edge_service.server", "--config", str(work / "edge.yaml")]
    return start_process(command, work / "edge.log")


def start_central(metrics_port: int, port: int, work: Path, secrets: Path) -> subprocess.Popen:
    """The central Prometheus: scrapes bin ci-scraped, receives remote write, runs the rules,
    and answers only callers with a password from ``secrets`` (make-credentials)."""
    for path in RULE_FILES:
        rules = yaml.safe_load(path.read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"  # the shipped expressions, evaluated without the wait
        (work / path.name).write_text(yaml.safe_dump(rules))
    target = {"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"bin": "ci-scraped"}}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(work / path.name) for path in RULE_FILES],
        "scrape_configs": [{"job_name": "smartbin", "static_configs": [target]}],
    }
    (work / "central.yml").write_text(yaml.safe_dump(config))
    command = [
        tool("prometheus"),
        f"--config.file={work / 'central.yml'}",
        f"--storage.tsdb.path={work / 'central-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-remote-write-receiver",
        f"--web.config.file={secrets / 'web.yml'}",
    ]
    return start_process(command, work / "central.log")


def start_agent(
    metrics_port: int, central_port: int, port: int, node_port: int, work: Path, secrets: Path
) -> subprocess.Popen:
    """deploy/prometheus/agent.yml as bin ci-agent, started by its launcher, pushing to the
    central one with the agents' password: its jobs scrape the edge service, the node exporter
    and the agent itself."""
    config = yaml.safe_load((PROMETHEUS_DIR / "agent.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    ports = {"smartbin": metrics_port, "node": node_port, "agent": port}
    for job in config["scrape_configs"]:
        job["static_configs"][0]["targets"] = [f"127.0.0.1:{ports[job['job_name']]}"]
    remote = config["remote_write"][0]
    remote["url"] = f"http://127.0.0.1:{central_port}/api/v1/write"
    remote["basic_auth"]["password_file"] = str(secrets / "remote-write-password")
    remote["queue_config"]["batch_send_deadline"] = "1s"
    (work / "agent.yml").write_text(yaml.safe_dump(config))
    command = [
        str(AGENT_LAUNCHER),
        f"--config.file={work / 'agent.yml'}",
        f"--storage.agent.path={work / 'agent-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    env = {**os.environ, "SMARTBIN_BIN": "ci-agent", "PROMETHEUS": tool("prometheus")}
    return start_process(command, work / "agent.log", env=env)


def classify_round(
    stub: classifier_pb2_grpc.ClassifierStub,
    admin: classifier_pb2_grpc.ClassifierStub,
    images: list[Path],
) -> None:
    """What a bin's day is made of: uploads, a bad upload, a camera photo and a model reload
    (by an operator, on the admin listener)."""
    for image in images:
        stub.Classify(classifier_pb2.ClassifyRequest(image=image.read_bytes()), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Classify(classifier_pb2.ClassifyRequest(image=b"not a photo"), timeout=10)
    stub.Capture(classifier_pb2.CaptureRequest(), timeout=10)
    admin.ReloadModel(classifier_pb2.ReloadModelRequest(), timeout=60)


def counted_for_every_bin(api: Prometheus, calls: int) -> bool:
    counts = api.values('smartbin_requests_total{method="Classify", code="OK"}')
    return len([count for count in counts if count >= calls]) == len(BINS)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """An edge service, a node exporter, a central Prometheus and an agent, with a few calls
    already counted."""
    tool("prometheus")
    work = tmp_path_factory.mktemp("fleet")
    port, metrics_port, central_port, agent_port, admin_port, node_port = (
        free_port() for _ in range(6)
    )
    processes = [start_edge(port, metrics_port, admin_port, work)]
    try:
        processes.append(start_node_exporter(node_port, work))
        wait_for(lambda: check(f"127.0.0.1:{port}", timeout=1)[0], "the edge service")
        secrets = make_credentials(work / "secrets")
        processes.append(start_central(metrics_port, central_port, work, secrets))
        processes.append(
            start_agent(metrics_port, central_port, agent_port, node_port, work, secrets)
        )
        grafana_password = (secrets / "grafana.env").read_text().strip().split("=", 1)[1]
        api = Prometheus(
            f"http://127.0.0.1:{central_port}", basic_auth("grafana", grafana_password), secrets
        )
        wait_for(lambda: ready(api.url, api.headers), "the central Prometheus")
        wait_for(lambda: ready(f"http://127.0.0.1:{agent_port}"), "the Prometheus agent")
        # Two rounds with scrapes between them, so every rate has two samples to compare.
        images = sorted(SAMPLES_DIR.glob("*.jpg"))
        with (
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
            grpc.insecure_channel(f"127.0.0.1:{admin_port}") as admin_channel,
        ):
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            admin = classifier_pb2_grpc.ClassifierStub(admin_channel)
            for calls in (len(images), 2 * len(images)):
                classify_round(stub, admin, images)
                wait_for(
                    lambda calls=calls: counted_for_every_bin(api, calls),
                    f"{calls} calls counted for both bins",
                )
        wait_for(
            lambda: len(api.values("bin:smartbin_unsure:ratio1h_avg1d")) == len(BINS),
            "the recording rules",
        )
        for host_series in ("node_thermal_zone_temp", "prometheus_remote_storage_shards"):
            wait_for(
                lambda name=host_series: api.values(f'{name}{{bin="ci-agent"}}'),
                f"{host_series} of bin ci-agent",
            )
        yield api
    finally:
        for process in reversed(processes):
            stop(process)


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def test_rule_files_pass_promtool_check(tmp_path: Path) -> None:
    promtool = tool("promtool")
    secrets = make_credentials(tmp_path / "secrets")
    for command in (
        ["check", "rules", *map(str, RULE_FILES)],
        ["check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
        ["check", "config", "--agent", str(PROMETHEUS_DIR / "agent.yml")],
        ["check", "web-config", str(secrets / "web.yml")],
    ):
        result = subprocess.run([promtool, *command], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    result = subprocess.run(
        [tool("promtool"), "test", "rules", "alerts_test.yml", "alerts_long_test.yml"],
        capture_output=True,
        text=True,
        cwd=PROMETHEUS_DIR,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_ways_of_reporting_reach_the_central_prometheus(fleet: Prometheus) -> None:
    data = http_json(
        f"{fleet.url}/api/v1/label/bin/values?"
        + urllib.parse.urlencode({"match[]": 'up{job="smartbin"}'}),
        fleet.headers,
    )
    assert set(data["data"]) == BINS
    assert fleet.values('min(up{job="smartbin"})') == [1.0]


def test_every_dashboard_query_runs_and_the_main_ones_show_data(fleet: Prometheus) -> None:
    empty = []
    for title, expressions in dashboard_expressions().items():
        for expr in expressions:
            if expr.startswith("label_values("):
                continue  # a Grafana function; the bins test above asks the same question
            values = fleet.values(grafana_to_promql(expr))
            if title not in NO_DATA_EXPECTED and not any(math.isfinite(v) for v in values):
                empty.append(f"{title}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_no_data_exceptions_are_still_dashboard_panels() -> None:
    assert set(NO_DATA_EXPECTED) <= set(dashboard_expressions())


def test_every_rule_runs_and_is_healthy_in_prometheus(fleet: Prometheus) -> None:
    for expr in rule_expressions().values():
        fleet.query(expr)  # raises with Prometheus's message if the expression is bad
    rules = http_json(f"{fleet.url}/api/v1/rules", fleet.headers)["data"]["groups"]
    loaded = {rule["name"]: rule for group in rules for rule in group["rules"]}
    assert set(loaded) == set(rule_expressions())
    for name, rule in loaded.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    for recorded in (
        "bin:smartbin_classifications:increase1h",
        "bin:smartbin_unsure:ratio1h",
        "bin:smartbin_inference_seconds:p95_1h",
        "bin:smartbin_last_seen_timestamp_seconds",
    ):
        assert len(fleet.values(recorded)) == len(BINS), recorded
    assert fleet.values("fleet:smartbin_model_versions:count") == [1.0]


# Alerts on the disk and memory of the machine running the test fleet: its node exporter
# reports this machine's real filesystems, which CI fills and empties as it installs and builds.
THIS_MACHINE_ALERTS = {
    "SmartbinHostDiskAlmostFull",
    "SmartbinHostDiskFillingUp",
    "SmartbinHostMemoryLow",
}


def test_a_healthy_fleet_raises_no_alert(fleet: Prometheus) -> None:
    assert fleet.values('min(smartbin_camera_up{job="smartbin"})') == [1.0]
    raised = {sample["metric"]["alertname"] for sample in fleet.query("ALERTS")["result"]}
    assert not raised - THIS_MACHINE_ALERTS


def test_the_agent_forwards_host_and_agent_health_with_the_bin_label(fleet: Prometheus) -> None:
    pi = 'bin="ci-agent", job="node"'
    assert fleet.values(f'node_thermal_zone_temp{{{pi}, type="cpu-thermal"}}') == [51.54]
    throttled = fleet.query(f"smartbin_host_throttled{{{pi}}}")["result"]
    assert {sample["metric"]["reason"] for sample in throttled} == {
        "under_voltage",
        "frequency_capped",
        "throttled",
        "soft_temp_limit",
    }
    assert fleet.values(f"node_memory_MemAvailable_bytes{{{pi}}}")[0] > 0
    filesystems = fleet.query(f"node_filesystem_avail_bytes{{{pi}}}")["result"]
    assert filesystems, "no filesystem reached the central store"
    assert all(sample["metric"]["fstype"] != "tmpfs" for sample in filesystems)
    # Only what the dashboard and the alerts read travels: not node exporter's whole page.
    kept = fleet.values(f"count({{{pi}}})")[0]
    assert kept < 60, f"{kept} node series sent per bin"
    agent = 'bin="ci-agent", job="agent"'
    for name in ("samples_pending", "shards", "highest_timestamp_in_seconds"):
        assert fleet.values(f"prometheus_remote_storage_{name}{{{agent}}}"), name
    assert len(fleet.values('smartbin_unsure_photos{bin="ci-agent"}')) == 1


def test_remote_write_and_queries_need_a_password(fleet: Prometheus) -> None:
    """The central store refuses writes and queries without a known login (401), and the
    agent's pushes, made with the agents' password, arrive."""
    write = f"{fleet.url}/api/v1/write"
    agent_password = (fleet.secrets / "remote-write-password").read_text().strip()
    assert http_status(write, {}, data=b"") == 401
    assert http_status(write, basic_auth("smartbin-fleet", "guessed"), data=b"") == 401
    # Past the login, an empty body is a bad write (400), not an unauthorised one.
    assert http_status(write, basic_auth("smartbin-fleet", agent_password), data=b"") == 400
    assert http_status(f"{fleet.url}/api/v1/query?query=up", {}) == 401
    assert fleet.values('up{job="smartbin", bin="ci-agent"}') == [1.0]


def test_compose_runs_the_prometheus_version_ci_tests() -> None:
    """docker-compose.yml's Prometheus image is the version these tests ran the rules with."""
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())
    image = compose["services"]["prometheus"]["image"]
    tested = subprocess.run(
        [tool("prometheus"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    version = re.match(r"prometheus, version (\d+\.\d+\.\d+)", tested)
    assert version, tested
    assert image == f"prom/prometheus:v{version[1]}"
