"""meterflow/metrics_catalog.py is the source of truth for metric names: it matches what the code registers, and the alert rules read only names from it."""

from __future__ import annotations

import re

import pytest
import yaml

from meterflow.metrics_catalog import (
    BILLING_JOB_METRICS,
    LATENESS_BUCKET_METRICS,
    LATENESS_BUCKETS_MS,
    METRIC_PREFIXES,
    OPERATOR_SCOPE,
    USAGE_JOB_METRICS,
    promql_metric_names,
    unknown_metrics,
)
from tests.conftest import REPO_ROOT

OPERATORS = REPO_ROOT / "jvm" / "src" / "main" / "java" / "dev" / "meterflow" / "operators"


def _java_registered() -> set[str]:
    """Operator-scope names of the counters and gauges jvm/ registers.

    ``group`` is the ``meterflow`` group where a class adds one (its names get ``meterflow_``);
    ``metricGroup()`` registers in the operator's own group.
    """
    names = set()
    for source in (*OPERATORS.glob("*.java"), *(OPERATORS.parent / "stages").glob("*.java")):
        if source.name == "LatenessHistogram.java":
            continue  # its bucket family: test_lateness_histogram_buckets_match_the_jvm_code
        text = source.read_text()
        group_prefix = "meterflow_" if re.search(r'group = .*addGroup\("meterflow"\);', text) else ""
        names |= {OPERATOR_SCOPE + group_prefix + n for n in re.findall(r'\bgroup\.(?:counter|gauge)\("(\w+)"', text)}
        names |= {OPERATOR_SCOPE + n for n in re.findall(r'\bmetricGroup\(\)\.(?:counter|gauge)\("(\w+)"', text)}
    return names | set(LATENESS_BUCKET_METRICS)


def _java_lateness_buckets() -> tuple[int, ...]:
    text = (OPERATORS / "LatenessHistogram.java").read_text()
    array = re.search(r"BUCKETS_MS = \{([^}]*)\}", text).group(1)
    return tuple(int(v.strip().removesuffix("L").replace("_", "")) for v in array.split(","))


def _python_registered() -> set[str]:
    from jobs.billing_operator import DELIVERY_COUNTS, OUTCOME_COUNTERS

    text = (REPO_ROOT / "jobs" / "billing_operator.py").read_text()
    names = {OPERATOR_SCOPE + f"meterflow_billing_{n}" for n in DELIVERY_COUNTS}
    assert "self.counts = dict.fromkeys(DELIVERY_COUNTS, 0)" in text
    assert re.search(r'for name in self.counts:\s+group.gauge\(f"billing_\{name\}"', text)
    # Registered in a ``group = ...add_group("meterflow")``: counters and gauges.
    assert text.count('group = runtime_context.get_metrics_group().add_group("meterflow")') == 2
    names |= {OPERATOR_SCOPE + "meterflow_" + n for n in re.findall(r'\bgroup\.(?:counter|gauge)\("(\w+)"', text)}
    # Per destination: the outcomes again, in a key-value group under the same ``meterflow`` group.
    assert 'at = group.add_group("destination", destination)' in text
    assert re.search(r'for name in counts:\s+at.gauge\(f"billing_\{name\}"', text)
    names |= {OPERATOR_SCOPE + f"meterflow_destination_billing_{n}" for n in OUTCOME_COUNTERS}
    return names


def test_usage_job_metrics_are_the_ones_the_jvm_code_registers():
    """The catalog's usage-job names are exactly the counters and gauges of jvm/ (the per-kind family aside)."""
    assert _java_registered() == USAGE_JOB_METRICS


def test_lateness_histogram_buckets_match_the_jvm_code():
    """The catalog's bucket bounds are LatenessHistogram's, which registers lateness_le_<bound> and lateness_le_inf in the classifier's meterflow group."""
    assert _java_lateness_buckets() == LATENESS_BUCKETS_MS
    assert list(LATENESS_BUCKETS_MS) == sorted(set(LATENESS_BUCKETS_MS))
    histogram = (OPERATORS / "LatenessHistogram.java").read_text()
    assert (
        'group.counter("lateness_le_" + BUCKETS_MS[i])' in histogram and 'group.counter("lateness_le_inf")' in histogram
    )
    assert "new LatenessHistogram(group)" in (OPERATORS / "LatenessMetrics.java").read_text()
    # Both graphs take the decisions with the same metrics: the SQL graph's classifier, the first stage.
    for taker in (OPERATORS / "LatenessClassifier.java", OPERATORS.parent / "stages" / "DedupAndPartials.java"):
        assert "new LatenessMetrics(getMetricGroup()" in taker.read_text(), taker
    assert len(LATENESS_BUCKET_METRICS) == len(LATENESS_BUCKETS_MS) + 1


def test_billing_job_metrics_are_the_ones_the_operator_registers():
    assert _python_registered() == BILLING_JOB_METRICS


def test_dead_letter_kinds_are_a_prefix_family():
    """CountDeadLetter registers one counter per kind under meterflow.dead_letter: the catalog has its prefix."""
    assert 'addGroup("dead_letter").counter(k)' in (OPERATORS / "CountDeadLetter.java").read_text()
    assert {OPERATOR_SCOPE + "meterflow_dead_letter_"} == METRIC_PREFIXES


def test_promql_names_and_prefixes():
    expr = 'sum(rate(flink_a_b[5m])) / sum({__name__=~"flink_x_y_.+", __name__!="flink_x_y_records"})'
    assert promql_metric_names(expr) == ({"flink_a_b", "flink_x_y_records"}, {"flink_x_y_"})
    assert promql_metric_names('label_replace(up, "kind", "$1", "__name__", "flink_z_(.+)")') == (set(), {"flink_z_"})


def test_unknown_names_are_reported():
    known = f"rate({OPERATOR_SCOPE}meterflow_late_records[5m])"
    assert unknown_metrics(known) == []
    assert unknown_metrics(f"rate({OPERATOR_SCOPE}meterflow_late_recrods[5m])") == [
        f"{OPERATOR_SCOPE}meterflow_late_recrods"
    ]
    assert unknown_metrics('{__name__=~"flink_taskmanager_job_task_operator_meterflow_nope_.+"}') == [
        "flink_taskmanager_job_task_operator_meterflow_nope_.+"
    ]


@pytest.mark.parametrize(
    "rule",
    [r for g in yaml.safe_load((REPO_ROOT / "ops" / "alerts.yml").read_text())["groups"] for r in g["rules"]],
    ids=lambda r: r.get("alert", "?"),
)
def test_alert_rules_read_exported_metrics(rule):
    assert unknown_metrics(rule["expr"]) == []
