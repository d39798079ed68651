"""The deployment files: Dockerfiles, compose file, service config, dashboard and health check.

The images cannot be built here (no container engine); these tests check what can be checked
without one, with the tools the dev extra installs (hadolint, docker-compose).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest
import yaml
from deploy_files import (
    AGENT_LAUNCHER,
    DASHBOARD,
    DEPLOY,
    MAKE_CREDENTIALS,
    dashboard_expressions,
    make_credentials,
    rule_expressions,
)
from helpers import ROOT

from edge_service.config import ReplayCameraConfig, load_config
from edge_service.metrics import ServiceMetrics

DOCKERFILES = sorted(DEPLOY.glob("*/Dockerfile"))


def dev_tool(name: str) -> str:
    """A tool the dev extra installs next to the interpreter running the tests."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} not found: install the dev group (make .venv/.installed)"
    return found


def declared_series() -> set[str]:
    """Series names the service can export, from the declarations in edge_service/metrics.py."""
    suffixes = {
        "counter": ["_total"],
        "gauge": [""],
        "histogram": ["_bucket", "_count", "_sum"],
        "info": ["_info"],
        "stateset": [""],  # prometheus_client's Enum: one series per state
    }
    return {
        family.name + suffix
        for family in ServiceMetrics().registry.collect()
        for suffix in suffixes[family.type]
    }


def test_exactly_the_two_images_exist() -> None:
    assert [path.parent.name for path in DOCKERFILES] == ["edge", "trainer"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.parent.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [dev_tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_edge_image_installs_with_the_script_ci_tests() -> None:
    dockerfile = (DEPLOY / "edge" / "Dockerfile").read_text()
    smoke = (ROOT / ".ci" / "arm64-smoke").read_text()
    assert "RUN deploy/install-edge.sh /opt/smartbin/venv /src" in dockerfile
    assert "/src/deploy/install-edge.sh /opt/smartbin/venv /src" in smoke
    assert "--only-binary=:all:" in (DEPLOY / "install-edge.sh").read_text()


def test_edge_image_runs_as_a_user_and_checks_health_over_grpc() -> None:
    dockerfile = (DEPLOY / "edge" / "Dockerfile").read_text()
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER 10001:10001$", final_stage, re.MULTILINE)
    config = load_config(DEPLOY / "edge" / "config.yaml")
    assert f'"smartbin-healthcheck", "--target", "127.0.0.1:{config.port}"' in final_stage
    assert isinstance(config.camera, ReplayCameraConfig)
    assert f"COPY edge_service/samples {config.camera.folder}\n" in final_stage


def compose(secrets: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """docker-compose on the repository's compose file, its credentials read from ``secrets``."""
    command = [dev_tool("docker-compose"), "--project-directory", str(ROOT)]
    command += ["-f", str(ROOT / "docker-compose.yml"), *args]
    env = {**os.environ, "SMARTBIN_SECRETS": str(secrets)}
    return subprocess.run(command, capture_output=True, text=True, env=env)


def test_compose_file_is_valid_and_its_files_exist(tmp_path: Path) -> None:
    secrets = make_credentials(tmp_path / "secrets")
    check = compose(secrets, "config", "-q")
    assert check.returncode == 0, check.stderr
    resolved = compose(secrets, "config", "--format", "json")
    assert resolved.returncode == 0, resolved.stderr
    services = json.loads(resolved.stdout)["services"]
    assert set(services) == {"edge", "prometheus", "grafana"}
    build = services["edge"]["build"]
    assert Path(build["context"], build["dockerfile"]).is_file()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name} mounts a missing {volume}"


def test_edge_config_is_a_valid_service_config_and_prometheus_scrapes_its_port() -> None:
    config = load_config(DEPLOY / "edge" / "config.yaml")
    central = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    agent = yaml.safe_load((DEPLOY / "prometheus" / "agent.yml").read_text())
    assert central["scrape_configs"][0]["static_configs"][0]["targets"] == [
        f"edge:{config.metrics_port}"
    ]
    assert agent["scrape_configs"][0]["static_configs"][0]["targets"] == [
        f"127.0.0.1:{config.metrics_port}"
    ]


def test_dashboard_and_rules_use_only_declared_metrics() -> None:
    recorded = {name for name in rule_expressions() if ":" in name}  # level:metric:operation
    # The host's throttling flags come from the textfile script, not from the service.
    host = set(
        re.findall(r"smartbin_host_\w+", (DEPLOY / "edge" / "smartbin-throttled").read_text())
    )
    known = declared_series() | recorded | host
    expressions = [expr for exprs in dashboard_expressions().values() for expr in exprs]
    expressions += list(rule_expressions().values())
    used = {name for expr in expressions for name in re.findall(r"[\w:]*smartbin_[\w:]+", expr)}
    assert used, "no smartbin metric found: the parser above is broken"
    assert used <= known, f"not declared in edge_service/metrics.py: {sorted(used - known)}"


def test_dashboard_shows_what_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
    text = json.dumps(dashboard)
    for needed in [
        'up{job=\\"smartbin\\"',
        "smartbin_classifications_total",
        "smartbin_unsure_total",
        "smartbin_stage_seconds_bucket",
        "smartbin_requests_total{code!=",
        "smartbin_camera_up",
        "count by (version) (smartbin_model_info",
        "last_over_time(bin:smartbin_last_seen_timestamp_seconds",  # last seen per bin
        "smartbin_model_loaded_timestamp_seconds",  # model age per bin
    ]:
        assert needed in text, f"the fleet dashboard lacks {needed}"
    history = [
        panel
        for panel in panels
        if panel["type"] == "state-timeline"
        and any("by (bin, version) (smartbin_model_info" in t["expr"] for t in panel["targets"])
    ]
    assert history, "the fleet dashboard lacks a model version history per bin"


def test_grafana_provisioning_points_at_the_mounted_dashboards() -> None:
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "smartbin.yml").read_text()
    )
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts


def test_compose_does_not_start_without_credentials(tmp_path: Path) -> None:
    check = compose(tmp_path, "config", "-q")
    assert check.returncode != 0
    assert "grafana.env" in check.stderr


def test_central_prometheus_asks_compose_grafana_and_agents_for_a_password(
    tmp_path: Path,
) -> None:
    secrets = make_credentials(tmp_path / "secrets")
    services = json.loads(compose(secrets, "config", "--format", "json").stdout)["services"]
    prometheus = services["prometheus"]
    mounts = {volume["target"]: volume["source"] for volume in prometheus["volumes"]}
    flag = next(arg for arg in prometheus["command"] if arg.startswith("--web.config.file="))
    assert mounts[flag.split("=", 1)[1]] == str(secrets / "web.yml")
    users = yaml.safe_load((secrets / "web.yml").read_text())["basic_auth_users"]
    # Grafana's data source and the agents log in as users the web config knows, with the
    # passwords make-credentials wrote beside it.
    source = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    grafana_password = (secrets / "grafana.env").read_text().strip().split("=", 1)[1]
    assert services["grafana"]["environment"]["SMARTBIN_PROMETHEUS_PASSWORD"] == grafana_password
    assert source["secureJsonData"]["basicAuthPassword"] == "$SMARTBIN_PROMETHEUS_PASSWORD"
    assert bcrypt.checkpw(grafana_password.encode(), users[source["basicAuthUser"]].encode())
    agent = yaml.safe_load((DEPLOY / "prometheus" / "agent.yml").read_text())
    login = agent["remote_write"][0]["basic_auth"]
    agent_password = (secrets / "remote-write-password").read_text().strip()
    assert bcrypt.checkpw(agent_password.encode(), users[login["username"]].encode())
    web_config = (secrets / "web.yml").read_text()
    assert grafana_password not in web_config and agent_password not in web_config


def test_credentials_are_private_and_kept_unless_replaced(tmp_path: Path) -> None:
    secrets = make_credentials(tmp_path / "secrets")
    for name in ("remote-write-password", "grafana.env"):
        assert (secrets / name).stat().st_mode & 0o077 == 0, name
    before = (secrets / "remote-write-password").read_text()
    again = subprocess.run(
        [sys.executable, str(MAKE_CREDENTIALS), "--dir", str(secrets)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1
    assert "--replace" in again.stderr
    assert (secrets / "remote-write-password").read_text() == before
    subprocess.run(
        [sys.executable, str(MAKE_CREDENTIALS), "--dir", str(secrets), "--replace"], check=True
    )
    assert (secrets / "remote-write-password").read_text() != before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["secrets"]  # nothing left over


@pytest.mark.parametrize("name", [None, "", "bin 42", "bin-42;reboot"])
def test_the_agent_does_not_start_without_a_usable_bin_name(name: str | None) -> None:
    """The launcher refuses before it looks for Prometheus: the one it is given does not exist,
    and the refusal names the variable to set, not the missing binary."""
    env = {key: value for key, value in os.environ.items() if key != "SMARTBIN_BIN"}
    if name is not None:
        env["SMARTBIN_BIN"] = name
    env["PROMETHEUS"] = "/nonexistent/prometheus"
    result = subprocess.run([str(AGENT_LAUNCHER)], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("smartbin-agent: SMARTBIN_BIN"), result.stderr
