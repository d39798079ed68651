"""The deployment files the tests read, and the PromQL inside them."""

from __future__ import annotations

import json

import yaml
from helpers import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fleet.json"
RULES = DEPLOY / "prometheus" / "alerts.yml"


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
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {
        rule.get("record") or rule["alert"]: rule["expr"]
        for group in groups
        for rule in group["rules"]
    }
