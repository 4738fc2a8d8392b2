"""Billing-grade semantics on the real stack, with and without failures mid-stream.

For every scenario: Postgres totals equal the totals computed here from the produced events minus
exactly the events found in the late topic; duplicates are counted once; every unique event is in
exactly one place (a window or the late topic).
"""

from __future__ import annotations

import io
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import fastavro
import pytest

from connectors.avro_types import load_schema
from connectors.kafka_admin import ensure_topics
from jobs.plan import DEAD_LETTER_SCHEMA, LATE_EVENT_SCHEMA
from meterflow import flink_jobs
from meterflow.config import JobConfig
from meterflow.producer import send_events
from meterflow.stack import FlinkCluster, KafkaBroker, PostgresServer
from sinks.postgres import apply_schema
from tests.e2e.helpers import CLOSER_TENANT, expected_totals, read_topic, table_totals, wait_for
from tests.e2e.scenario import ALLOWED_LATENESS, CLOCK_TENANT, WATERMARK_DELAY, WINDOW, Risky, Scenario, close_of, build_scenario

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EVENTS = int(os.environ.get("MF_TEST_E2E_EVENTS", "100000"))
LATE_SCHEMA = fastavro.parse_schema(load_schema(LATE_EVENT_SCHEMA))
DEAD_SCHEMA = fastavro.parse_schema(load_schema(DEAD_LETTER_SCHEMA))


def _decode_late(value: bytes) -> dict:
    return fastavro.schemaless_reader(io.BytesIO(value), LATE_SCHEMA)


def _decode_dead(value: bytes) -> dict:
    return fastavro.schemaless_reader(io.BytesIO(value), DEAD_SCHEMA)


def send_raw(bootstrap: str, topic: str, payloads: list[bytes]) -> None:
    """Send raw message values, valid Avro or not."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for payload in payloads:
            producer.send(topic, payload).get(timeout=30)
    finally:
        producer.close()


def _totals(rows: dict) -> dict:
    return {k: (r.quantity, r.event_count) for k, r in rows.items()}


Disruption = Callable[[JobConfig, Path, str, Callable[[], None]], str | None]


def _wait_restarted(cfg: JobConfig, job_id: str, since_ms: int) -> None:
    wait_for(lambda: flink_jobs.job_details(cfg, job_id)["timestamps"].get("RESTARTING", 0) > since_ms, 120, "the job to restart")
    wait_recovered(cfg, job_id)


def wait_recovered(cfg: JobConfig, job_id: str, timeout: float = 300) -> None:
    """Wait until every task runs again. Nothing is started behind the test's back: a TaskManager
    that did not survive the fault fails the test."""

    def running() -> bool:
        details = flink_jobs.job_details(cfg, job_id)
        return details["state"] == "RUNNING" and all(v["status"] == "RUNNING" for v in details.get("vertices", []))

    wait_for(running, timeout, f"job {job_id} to run again")


def kill_taskmanager(cfg: JobConfig, path: Path, job_id: str, during: Callable[[], None]) -> None:
    """kill -9 every TaskManager; send records while none runs; start the one replacement this fault needs."""
    cluster = FlinkCluster(cfg)
    killed_at = int(time.time() * 1000)
    pids = cluster.taskmanager_pids()
    assert pids, "no TaskManager process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    during()
    cluster.start_taskmanager()
    _wait_restarted(cfg, job_id, killed_at)


def restart_kafka(cfg: JobConfig, path: Path, job_id: str, during: Callable[[], None]) -> None:
    """Stop the broker mid-stream for longer than a transaction can wait, start it, send at once."""
    broker = KafkaBroker(cfg)
    down_at = int(time.time() * 1000)
    broker.down()
    time.sleep(KAFKA_OUTAGE_S)
    broker.up()
    during()
    _wait_restarted(cfg, job_id, down_at)


def restart_postgres(cfg: JobConfig, path: Path, job_id: str, during: Callable[[], None]) -> None:
    """Crash Postgres (immediate shutdown) mid-stream, send records while it is down, start it again."""
    server = PostgresServer(cfg)
    down_at = int(time.time() * 1000)
    server.down(mode="immediate")
    during()
    time.sleep(3)
    server.up()
    _wait_restarted(cfg, job_id, down_at)


def savepoint_and_resume(cfg: JobConfig, path: Path, job_id: str, during: Callable[[], None]) -> str:
    """Stop with a savepoint, send records while no job runs, resubmit from it (the upgrade path)."""
    savepoint = flink_jobs.stop_with_savepoint(cfg, job_id)
    during()
    return flink_jobs.submit(cfg, path, savepoint=savepoint)


KAFKA_OUTAGE_S = 20


@dataclass
class Recovery:
    """What the REST API says about the restore that followed the fault."""

    restarts: int
    restored_checkpoint: int | None
    restored_from_savepoint: bool
    restored_before_risky_sent: bool


def _recovery(cfg: JobConfig, job_id: str, risky_acked_ms: int) -> Recovery:
    stats = flink_jobs.checkpoint_stats(cfg, job_id)
    restored = (stats.get("latest") or {}).get("restored") or {}
    triggered = {c["id"]: c["trigger_timestamp"] for c in stats.get("history", [])}
    restored_id = restored.get("id")
    before = restored_id is not None and (restored.get("is_savepoint") or triggered.get(restored_id, risky_acked_ms) < risky_acked_ms)
    return Recovery(flink_jobs.restarts(cfg, job_id), restored_id, bool(restored.get("is_savepoint")), bool(before))


def _send_risky(bootstrap: str, topic: str, risky: Risky) -> int:
    """On-time ones first, then duplicates, bad records and the late ones; returns when all are acknowledged (ms)."""
    send_events(bootstrap, topic, risky.within_lateness + risky.duplicates + risky.boundary + risky.beyond_lateness)
    send_raw(bootstrap, topic, risky.bad_records)
    return int(time.time() * 1000)


def run_scenario(e2e_stack, name: str, disrupt: Disruption | None = None, audit: Callable[[Path, Scenario], None] | None = None) -> None:
    """Play the scenario against a fresh job; ``disrupt`` strikes with risky records in flight and sends more during the fault."""
    run = uuid.uuid4().hex[:6]
    kafka = {
        **e2e_stack.base["kafka"],
        "usage_events_topic": f"in-{name}-{run}",
        "late_events_topic": f"late-{name}-{run}",
        "dead_letter_topic": f"dead-{name}-{run}",
        "consumer_group": f"g-{name}-{run}",
    }
    cfg, path = e2e_stack.config(
        name,
        kafka=kafka,
        postgres={**e2e_stack.base["postgres"], "usage_table": f"usage_{name}_{run}"},
        event_time={"window_size": "10s", "watermark_delay": "2s", "allowed_lateness": "10s", "source_idle_timeout": "5s"},
        flink={**e2e_stack.base["flink"], "job_name": f"meterflow-{name}-{run}"},
    )
    assert (cfg.event_time.window_size, cfg.event_time.watermark_delay, cfg.event_time.allowed_lateness) == (WINDOW, WATERMARK_DELAY, ALLOWED_LATENESS)
    ensure_topics(cfg.kafka.bootstrap_servers, [cfg.kafka.usage_events_topic, cfg.kafka.late_events_topic, cfg.kafka.dead_letter_topic], cfg.kafka.partitions)
    apply_schema(cfg.postgres)
    s: Scenario = build_scenario(EVENTS, cfg.kafka.partitions, seed=hash(name) % 1000)
    bootstrap, topic = cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic
    size = cfg.event_time.window_size
    w1_start = s.start.replace(tzinfo=None) + size
    job_id = flink_jobs.submit(cfg, path)
    recovery = None
    try:
        send_events(bootstrap, topic, s.base_first + s.duplicates_first)
        send_events(bootstrap, topic, s.advance_first, partition_for=lambda i, e: i)
        # W1 final in Postgres: a completed checkpoint holds a watermark exactly at W1's close.
        first_expected = {k: v for k, v in expected_totals(s.base_first, size).items() if k[3] <= w1_start}
        wait_for(lambda: {k: (r.quantity, r.event_count) for k, r in table_totals(cfg).items() if k[3] <= w1_start and r.is_final} == first_expected, 300, "W0 and W1 final in Postgres")
        risky_acked_ms = _send_risky(bootstrap, topic, s.risky_before)
        if disrupt is not None:
            job_id = disrupt(cfg, path, job_id, lambda: _send_risky(bootstrap, topic, s.risky_during)) or job_id
            recovery = _recovery(cfg, job_id, risky_acked_ms)
        else:
            _send_risky(bootstrap, topic, s.risky_during)
        # The risky records of both phases are decided before the watermark may move on.
        early_late = len(s.risky_before.beyond_lateness + s.risky_before.boundary + s.risky_during.beyond_lateness + s.risky_during.boundary)
        wait_for(lambda: len(read_topic(bootstrap, cfg.kafka.late_events_topic, _decode_late)) >= early_late, 300, "late events of the fault's phases committed")
        w2 = expected_totals(s.base_first + s.risky_before.within_lateness + s.risky_during.within_lateness, size)
        w2 = {k: v for k, v in w2.items() if k[3] == w1_start + size}
        wait_for(lambda: all(_totals(table_totals(cfg)).get(k) == v for k, v in w2.items()), 300, "within-lateness events of the fault's phases counted")

        send_events(bootstrap, topic, s.base_second + s.duplicates_second)
        send_events(bootstrap, topic, s.advance_second, partition_for=lambda i, e: i)
        base_expected = expected_totals(s.base + s.risky_before.within_lateness + s.risky_during.within_lateness, size)
        wait_for(lambda: {k: v for k, v in _totals(table_totals(cfg)).items() if k[0] != CLOCK_TENANT} == base_expected, 300, "base windows in Postgres")
        _send_risky(bootstrap, topic, s.risky_after)
        send_events(bootstrap, topic, s.closers, partition_for=lambda i, e: i)
        expected = expected_totals(s.unique_counted, size)
        wait_for(lambda: _totals(table_totals(cfg)) == expected, 300, "final totals in Postgres")
        # Every window is closed by now (the closers moved the watermark past end + lateness).
        wait_for(lambda: all(r.is_final for r in table_totals(cfg).values()), 120, "every window marked final")
        wait_for(lambda: len(read_topic(bootstrap, cfg.kafka.late_events_topic, _decode_late)) >= len(s.late), 120, "late events committed")
        time.sleep(2 * cfg.flink.checkpoint_interval.total_seconds())  # anything extra would be committed by now
        late = read_topic(bootstrap, cfg.kafka.late_events_topic, _decode_late)
        dead = read_topic(bootstrap, cfg.kafka.dead_letter_topic, _decode_dead)
        rows = table_totals(cfg)
        if audit is not None:
            audit(path, s)
    finally:
        flink_jobs.cancel(cfg, job_id)

    if disrupt is not None:
        # The fault hit work in flight: the job restored (after a failover, or from the savepoint), from
        # a checkpoint taken before the last risky records were acknowledged, so those were read again.
        # (Flink's numRestarts metric read 0 after a TaskManager kill that did restore: it is reported,
        # the restored checkpoint is what is asserted.)
        assert recovery is not None and recovery.restored_checkpoint is not None, recovery
        assert recovery.restored_before_risky_sent, recovery
    # Exactly the events beyond the allowed lateness (boundary ones included) are in the late topic, each once.
    assert sorted(r["event_id"] for r in late) == sorted(e["event_id"] for e in s.late)
    lateness = cfg.event_time.allowed_lateness
    for r in late:
        assert r["window_end"] - r["window_start"] == size
        assert r["window_start"] <= r["event_time"] < r["window_end"]
        assert r["watermark"] >= r["window_end"] - timedelta(milliseconds=1) + lateness
        assert r["lateness_ms"] == (r["watermark"] - r["event_time"]) // timedelta(milliseconds=1)
    # Boundary events sent before and during the fault met a watermark exactly at end - 1 ms + lateness.
    boundary_ids = {e["event_id"] for e in s.risky_before.boundary + s.risky_during.boundary}
    w1_close = close_of(s.start, 1)
    assert {r["watermark"] for r in late if r["event_id"] in boundary_ids} == {w1_close}
    # Every bad record is in the dead-letter topic once, raw bytes intact, with a reason; the job kept running.
    assert sorted(r["payload"] for r in dead) == sorted(s.bad_records)
    assert all(r["reason"] and r["source_topic"] == topic for r in dead)
    # Accounting identity: every record sent is counted once, late, a duplicate, or a dead letter.
    unique_ids = {e["event_id"] for e in s.all_sent if e["tenant_id"] != CLOSER_TENANT}
    counted = sum(r.event_count for r in rows.values())
    duplicates = len(s.all_sent) - len({e["event_id"] for e in s.all_sent})
    assert counted + len(late) == len(unique_ids)
    assert counted == len(s.unique_counted)
    assert counted + len(late) + duplicates + len(dead) + len(s.closers) == len(s.all_sent) + len(s.bad_records)
    # Exact per-window totals, each row final and complete (revision = events counted).
    assert _totals(rows) == expected_totals(s.unique_counted, size)
    assert all(r.is_final and r.revision == r.event_count for r in rows.values())
    # One line of figures per scenario (bench/failover_repeat.py collects them).
    restarts = recovery.restarts if recovery else 0
    restored = recovery.restored_checkpoint if recovery else None
    print(f"\nFAILOVER scenario={name} restarts={restarts} restored_checkpoint={restored} sent={len(s.all_sent) + len(s.bad_records)} "
          f"counted={counted} late={len(late)} boundary={len(s.boundary)} duplicates={duplicates} dead_letters={len(dead)} windows={len(rows)}")


def audit_late_topic(path: Path, s: Scenario) -> None:
    """`meterflow late-audit` on the real late topic reports exactly the scenario's late events."""
    import json

    from click.testing import CliRunner

    from meterflow.cli import cli

    histogram = path.parent / "lateness.png"
    result = CliRunner().invoke(cli, ["--config", str(path), "late-audit", "--by", "customer", "--format", "json", "--histogram", str(histogram)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sum(r["count"] for r in report) == len(s.late)
    assert sum(Decimal(r["quantity"]) for r in report) == sum(e["quantity"] for e in s.late)
    assert all(r["lateness_p50_ms"] <= r["lateness_p90_ms"] <= r["lateness_max_ms"] for r in report)
    assert histogram.read_bytes()[:4] == b"\x89PNG"
    one = s.late[0]["tenant_id"]
    result = CliRunner().invoke(cli, ["--config", str(path), "late-audit", "--tenant", one, "--by", "tenant", "--format", "csv"])
    assert result.exit_code == 0 and result.stdout.splitlines()[1].startswith(f"{one},*,*,*,")


def test_duplicates_lateness_and_late_topic(e2e_stack):
    """No failure: duplicates once, within-lateness updates, beyond-lateness to the late topic, audited by the CLI."""
    run_scenario(e2e_stack, "steady", audit=audit_late_topic)


def test_taskmanager_killed_mid_stream(e2e_stack):
    """kill -9 of the TaskManager mid-stream: recovery from the checkpoint, no loss, no double count."""
    run_scenario(e2e_stack, "tmkill", disrupt=kill_taskmanager)


def test_kafka_broker_restarted_mid_stream(e2e_stack):
    """The broker restarts mid-stream: no loss, no double count, late topic still exactly-once."""
    run_scenario(e2e_stack, "kafkarestart", disrupt=restart_kafka)


def test_postgres_restarted_mid_stream(e2e_stack):
    """Postgres crashes and restarts mid-stream: the sink recovers, totals exact."""
    run_scenario(e2e_stack, "pgrestart", disrupt=restart_postgres)


def test_stop_with_savepoint_and_resume(e2e_stack):
    """Stop with a savepoint mid-stream and resubmit from it: the upgrade path loses and repeats nothing."""
    run_scenario(e2e_stack, "savepoint", disrupt=savepoint_and_resume)
