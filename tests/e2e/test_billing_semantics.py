"""Billing-grade semantics on the real stack, with and without failures mid-stream.

For every scenario: Postgres totals equal the totals computed here from the produced events minus
exactly the events found in the late topic; duplicates are counted once; every unique event is in
exactly one place (a window or the late topic).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import fastavro
import pytest
import yaml

from connectors.avro_types import load_schema
from connectors.producer import send_events
from jobs.plan import DEAD_LETTER_SCHEMA, LATE_EVENT_SCHEMA
from meterflow.config import JobConfig
from meterflow.local import flink_jobs
from meterflow.local.kafka import KafkaBroker
from meterflow.local.postgres import PostgresServer
from sinks.postgres import apply_schema
from tests.e2e.helpers import (
    CLOSER_TENANT,
    expected_totals,
    kill_taskmanagers,
    private_job,
    read_topic,
    replaced_after,
    replacements_so_far,
    send_raw,
    table_totals,
    wait_for,
    wait_recovered,
    wait_restarted,
)
from tests.e2e.scenario import (
    ALLOWED_LATENESS,
    CLOCK_TENANT,
    WATERMARK_DELAY,
    WINDOW,
    Risky,
    Scenario,
    build_scenario,
    close_of,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EVENTS = int(os.environ.get("MF_TEST_E2E_EVENTS", "100000"))
LATE_SCHEMA = fastavro.parse_schema(load_schema(LATE_EVENT_SCHEMA))
DEAD_SCHEMA = fastavro.parse_schema(load_schema(DEAD_LETTER_SCHEMA))


def _decode_late(value: bytes) -> dict:
    return fastavro.schemaless_reader(io.BytesIO(value), LATE_SCHEMA)


def _decode_dead(value: bytes) -> dict:
    return fastavro.schemaless_reader(io.BytesIO(value), DEAD_SCHEMA)


def _totals(rows: dict) -> dict:
    return {k: (r.quantity, r.event_count) for k, r in rows.items()}


Disruption = Callable[[JobConfig, Path, str, Callable[[], None]], "Fault"]


def _wait_checkpoint_after(cfg: JobConfig, job_id: str, since_ms: int) -> None:
    """Wait until a checkpoint triggered after ``since_ms`` completed (the job makes progress again)."""

    def completed_since() -> bool:
        latest = (flink_jobs.checkpoint_stats(cfg, job_id).get("latest") or {}).get("completed") or {}
        return latest.get("trigger_timestamp", 0) > since_ms

    wait_for(completed_since, 300, "a checkpoint completed after the fault")
    wait_recovered(cfg, job_id)


@dataclass
class Fault:
    """What a disruption did: the job to follow afterwards, when the fault struck, and what proves it hit the job."""

    job_id: str
    struck_at_ms: int
    expected_recovery: (
        str  # "restore-before-risky", "restore-after-fault", "savepoint", "checkpoint-held-back" or "handover"
    )
    ended_at_ms: int | None = None  # when the faulty part was back (the broker outage)


def kill_taskmanager(cfg: JobConfig, path: Path, job_id: str, during: Callable[[], None]) -> Fault:
    """kill -9 every TaskManager; send records; the stack's supervisor starts the replacement
    stack.taskmanager_restart_delay after the kill, and logs it."""
    before = replacements_so_far(cfg)
    killed_at = kill_taskmanagers(cfg)
    during()
    replaced_after(cfg, before, killed_at)
    wait_restarted(cfg, job_id, killed_at)
    # The replacement restores the last checkpoint taken before the risky records arrived: they are read again.
    return Fault(job_id, killed_at, "restore-before-risky")


def restart_kafka(cfg: JobConfig, path: Path, job_id: str, during: Callable[[], None]) -> Fault:
    """Stop the broker mid-stream for longer than a checkpoint may take, start it, send at once.

    The job and its TaskManager must ride through this. Checkpoints cannot commit the Kafka
    transactions while the broker is down: a checkpoint in flight during the outage must fail or
    complete only after the broker is back (or the job restarts); one of these must be seen.
    """
    broker = KafkaBroker(cfg)
    down_at = int(time.time() * 1000)
    broker.down()
    assert not broker.running()
    time.sleep(KAFKA_OUTAGE_S)
    broker.up()
    up_at = int(time.time() * 1000)
    during()
    _wait_checkpoint_after(cfg, job_id, int(time.time() * 1000))
    return Fault(job_id, down_at, "checkpoint-held-back", ended_at_ms=up_at)


def restart_postgres(cfg: JobConfig, path: Path, job_id: str, during: Callable[[], None]) -> Fault:
    """Crash Postgres (immediate shutdown) mid-stream, send records while it is down, start it again.

    The committer cannot write the batch of the checkpoint holding the risky records: the job restarts
    from that checkpoint and commits the batch again (idempotent), on the same TaskManager.
    """
    server = PostgresServer(cfg)
    down_at = int(time.time() * 1000)
    server.down(mode="immediate")
    during()
    time.sleep(3)
    server.up()
    wait_restarted(cfg, job_id, down_at)
    return Fault(job_id, down_at, "restore-after-fault")


def savepoint_and_resume(cfg: JobConfig, path: Path, job_id: str, during: Callable[[], None]) -> Fault:
    """Stop with a savepoint, send records while no job runs, resubmit from it (the upgrade path)."""
    stopped_at = int(time.time() * 1000)
    savepoint = flink_jobs.stop_with_savepoint(cfg, job_id)
    during()
    return Fault(flink_jobs.submit(cfg, path, savepoint=savepoint), stopped_at, "savepoint")


def savepoint_and_rescale(parallelism: int) -> Disruption:
    """Stop with a savepoint at the scenario's parallelism, resubmit at ``parallelism``.

    Keyed state (dedup, windows, the closer's timers) is redistributed by key group; the classifier's
    held watermark (union state) is the maximum over the old subtasks in every new one.
    """

    def rescale(cfg: JobConfig, path: Path, job_id: str, during: Callable[[], None]) -> Fault:
        data = yaml.safe_load(path.read_text())
        data["flink"]["parallelism"] = parallelism
        rescaled = path.with_name(f"{path.stem}-p{parallelism}.yaml")
        rescaled.write_text(yaml.safe_dump(data))
        stopped_at = int(time.time() * 1000)
        savepoint = flink_jobs.stop_with_savepoint(cfg, job_id)
        during()
        new_job = flink_jobs.submit(cfg, rescaled, savepoint=savepoint)
        assert max(v["parallelism"] for v in flink_jobs.job_details(cfg, new_job)["vertices"]) == parallelism
        return Fault(new_job, stopped_at, "savepoint")

    return rescale


KAFKA_OUTAGE_S = 20


@dataclass
class Recovery:
    """What the REST API says about the fault and the restore that followed it."""

    restarts: int
    restored_checkpoint: int | None
    restored_from_savepoint: bool
    restored_before_risky_sent: bool
    restored_after_fault: bool
    checkpoints_failed: int
    checkpoint_held_back: bool  # a checkpoint triggered before the fault ended failed or completed after it

    def proves(self, expected: str) -> bool:
        """True if the REST figures show the fault hit the running job the way ``expected`` says."""
        return {
            "restore-before-risky": self.restored_before_risky_sent and self.restored_after_fault,
            "restore-after-fault": self.restored_after_fault,
            "savepoint": self.restored_from_savepoint,
            "checkpoint-held-back": self.restored_after_fault or self.checkpoint_held_back,
            # A handover starts a job of the other graph from no state: it restores nothing.
            "handover": self.restored_checkpoint is None and not self.restored_from_savepoint,
        }[expected]


def _recovery(cfg: JobConfig, fault: Fault, risky_acked_ms: int) -> Recovery:
    stats = flink_jobs.checkpoint_stats(cfg, fault.job_id)
    restored = (stats.get("latest") or {}).get("restored") or {}
    triggered = {c["id"]: c["trigger_timestamp"] for c in stats.get("history", [])}
    restored_id = restored.get("id")
    before = restored_id is not None and (
        restored.get("is_savepoint") or triggered.get(restored_id, risky_acked_ms) < risky_acked_ms
    )
    after = restored_id is not None and restored.get("restore_timestamp", 0) > fault.struck_at_ms
    failed = int((stats.get("counts") or {}).get("failed", 0))
    held_back = fault.ended_at_ms is not None and any(
        fault.struck_at_ms - 10_000 <= c["trigger_timestamp"] < fault.ended_at_ms
        and (c["status"] == "FAILED" or c.get("latest_ack_timestamp", 0) >= fault.ended_at_ms)
        for c in stats.get("history", [])
    )
    return Recovery(
        flink_jobs.restarts(cfg, fault.job_id),
        restored_id,
        bool(restored.get("is_savepoint")),
        bool(before),
        bool(after),
        failed,
        held_back,
    )


def _send_risky(bootstrap: str, topic: str, risky: Risky) -> int:
    """On-time ones first, then duplicates, bad records and the late ones; returns when all are acknowledged (ms)."""
    send_events(
        bootstrap,
        topic,
        risky.within_lateness + risky.duplicates + risky.boundary + risky.beyond_lateness,
    )
    send_raw(bootstrap, topic, risky.bad_records)
    return int(time.time() * 1000)


def run_scenario(
    e2e_stack,
    name: str,
    disrupt: Disruption | None = None,
    audit: Callable[[Path, Scenario], None] | None = None,
    source_idle_timeout: str = "5s",
    **sections: dict,
) -> None:
    """Play the scenario against a fresh job; ``disrupt`` strikes with risky records in flight and sends more during the fault.
    ``sections`` update the job's config (not its event_time, which the scenario's oracle assumes, but
    for the source idle timeout: the scenario's closing records reach every partition).

    The idle timeout is shorter than the 10 s default and than a restore on this machine takes to
    start reading (about 6 s): a restored split that has not delivered yet, or is still reading its
    backlog, must keep holding the watermark (docs/operations.md, "How time moves", after a restore)."""
    cfg, path = private_job(
        e2e_stack,
        name,
        event_time={
            "window_size": "10s",
            "watermark_delay": "2s",
            "allowed_lateness": "10s",
            "source_idle_timeout": source_idle_timeout,
        },
        **sections,
    )
    assert (cfg.event_time.window_size, cfg.event_time.watermark_delay, cfg.event_time.allowed_lateness) == (
        WINDOW,
        WATERMARK_DELAY,
        ALLOWED_LATENESS,
    )
    apply_schema(cfg.postgres)
    s: Scenario = build_scenario(EVENTS, cfg.kafka.partitions, seed=hash(name) % 1000)
    bootstrap, topic = cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic
    size = cfg.event_time.window_size
    w1_start = s.start.replace(tzinfo=None) + size
    job_id = flink_jobs.submit(cfg, path)
    recovery: Recovery | None = None
    fault: Fault | None = None
    try:
        send_events(bootstrap, topic, s.base_first + s.duplicates_first)
        send_events(bootstrap, topic, s.advance_first, partition_for=lambda i, e: i)
        # W1 final in Postgres: a completed checkpoint holds a watermark exactly at W1's close.
        first_expected = {k: v for k, v in expected_totals(s.base_first, size).items() if k[3] <= w1_start}
        wait_for(
            lambda: (
                {
                    k: (r.quantity, r.event_count)
                    for k, r in table_totals(cfg).items()
                    if k[3] <= w1_start and r.is_final
                }
                == first_expected
            ),
            300,
            "W0 and W1 final in Postgres",
        )
        risky_acked_ms = _send_risky(bootstrap, topic, s.risky_before)
        if disrupt is not None:
            fault = disrupt(cfg, path, job_id, lambda: _send_risky(bootstrap, topic, s.risky_during))
            job_id = fault.job_id
            recovery = _recovery(cfg, fault, risky_acked_ms)
        else:
            _send_risky(bootstrap, topic, s.risky_during)
        # The risky records of both phases are decided before the watermark may move on.
        early_late = len(
            s.risky_before.beyond_lateness
            + s.risky_before.boundary
            + s.risky_during.beyond_lateness
            + s.risky_during.boundary
        )
        wait_for(
            lambda: len(read_topic(bootstrap, cfg.kafka.late_events_topic, _decode_late)) >= early_late,
            300,
            "late events of the fault's phases committed",
        )
        w2 = expected_totals(
            s.base_first + s.risky_before.within_lateness + s.risky_during.within_lateness,
            size,
        )
        w2 = {k: v for k, v in w2.items() if k[3] == w1_start + size}
        wait_for(
            lambda: all(_totals(table_totals(cfg)).get(k) == v for k, v in w2.items()),
            300,
            "within-lateness events of the fault's phases counted",
        )

        send_events(bootstrap, topic, s.base_second + s.duplicates_second)
        send_events(bootstrap, topic, s.advance_second, partition_for=lambda i, e: i)
        base_expected = expected_totals(
            s.base + s.risky_before.within_lateness + s.risky_during.within_lateness,
            size,
        )
        wait_for(
            lambda: {k: v for k, v in _totals(table_totals(cfg)).items() if k[0] != CLOCK_TENANT} == base_expected,
            300,
            "base windows in Postgres",
        )
        _send_risky(bootstrap, topic, s.risky_after)
        send_events(bootstrap, topic, s.closers, partition_for=lambda i, e: i)
        expected = expected_totals(s.unique_counted, size)
        wait_for(
            lambda: _totals(table_totals(cfg)) == expected,
            300,
            "final totals in Postgres",
        )
        # Every window is closed by now (the closers moved the watermark past end + lateness).
        wait_for(
            lambda: all(r.is_final for r in table_totals(cfg).values()),
            120,
            "every window marked final",
        )
        wait_for(
            lambda: len(read_topic(bootstrap, cfg.kafka.late_events_topic, _decode_late)) >= len(s.late),
            120,
            "late events committed",
        )
        time.sleep(2 * cfg.flink.checkpoint_interval.total_seconds())  # anything extra would be committed by now
        late = read_topic(bootstrap, cfg.kafka.late_events_topic, _decode_late)
        dead = read_topic(bootstrap, cfg.kafka.dead_letter_topic, _decode_dead)
        rows = table_totals(cfg)
        # Without a fault the job never restarts (a commit conflict between the sinks would show here).
        restarted_at = flink_jobs.job_details(cfg, job_id)["timestamps"].get("RESTARTING", 0)
        if audit is not None:
            audit(path, s)
    finally:
        flink_jobs.cancel(cfg, job_id)

    if fault is None:
        assert restarted_at == 0, "the job restarted although no fault was injected"
    if fault is not None:
        # The fault hit work in flight, and the REST API shows the job felt it: a restore after the fault
        # (from a checkpoint taken before the risky records, for a TaskManager kill), the savepoint, or
        # for a broker outage a checkpoint it held back. (Flink's numRestarts read 0 after a
        # TaskManager kill that did restore: it is reported, not asserted.)
        assert recovery is not None and recovery.proves(fault.expected_recovery), (
            fault,
            recovery,
        )
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
    failed = recovery.checkpoints_failed if recovery else 0
    held = recovery.checkpoint_held_back if recovery else False
    restored = recovery.restored_checkpoint if recovery else None
    print(
        f"\nFAILOVER scenario={name} restarts={restarts} restored_checkpoint={restored} checkpoints_failed={failed} checkpoint_held_back={held} sent={len(s.all_sent) + len(s.bad_records)} "
        f"counted={counted} late={len(late)} boundary={len(s.boundary)} duplicates={duplicates} dead_letters={len(dead)} windows={len(rows)}"
    )


def audit_late_topic(path: Path, s: Scenario) -> None:
    """`meterflow late-audit` on the real late topic reports exactly the scenario's late events."""
    import json

    from click.testing import CliRunner

    from meterflow.commands import cli

    histogram = path.parent / "lateness.png"
    result = CliRunner().invoke(
        cli,
        [
            "--config",
            str(path),
            "late-audit",
            "--by",
            "customer",
            "--format",
            "json",
            "--histogram",
            str(histogram),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sum(r["count"] for r in report) == len(s.late)
    assert sum(Decimal(r["quantity"]) for r in report) == sum(e["quantity"] for e in s.late)
    assert all(r["lateness_p50_ms"] <= r["lateness_p90_ms"] <= r["lateness_max_ms"] for r in report)
    assert histogram.read_bytes()[:4] == b"\x89PNG"
    one = s.late[0]["tenant_id"]
    result = CliRunner().invoke(
        cli,
        [
            "--config",
            str(path),
            "late-audit",
            "--tenant",
            one,
            "--by",
            "tenant",
            "--format",
            "csv",
        ],
    )
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


@pytest.mark.parametrize("parallelism", [1, 4])
def test_savepoint_and_resume_at_another_parallelism(e2e_stack, parallelism):
    """Stop with a savepoint at parallelism 2, resume at 1 and at 4: nothing lost or repeated."""
    run_scenario(e2e_stack, f"rescale{parallelism}", disrupt=savepoint_and_rescale(parallelism))
