"""Every Prometheus metric name meterflow's jobs and their Flink cluster export that the alert rules
(ops/alerts.yml) and the dashboard (ops/grafana/meterflow.json) may read.

Flink's Prometheus reporter names a metric ``flink_<scope>_<name>``: the job's own counters and
gauges live in the operator scope (``flink_taskmanager_job_task_operator_meterflow_...``), the
checkpoint and restart metrics in the JobManager's job scope. The job's own names here are checked
against the places that register them (jvm/ and sinks/) by tests/unit/test_metrics_catalog.py,
and the running job exposes them (tests/e2e/test_metrics.py).

Pure data: no I/O.
"""

from __future__ import annotations

import re

JOB_SCOPE = "flink_jobmanager_job_"
OPERATOR_SCOPE = "flink_taskmanager_job_task_operator_"

# Flink's own metrics (JobManager job scope): checkpoints and restarts.
FLINK_JOB_METRICS = frozenset(
    JOB_SCOPE + name
    for name in (
        "numberOfCompletedCheckpoints",
        "numberOfFailedCheckpoints",
        "numberOfInProgressCheckpoints",
        "lastCheckpointCompletedTimestamp",
        "lastCheckpointDuration",
        "lastCheckpointSize",
        "numRestarts",
        "uptime",
    )
)
# Flink's own operator metrics, and the Kafka source reader's consumer metrics.
FLINK_OPERATOR_METRICS = frozenset(
    OPERATOR_SCOPE + name
    for name in (
        "numRecordsIn",
        "numRecordsOut",
        "numRecordsInPerSecond",
        "numRecordsOutPerSecond",
        "currentOutputWatermark",
        "KafkaSourceReader_KafkaConsumer_records_lag_max",
    )
)
# The lateness histogram's bucket bounds (ms, inclusive), as jvm/ LatenessHistogram.BUCKETS_MS: one
# cumulative counter ``meterflow_lateness_le_<ms>`` per bound, and ``meterflow_lateness_le_inf``,
# counting the events at most that far behind the held watermark (lateness = watermark - event time).
LATENESS_BUCKETS_MS = (0, 1_000, 5_000, 30_000, 60_000, 300_000, 900_000, 3_600_000, 21_600_000, 86_400_000)
LATENESS_BUCKET_METRICS = tuple(OPERATOR_SCOPE + f"meterflow_lateness_le_{b}" for b in LATENESS_BUCKETS_MS) + (
    OPERATOR_SCOPE + "meterflow_lateness_le_inf",
)
# The usage job's own metrics (jvm/: LatenessClassifier or the first stage, with LatenessMetrics and its
# LatenessHistogram, WindowCloser or the second stage, CountDeadLetter, UsageWindowSink's committer).
# ``meterflow_watermark_lag_ms`` is wall-clock now minus the held watermark (0 before the first
# watermark); ``meterflow_window_refires`` counts the updates of windows after their first fire
# (events within the allowed lateness); ``meterflow_windows_closed`` the final rows emitted;
# ``meterflow_window_refinals`` the finals emitted again for a partial that reached a window after
# its close (counted by the two-stage graph's second stage; the SQL closer registers it and never
# counts, and its windows emitted again are in ``meterflow_windows_closed`` only).
USAGE_JOB_METRICS = frozenset(
    OPERATOR_SCOPE + name
    for name in (
        "meterflow_dead_letter_records",
        "meterflow_late_records",
        "meterflow_on_time_records",
        "meterflow_held_watermark",
        "meterflow_watermark_lag_ms",
        "meterflow_window_refires",
        "meterflow_window_refinals",
        "meterflow_windows_closed",
        "usageRowsCommitted",
        "usageCommitFailures",
    )
) | frozenset(LATENESS_BUCKET_METRICS)
# The billing job's own metrics (jobs/billing_operator.py): delivery outcomes (``corrections`` counts
# the sent ones that correct a window's earlier value), attempts that failed outside the delivery
# rules (retried in the worker), and the ledger's backlog as the retry scan
# last counted it (deliveries pending and failed, gauges; every subtask reports the same count).
BILLING_JOB_METRICS = frozenset(
    OPERATOR_SCOPE + f"meterflow_billing_{name}"
    for name in (
        "sent",
        "failed",
        "dead",
        "skipped",
        "deferred",
        "corrections",
        "delivery_errors",
        "retries_handed_out",
        "ledger_pending",
        "ledger_failed",
        "stream_errors_reported",
    )
)
# The billing job's delivery outcomes per destination (Flink key-value group ``destination``: the
# name holds the key, a label ``destination`` the destination's name).
BILLING_OUTCOMES = ("sent", "failed", "dead", "skipped", "deferred", "corrections")
BILLING_DESTINATION_METRICS = frozenset(
    OPERATOR_SCOPE + f"meterflow_destination_billing_{name}" for name in BILLING_OUTCOMES
)
BILLING_JOB_METRICS |= BILLING_DESTINATION_METRICS
# The corrections follower's own endpoint (meterflow/commands/corrections_metrics.py; prometheus_client
# adds ``_total`` to a counter's name).
CORRECTIONS_METRICS = frozenset(
    {
        "meterflow_corrections_last_pass_timestamp_seconds",
        "meterflow_corrections_waiting_events",
        "meterflow_corrections_waiting_oldest_age_seconds",
        "meterflow_corrections_late_topic_retention_seconds",
        "meterflow_corrections_recorded_total",
    }
)
# The HTTP service's own endpoint (meterflow/serve/app.py, GET /metrics): ingest requests by HTTP
# status and events by result, usage API requests by status and the time to answer one (a histogram).
SERVE_METRICS = frozenset(
    {
        "meterflow_ingest_events_total",
        "meterflow_ingest_requests_total",
        "meterflow_usage_requests_total",
        "meterflow_usage_request_seconds_bucket",
        "meterflow_usage_request_seconds_count",
        "meterflow_usage_request_seconds_sum",
    }
)
# The HTTP service's threshold alerts (meterflow/serve/alerts_worker.py), on the same endpoint.
ALERTS_METRICS = frozenset(
    {
        "meterflow_alerts_crossings_total",
        "meterflow_alerts_deliveries_total",
        "meterflow_alerts_pass_errors_total",
        "meterflow_alerts_backlog",
        "meterflow_alerts_delivery_delay_seconds_bucket",
        "meterflow_alerts_delivery_delay_seconds_count",
        "meterflow_alerts_delivery_delay_seconds_sum",
    }
)
# Metric families with a variable last part: one counter per dead-letter kind (CountDeadLetter).
METRIC_PREFIXES = frozenset({OPERATOR_SCOPE + "meterflow_dead_letter_"})

EXPORTED_METRICS = (
    FLINK_JOB_METRICS
    | FLINK_OPERATOR_METRICS
    | USAGE_JOB_METRICS
    | BILLING_JOB_METRICS
    | CORRECTIONS_METRICS
    | SERVE_METRICS
    | ALERTS_METRICS
)

# A metric name in PromQL: a bare selector name, or a name prefix in a regular expression
# (``__name__=~"prefix.+"``, or label_replace's ``"prefix(.+)"``).
_NAME = re.compile(r"\b((?:flink|meterflow)_[A-Za-z0-9_]+)(\.[+*]|\(\.[+*]\))?")


def promql_metric_names(expr: str) -> tuple[set[str], set[str]]:
    """The metric names an expression reads, and the name prefixes it matches (``__name__=~"prefix.+"``)."""
    names: set[str] = set()
    prefixes: set[str] = set()
    for match in _NAME.finditer(expr):
        (prefixes if match.group(2) else names).add(match.group(1))
    return names, prefixes


def unknown_metrics(expr: str) -> list[str]:
    """Names and prefixes in ``expr`` that meterflow does not export (empty when every one is known).

    A per-kind dead-letter counter is read through its prefix only: the kinds come from the data.
    """
    names, prefixes = promql_metric_names(expr)
    return sorted(names - EXPORTED_METRICS) + sorted(p + ".+" for p in prefixes - METRIC_PREFIXES)
