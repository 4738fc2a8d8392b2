"""ops/grafana/meterflow.json: a well-formed Grafana dashboard whose every query is valid PromQL over metrics meterflow exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from meterflow.metrics_catalog import (
    BILLING_JOB_METRICS,
    LATENESS_BUCKET_METRICS,
    OPERATOR_SCOPE,
    USAGE_JOB_METRICS,
    promql_metric_names,
    unknown_metrics,
)
from tests.conftest import REPO_ROOT

DASHBOARD = REPO_ROOT / "ops" / "grafana" / "meterflow.json"
# Values Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$job": ".*"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) for every panel target, annotation and templating query."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in _panels(dashboard) for t in p["targets"]]
    out += [(f"annotation {a['name']!r}", a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out.append(
                (f"variable {var['name']}", re.fullmatch(r"label_values\((\w+), \w+\)", var["definition"]).group(1))
            )
    return out


def _substituted(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in re.sub(r'"\$\d"', "", expr), f"unknown Grafana variable in {expr}"
    return expr


def test_every_query_reads_exported_metrics(dashboard):
    """Each metric name (and name prefix) in a query is one the jobs or the cluster export (meterflow/metrics_catalog.py)."""
    queries = _queries(dashboard)
    assert len(queries) >= 20
    problems = {where: unknown_metrics(expr) for where, expr in queries if unknown_metrics(expr)}
    assert problems == {}


def test_every_query_is_valid_promql(tmp_path, dashboard):
    """promtool parses each query (Grafana's variables substituted) as a recording rule."""
    promtool = shutil.which("promtool") or shutil.which("promtool", path="/usr/bin")
    if not promtool:
        pytest.fail("promtool not found: run scripts/setup.sh (installs Debian's prometheus package)")
    rules = [
        {"record": f"meterflow:dashboard_query_{i}", "expr": _substituted(expr)}
        for i, (_, expr) in enumerate(_queries(dashboard))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_queries_group_only_by_bounded_labels(dashboard):
    """No panel splits by tenant or customer: series stay bounded whatever the data (a destination is
    declared in the config, so there are as many as it declares; the HTTP service's status codes,
    event results and latency buckets are fixed sets)."""
    for where, expr in _queries(dashboard):
        for labels in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
            assert {label.strip() for label in labels.split(",")} <= {
                "job_name",
                "kind",
                "destination",
                "code",
                "status",
                "le",
                "__name__",
            }, where
        assert not re.search(r"tenant|customer", expr), where


def test_panels_cover_the_operations_issue(dashboard):
    """Records in, duplicates, late, dead letters by kind, watermark lag, lateness, re-fires, checkpoint duration and age, restarts, consumer lag, closed windows, billing, corrections, ledger backlog."""
    titles = {p["title"] for p in _panels(dashboard)}
    assert {
        "Records in",
        "Duplicates dropped",
        "On time and late",
        "Late rate",
        "Dead letters",
        "Dead letters by kind",
        "Watermark lag",
        "Checkpoint duration",
        "Checkpoint age",
        "Restarts",
        "Consumer lag",
        "Closed windows",
        "Deliveries",
        "Lateness distribution",
        "Window re-fires",
        "Corrections",
        "Ledger backlog",
    } <= titles


def test_every_job_metric_has_a_panel(dashboard):
    """Each of the jobs' own metrics (the catalog's usage and billing names) is read by some panel."""
    read = set()
    for _, expr in _queries(dashboard):
        read |= promql_metric_names(expr)[0]
    # The held watermark is read through its lag gauge; the lateness buckets through a few chosen bounds.
    expected = (
        (USAGE_JOB_METRICS | BILLING_JOB_METRICS)
        - {OPERATOR_SCOPE + "meterflow_held_watermark"}
        - set(LATENESS_BUCKET_METRICS)
    )
    assert expected <= read, sorted(expected - read)
    assert OPERATOR_SCOPE + "meterflow_lateness_le_inf" in read


def test_dashboard_is_well_formed(dashboard):
    """Unique panel ids and refIds, every panel on the Prometheus datasource variable, panels inside the 24-column grid without overlap."""
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    assert [v["name"] for v in dashboard["templating"]["list"]][:1] == ["datasource"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
    for p in _panels(dashboard):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
