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
from tests.e2e.helpers import expected_totals, read_topic, table_totals, wait_for
from tests.e2e.scenario import Scenario, build_scenario

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


def _wait_restarted(cfg: JobConfig, job_id: str, since_ms: int) -> None:
    wait_for(lambda: flink_jobs.job_details(cfg, job_id)["timestamps"].get("RESTARTING", 0) > since_ms, 120, "the job to restart")
    wait_recovered(cfg, job_id)


def wait_recovered(cfg: JobConfig, job_id: str, timeout: float = 300) -> None:
    """Wait until every task runs again; restart a TaskManager that Flink shut down meanwhile.

    Flink's task-cancellation watchdog may stop a TaskManager while a failing job is cancelled;
    in production a supervisor starts a new one, here `stack up` does.
    """

    def running() -> bool:
        FlinkCluster(cfg).up()
        details = flink_jobs.job_details(cfg, job_id)
        return details["state"] == "RUNNING" and all(v["status"] == "RUNNING" for v in details.get("vertices", []))

    wait_for(running, timeout, f"job {job_id} to run again")


def kill_taskmanager(cfg: JobConfig, path: Path, job_id: str) -> None:
    """kill -9 every TaskManager, start a fresh one; the job restores from its last checkpoint."""
    cluster = FlinkCluster(cfg)
    killed_at = int(time.time() * 1000)
    pids = cluster.taskmanager_pids()
    assert pids, "no TaskManager process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    cluster.start_taskmanager()
    _wait_restarted(cfg, job_id, killed_at)


def restart_kafka(cfg: JobConfig, path: Path, job_id: str) -> None:
    """Stop and restart the Kafka broker mid-stream; the job reconnects or restores."""
    broker = KafkaBroker(cfg)
    broker.down()
    time.sleep(3)
    broker.up()
    wait_recovered(cfg, job_id)


def restart_postgres(cfg: JobConfig, path: Path, job_id: str) -> None:
    """Crash Postgres (immediate shutdown) mid-stream and start it again."""
    server = PostgresServer(cfg)
    server.down(mode="immediate")
    time.sleep(3)
    server.up()
    wait_recovered(cfg, job_id)


def savepoint_and_resume(cfg: JobConfig, path: Path, job_id: str) -> str:
    """Stop with a savepoint and resubmit from it (the upgrade path); returns the new job id."""
    savepoint = flink_jobs.stop_with_savepoint(cfg, job_id)
    return flink_jobs.submit(cfg, path, savepoint=savepoint)


def run_scenario(e2e_stack, name: str, disrupt: Callable[[JobConfig, Path, str], str | None] | None = None, audit: Callable[[Path, Scenario], None] | None = None) -> None:
    """Play the scenario against a fresh job; ``disrupt`` runs mid-stream and may return a new job id."""
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
    FlinkCluster(cfg).up()  # a TaskManager lost by an earlier scenario is replaced first
    ensure_topics(cfg.kafka.bootstrap_servers, [cfg.kafka.usage_events_topic, cfg.kafka.late_events_topic, cfg.kafka.dead_letter_topic], cfg.kafka.partitions)
    apply_schema(cfg.postgres)
    s: Scenario = build_scenario(EVENTS, cfg.kafka.partitions, seed=hash(name) % 1000)
    bootstrap, topic = cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic
    job_id = flink_jobs.submit(cfg, path)
    try:
        half = len(s.base) // 2
        dups = len(s.duplicates_phase1) // 2
        send_events(bootstrap, topic, s.base[:half] + s.duplicates_phase1[:dups])
        if disrupt is not None:
            wait_for(lambda: flink_jobs.completed_checkpoints(cfg, job_id) >= 2, 120, "two completed checkpoints")
            job_id = disrupt(cfg, path, job_id) or job_id
        send_events(bootstrap, topic, s.base[half:] + s.duplicates_phase1[dups:])
        send_raw(bootstrap, topic, s.bad_records)
        send_events(bootstrap, topic, s.advance, partition_for=lambda i, e: i)
        base_expected = expected_totals(s.base, cfg.event_time.window_size)
        wait_for(lambda: {k: v for k, v in _totals(table_totals(cfg)).items() if k[0] != "clock"} == base_expected, 300, "base windows in Postgres")
        revisions_before = {k: r.revision for k, r in table_totals(cfg).items()}

        send_events(bootstrap, topic, s.within_lateness + s.beyond_lateness + s.duplicates_phase2)
        send_events(bootstrap, topic, s.closers, partition_for=lambda i, e: i)
        expected = expected_totals(s.unique_counted, cfg.event_time.window_size)
        wait_for(lambda: _totals(table_totals(cfg)) == expected, 300, "final totals in Postgres")
        # Every window is closed by now (the closers moved the watermark past end + lateness).
        wait_for(lambda: all(r.is_final for r in table_totals(cfg).values()), 120, "every window marked final")
        wait_for(lambda: len(read_topic(bootstrap, cfg.kafka.late_events_topic, _decode_late)) >= len(s.beyond_lateness), 120, "late events committed")
        time.sleep(2 * cfg.flink.checkpoint_interval.total_seconds())  # anything extra would be committed by now
        late = read_topic(bootstrap, cfg.kafka.late_events_topic, _decode_late)
        dead = read_topic(bootstrap, cfg.kafka.dead_letter_topic, _decode_dead)
        rows = table_totals(cfg)
        if audit is not None:
            audit(path, s)
    finally:
        flink_jobs.cancel(cfg, job_id)

    # Exactly the events beyond the allowed lateness are in the late topic, each once, with the reason.
    assert sorted(r["event_id"] for r in late) == sorted(e["event_id"] for e in s.beyond_lateness)
    lateness = cfg.event_time.allowed_lateness
    for r in late:
        assert r["window_end"] - r["window_start"] == cfg.event_time.window_size
        assert r["window_start"] <= r["event_time"] < r["window_end"]
        assert r["watermark"] >= r["window_end"] - timedelta(milliseconds=1) + lateness
        assert r["lateness_ms"] == (r["watermark"] - r["event_time"]) // timedelta(milliseconds=1)
    # Every bad record is in the dead-letter topic once, raw bytes intact, with a reason; the job kept running.
    assert sorted(r["payload"] for r in dead) == sorted(s.bad_records)
    assert all(r["reason"] and r["source_topic"] == topic for r in dead)
    # Accounting identity: every record sent is counted once, late, a duplicate, or a dead letter.
    unique_ids = {e["event_id"] for e in s.all_sent if e["tenant_id"] != "watermark-closer"}
    counted = sum(r.event_count for r in rows.values())
    duplicates = len(s.all_sent) - len({e["event_id"] for e in s.all_sent})
    assert counted + len(late) == len(unique_ids)
    assert counted == len(s.unique_counted)
    assert counted + len(late) + duplicates + len(dead) + len(s.closers) == len(s.all_sent) + len(s.bad_records)
    # Windows updated within the allowed lateness moved to a higher revision, in place.
    updated = {(e["tenant_id"], e["customer_id"], e["meter"]) for e in s.within_lateness}
    bumped = [k for k in rows if k[:3] in updated and k[3] == s.start.replace(tzinfo=None) + timedelta(seconds=50)]
    assert bumped and all(rows[k].revision > revisions_before.get(k, 0) for k in bumped)
    # The final row of each window is the complete one: revision = events counted.
    assert all(r.is_final and r.revision == r.event_count for r in rows.values())


def audit_late_topic(path: Path, s: Scenario) -> None:
    """`meterflow late-audit` on the real late topic reports exactly the scenario's late events."""
    import json

    from click.testing import CliRunner

    from meterflow.cli import cli

    histogram = path.parent / "lateness.png"
    result = CliRunner().invoke(cli, ["--config", str(path), "late-audit", "--by", "customer", "--format", "json", "--histogram", str(histogram)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sum(r["count"] for r in report) == len(s.beyond_lateness)
    assert sum(Decimal(r["quantity"]) for r in report) == sum(e["quantity"] for e in s.beyond_lateness)
    assert all(r["lateness_p50_ms"] <= r["lateness_p90_ms"] <= r["lateness_max_ms"] for r in report)
    assert histogram.read_bytes()[:4] == b"\x89PNG"
    one = s.beyond_lateness[0]["tenant_id"]
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
