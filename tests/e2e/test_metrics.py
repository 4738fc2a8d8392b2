"""Metrics end to end: the job's Flink metrics reach the stack's Prometheus with the right values.

A small dataset with a few dead letters and late events goes through the usage job; Prometheus'
HTTP API (``/api/v1/query``) then has the dead-letter counter equal to the bad records sent, the
late and on-time decisions equal to what was sent, records read by the source, completed
checkpoints, every metric the alert rules use, and the rules themselves loaded.
"""

from __future__ import annotations

import io
import ipaddress
import json
import re
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import fastavro
import pytest
import yaml

from connectors.avro_codec import UsageEvent, encode_usage_event
from connectors.avro_types import load_schema
from connectors.producer import SyntheticSpec, send_events, synthetic_events
from jobs.plan import DEAD_LETTER_SCHEMA, LATE_EVENT_SCHEMA
from meterflow.config_values import parse_port_range
from meterflow.local import flink_jobs
from meterflow.local.prometheus import ALERT_RULES, PrometheusServer
from meterflow.metrics_catalog import (
    ALERTS_METRICS,
    BILLING_JOB_METRICS,
    LATENESS_BUCKETS_MS,
    SERVE_METRICS,
    promql_metric_names,
)
from tests.e2e.helpers import (
    closing_events,
    expected_totals,
    private_job,
    read_topic,
    send_raw,
    table_totals,
    wait_for,
)

pytestmark = [pytest.mark.e2e]

DEAD_SCHEMA = fastavro.parse_schema(load_schema(DEAD_LETTER_SCHEMA))
LATE_SCHEMA = fastavro.parse_schema(load_schema(LATE_EVENT_SCHEMA))
PREFIX = "flink_taskmanager_job_task_operator_"
DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "meterflow.json"


def _bad_records(sample: UsageEvent) -> list[bytes]:
    """Seven records the job cannot count, of five kinds."""
    return [
        b"not avro at all",
        b"\x00\x01 still not avro",
        encode_usage_event(sample) + b"\xff trailing bytes",
        encode_usage_event({**sample, "event_id": "bad-meter", "meter": "gpu_hours"}),
        encode_usage_event({**sample, "event_id": "bad-negative", "quantity": Decimal(-5)}),
        encode_usage_event({**sample, "event_id": "", "customer_id": "no-id"}),
        encode_usage_event({**sample, "event_id": "bad-future", "event_time": datetime.now(UTC) + timedelta(days=2)}),
    ]


def _api(prom: PrometheusServer, path: str, **params: str) -> object:
    with urllib.request.urlopen(f"{prom.url}{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
        doc = json.loads(r.read())
    assert doc["status"] == "success", doc
    return doc["data"]


def _value(prom: PrometheusServer, promql: str) -> float | None:
    """A scalar from an instant query that yields one series (None when it yields none)."""
    result = prom.query(promql)
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


def _listening_hosts(port: int) -> set[str]:
    """Addresses of the sockets listening on ``port`` (from /proc/net/tcp*; IPv4-mapped IPv6 as IPv4)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            hex_address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:
                # The kernel prints each 32-bit word in host (little-endian) order.
                raw = b"".join(bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, len(hex_address), 8))
                address = ipaddress.ip_address(raw)
                hosts.add(str(address.ipv4_mapped or address) if address.version == 6 else str(address))
    return hosts


def _alert_metric_names() -> set[str]:
    """Metric names the alert rules read, but the billing job's (that job does not run here)."""
    rules = [r for g in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"]]
    return {name for r in rules for name in re.findall(r"\bflink_[A-Za-z0-9_]+", r["expr"])} - BILLING_JOB_METRICS


def _dashboard_usage_metric_names() -> set[str]:
    """Metric names the Grafana dashboard reads, but the billing job's and the HTTP service's (neither
    runs here; tests/e2e/test_demo.py has Prometheus scrape the service)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    names = {name for expr in exprs for name in promql_metric_names(expr)[0]}
    return names - BILLING_JOB_METRICS - SERVE_METRICS - ALERTS_METRICS


def test_job_metrics_in_prometheus(e2e_stack):
    """Dead letters, late and on-time decisions, lateness buckets, watermark lag, re-fires, records read and checkpoints reach Prometheus exactly; labels stay bounded."""
    cfg, path = private_job(e2e_stack, "metrics")
    job_name = cfg.flink.job_name
    prom = PrometheusServer(cfg)
    assert prom.ready()

    # Prometheus and every reporter endpoint listen on loopback only, as do Kafka, Postgres and Flink.
    assert _listening_hosts(cfg.stack.prometheus_port) == {"127.0.0.1"}
    kafka_port = int(cfg.kafka.bootstrap_servers.rpartition(":")[2])
    for port in (
        kafka_port,
        cfg.stack.kafka_controller_port,
        cfg.postgres.port,
        cfg.flink.rest_port,
        cfg.stack.flink_rpc_port,
    ):
        assert _listening_hosts(port) == {"127.0.0.1"}, port
    wait_for(
        lambda: (_value(prom, 'count(up{job="flink"} == 1)') or 0) >= 2,
        60,
        "the JobManager and TaskManager endpoints scraped",
    )
    up_ports = [int(r["metric"]["instance"].rpartition(":")[2]) for r in prom.query('up{job="flink"} == 1')]
    assert set(up_ports) <= set(parse_port_range(cfg.stack.flink_metrics_ports))
    for port in up_ports:
        assert _listening_hosts(port) == {"127.0.0.1"}, port

    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    events = list(
        synthetic_events(
            SyntheticSpec(count=2_000, tenants=3, customers=5, start=start, span=timedelta(seconds=40), seed=11)
        )
    )
    bad = _bad_records(events[0])
    job_id = flink_jobs.submit(cfg, path)
    # The reporter replaces characters Prometheus does not allow in names in label values too.
    job = f'job_name="{re.sub(r"[^A-Za-z0-9:_]", "_", job_name)}"'
    try:
        # The counters are scraped at zero before any record: the alert rules see them increase.
        for counter in ("dead_letter_records", "late_records", "on_time_records"):
            wait_for(
                lambda c=counter: _value(prom, f"sum({PREFIX}meterflow_{c}{{{job}}})") == 0,
                60,
                f"{counter} scraped at zero",
            )
        bootstrap, topic = cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic
        send_events(bootstrap, topic, events)
        send_raw(bootstrap, topic, bad)
        closers = closing_events(start + timedelta(minutes=1), cfg.kafka.partitions)
        send_events(bootstrap, topic, closers, partition_for=lambda i, e: i)
        # Every window of the data final, not only those of the first commit: the counters below are compared with them.
        windows = set(expected_totals(events, cfg.event_time.window_size))
        wait_for(
            lambda: windows <= {k for k, r in table_totals(cfg).items() if r.is_final},
            240,
            "the data's windows final in Postgres",
        )
        # Their windows are closed: these are late.
        late = [
            UsageEvent(
                event_id=f"late-{i}",
                tenant_id="tenant-0",
                customer_id="cust-0",
                meter="api_calls",
                quantity=Decimal(1),
                event_time=start + timedelta(seconds=i),
                dimensions={},
            )
            for i in range(3)
        ]
        sent_at_ms = datetime.now(UTC).timestamp() * 1000
        send_events(bootstrap, topic, late)

        # The dead-letter transaction commits with the same checkpoint as the final rows, but its commit
        # may land a moment after Postgres': wait for it, then expect exactly the bad records.
        def dead_letters() -> list[dict]:
            return read_topic(
                bootstrap, cfg.kafka.dead_letter_topic, lambda v: fastavro.schemaless_reader(io.BytesIO(v), DEAD_SCHEMA)
            )

        wait_for(lambda: len(dead_letters()) >= len(bad), 60, "the dead letters committed")
        dead = dead_letters()
        assert len(dead) == len(bad)

        wait_for(
            lambda: _value(prom, f"sum({PREFIX}meterflow_dead_letter_records{{{job}}})") == len(bad),
            60,
            "the dead-letter counter in Prometheus",
        )
        wait_for(
            lambda: _value(prom, f"sum({PREFIX}meterflow_late_records{{{job}}})") == len(late),
            60,
            "the late counter in Prometheus",
        )
        assert _value(prom, f"sum({PREFIX}meterflow_on_time_records{{{job}}})") == len(events) + len(closers)
        # The lateness histogram counts every decision. An on-time event is less than a window
        # (10 s) behind the watermark; a late event exactly its record's lateness_ms, which depends
        # on how far the watermark had got when it came, so the expectation is read from the topic.
        decided = len(events) + len(closers) + len(late)
        on_time = len(events) + len(closers)

        def late_records() -> list[dict]:
            return read_topic(
                bootstrap, cfg.kafka.late_events_topic, lambda v: fastavro.schemaless_reader(io.BytesIO(v), LATE_SCHEMA)
            )

        wait_for(lambda: len(late_records()) == len(late), 60, "the late events committed")
        late_lateness = [r["lateness_ms"] for r in late_records()]

        def lateness_buckets() -> dict[str, float]:
            # One query: every bucket from the same scrape, so they can be compared with each other.
            rows = prom.query(f'sum by (__name__) ({{__name__=~"{PREFIX}meterflow_lateness_le_.+", {job}}})')
            return {
                r["metric"]["__name__"].removeprefix(f"{PREFIX}meterflow_lateness_le_"): float(r["value"][1])
                for r in rows
            }

        wait_for(lambda: lateness_buckets().get("inf") == decided, 60, "the lateness histogram in Prometheus")
        scraped = lateness_buckets()
        buckets = {b: scraped[str(b)] for b in LATENESS_BUCKETS_MS}
        assert [buckets[b] for b in LATENESS_BUCKETS_MS] == sorted(buckets.values()), buckets  # cumulative
        for b in (b for b in LATENESS_BUCKETS_MS if b >= 30_000):
            assert buckets[b] == on_time + sum(1 for ms in late_lateness if ms <= b), (b, buckets, late_lateness)
        assert buckets[0] >= len(closers), buckets  # each closer was ahead of the watermark
        # Without allowed lateness no window is updated after its first fire.
        assert _value(prom, f"sum({PREFIX}meterflow_window_refires{{{job}}})") == 0
        # The watermark lag is the wall clock at the scrape minus the held watermark, in the same scrape.
        clock = _value(
            prom, f"max({PREFIX}meterflow_held_watermark{{{job}}} + {PREFIX}meterflow_watermark_lag_ms{{{job}}})"
        )
        assert sent_at_ms <= clock <= datetime.now(UTC).timestamp() * 1000, (sent_at_ms, clock)
        assert (_value(prom, f"min({PREFIX}meterflow_watermark_lag_ms{{{job}}})") or 0) >= 0
        kinds = prom.query(f'sum by (__name__) ({{__name__=~"{PREFIX}meterflow_dead_letter_.+", {job}}})')
        per_kind = {
            r["metric"]["__name__"].removeprefix(f"{PREFIX}meterflow_dead_letter_"): float(r["value"][1]) for r in kinds
        }
        assert sum(v for k, v in per_kind.items() if k != "records") == len(bad), per_kind
        assert (_value(prom, f'sum({PREFIX}numRecordsOut{{{job}, operator_name=~"Source.*"}})') or 0) >= len(
            events
        ) + len(bad) + len(closers)
        assert (_value(prom, f"max(flink_jobmanager_job_numberOfCompletedCheckpoints{{{job}}})") or 0) > 0
        assert _value(prom, f"max(flink_jobmanager_job_numRestarts{{{job}}})") == 0

        # Every metric the alert rules read is exposed by the running job.
        names = {r["metric"]["__name__"] for r in prom.query(f'count by (__name__) ({{__name__=~"flink_.+", {job}}})')}
        assert _alert_metric_names() <= names, sorted(_alert_metric_names() - names)
        # And every metric the dashboard's usage panels read.
        assert _dashboard_usage_metric_names() <= names, sorted(_dashboard_usage_metric_names() - names)
        # Counted before or with the commit that made the rows visible; Prometheus sees them at its next scrape.
        committed = len(table_totals(cfg))
        wait_for(
            lambda: (_value(prom, f"sum({PREFIX}meterflow_windows_closed{{{job}}})") or 0) >= committed,
            30,
            "the closed windows counted",
        )
        wait_for(
            lambda: (_value(prom, f"sum({PREFIX}usageRowsCommitted{{{job}}})") or 0) >= committed,
            30,
            "the committed rows counted",
        )
        # The rules are loaded, and the dead letters fire their alert.
        groups = {g["name"] for g in _api(prom, "/api/v1/rules")["groups"]}
        assert {"meterflow-checkpoints", "meterflow-job", "meterflow-data"} <= groups
        wait_for(
            lambda: bool(prom.query(f'ALERTS{{alertname="MeterflowDeadLetters", {job}, alertstate="firing"}}')),
            60,
            "the dead-letter alert firing",
        )

        # Bounded labels: no tenant or customer id in any series of the job.
        series = _api(prom, "/api/v1/series", **{"match[]": f"{{{job}}}"})
        ids = {e["tenant_id"] for e in events} | {e["customer_id"] for e in events}
        values = {v for s in series for k, v in s.items() if k != "__name__"}
        assert not values & ids, values & ids
    finally:
        flink_jobs.cancel(cfg, job_id)
