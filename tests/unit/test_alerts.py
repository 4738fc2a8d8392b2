"""ops/alerts.yml: valid rules (promtool check), alerts that fire on the intended input (promtool test), bounded labels."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO_ROOT

ALERTS = REPO_ROOT / "ops" / "alerts.yml"
ALERT_TESTS = REPO_ROOT / "ops" / "alerts_test.yml"


def _promtool() -> str:
    path = shutil.which("promtool") or shutil.which("promtool", path="/usr/bin")
    if not path:
        pytest.fail("promtool not found: run scripts/setup.sh (installs Debian's prometheus package)")
    return path


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_promtool_check_rules():
    """`promtool check rules ops/alerts.yml` accepts the file."""
    r = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests():
    """`promtool test rules ops/alerts_test.yml`: each alert fires on its input series and stays quiet otherwise."""
    r = subprocess.run(
        [_promtool(), "test", "rules", ALERT_TESTS.name], capture_output=True, text=True, check=False, cwd=ALERTS.parent
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_severity_and_summary():
    """Every alert names a severity and a summary."""
    for rule in _rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_alerts_group_only_by_bounded_labels():
    """Aggregations keep only the job, the scrape target or a histogram's bucket: no tenant, customer or other unbounded label."""
    for rule in _rules():
        for labels in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", rule["expr"]):
            assert {label.strip() for label in labels.split(",")} <= {"job_name", "__name__", "instance", "le"}, rule[
                "alert"
            ]
        assert not re.search(r"tenant|customer", rule["expr"]), rule["alert"]


def test_alerts_cover_the_operations_issue():
    """Checkpoint age and failures, restarts, consumer lag, late rate, dead letters, a stalled or lagging watermark and a billing backlog each have an alert."""
    names = {rule["alert"] for rule in _rules()}
    assert {
        "MeterflowCheckpointsNotCompleting",
        "MeterflowCheckpointAgeHigh",
        "MeterflowCheckpointsFailing",
        "MeterflowJobRestarting",
        "MeterflowConsumerLag",
        "MeterflowLateRateHigh",
        "MeterflowDeadLetters",
        "MeterflowWatermarkStalled",
        "MeterflowWatermarkLagHigh",
        "MeterflowBillingBacklog",
        "MeterflowTransactionDeadlineNear",
    } <= names


def test_every_alert_has_a_firing_case():
    """ops/alerts_test.yml makes every alert of ops/alerts.yml fire at least once."""
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {t["alertname"] for case in cases for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == {rule["alert"] for rule in _rules()}
