"""The deployment files the tests read, and the PromQL inside them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fleet.json"
RULES = DEPLOY / "prometheus" / "alerts.yml"
# The host's, the unsure store's and the agent's alerts (host health), in a file of their own.
HOST_RULES = DEPLOY / "prometheus" / "host_alerts.yml"
RULE_FILES = (RULES, HOST_RULES)
PROMETHEUS_DIR = DEPLOY / "prometheus"
# The central store's basic-auth credentials, and the bin's agent launcher that needs a bin name.
MAKE_CREDENTIALS = PROMETHEUS_DIR / "make-credentials"
AGENT_LAUNCHER = PROMETHEUS_DIR / "smartbin-agent"


def dashboard_expressions() -> dict[str, list[str]]:
    """PromQL of every dashboard panel and variable, by panel title."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = {
        panel["title"]: [target["expr"] for target in panel["targets"]]
        for panel in dashboard["panels"]
        if panel["type"] != "row"
    }
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found[f"variable {variable['name']}"] = [variable["query"]["query"]]
    return found


def rule_expressions() -> dict[str, str]:
    """PromQL of every recording and alerting rule, by rule name."""
    groups = [group for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]
    return {
        rule.get("record") or rule["alert"]: rule["expr"]
        for group in groups
        for rule in group["rules"]
    }


def make_credentials(folder: Path) -> Path:
    """Run deploy/prometheus/make-credentials into ``folder``; the folder."""
    subprocess.run(
        [sys.executable, str(MAKE_CREDENTIALS), "--dir", str(folder)],
        check=True,
        capture_output=True,
    )
    return folder
