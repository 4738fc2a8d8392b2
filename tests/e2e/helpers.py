"""Helpers for end-to-end tests: an independent oracle, closing events, waiting on Postgres."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from connectors.avro_codec import UsageEvent
from meterflow.config import JobConfig
from meterflow.windowing import window_bounds
from sinks.postgres import UsageRow, fetch_usage

CLOSER_TENANT = "watermark-closer"


def private_job(stack, name: str, **sections: dict) -> tuple[JobConfig, Path]:
    """A job config of its own on the session stack: its own topics (created), consumer group, usage
    table and job name, so tests never read each other's records. ``sections`` update the base config."""
    from connectors.kafka_admin import ensure_project_topics

    run = uuid.uuid4().hex[:6]
    kafka = {
        **stack.base["kafka"],
        "usage_events_topic": f"in-{name}-{run}",
        "late_events_topic": f"late-{name}-{run}",
        "dead_letter_topic": f"dead-{name}-{run}",
        "closed_windows_topic": f"closed-{name}-{run}",
        "consumer_group": f"g-{name}-{run}",
        **sections.pop("kafka", {}),
    }
    postgres = {**stack.base["postgres"], "usage_table": f"usage_{name}_{run}", **sections.pop("postgres", {})}
    flink = {**stack.base["flink"], "job_name": f"mf-{name}-{run}", **sections.pop("flink", {})}
    cfg, path = stack.config(f"{name}-{run}", kafka=kafka, postgres=postgres, flink=flink, **sections)
    ensure_project_topics(cfg)  # with the configs `meterflow stack up` gives them
    return cfg, path


def kill_taskmanagers(cfg: JobConfig) -> int:
    """kill -9 every TaskManager of the stack with its Python workers, as when its machine or container
    is lost; returns when (epoch ms). The stack's supervisor starts the replacement (``replaced_after``).

    Killing the JVM alone leaves its Python workers running until they notice: for a few seconds they
    may finish the calls they had in flight and record them (sinks/ledger_schema: ``sent`` is final),
    so what the restarted job must send again would depend on that race.
    """
    from meterflow.local.base import process_tree
    from meterflow.local.flink import FlinkCluster

    killed_at = int(time.time() * 1000)
    pids = FlinkCluster(cfg).taskmanager_pids()
    assert pids, "no TaskManager process found"
    for pid in [p for tm in pids for p in process_tree(tm)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return killed_at


def send_raw(bootstrap: str, topic: str, payloads: list[bytes], partition: int | None = None) -> None:
    """Send raw message values, valid Avro or not, to ``partition`` (None: the producer's choice)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for payload in payloads:
            producer.send(topic, payload, partition=partition).get(timeout=30)
    finally:
        producer.close()


def expected_totals(events: list[UsageEvent], size: timedelta) -> dict[tuple, tuple[Decimal, int]]:
    """Sum and count per (tenant, customer, meter, window start) computed in plain Python."""
    acc: dict[tuple, list] = defaultdict(lambda: [Decimal(0), 0])
    for e in events:
        start, _ = window_bounds(e["event_time"], size)
        key = (e["tenant_id"], e["customer_id"], e["meter"], start.replace(tzinfo=None))
        acc[key][0] += e["quantity"]
        acc[key][1] += 1
    return {k: (v[0], v[1]) for k, v in acc.items()}


def closing_events(after: datetime, partitions: int) -> list[UsageEvent]:
    """One event per partition well after ``after``: moves every partition's watermark past the data.

    Never dated in the future: the job rejects events dated ahead of their Kafka timestamp.
    """
    at = min(after + timedelta(hours=1), datetime.now(UTC))
    return [
        UsageEvent(
            event_id=f"closer-{after.timestamp()}-{p}",
            tenant_id=CLOSER_TENANT,
            customer_id=f"p{p}",
            meter="api_calls",
            quantity=Decimal(1),
            event_time=at,
            dimensions={},
        )
        for p in range(partitions)
    ]


def table_totals(cfg: JobConfig) -> dict[tuple, UsageRow]:
    """Postgres rows keyed like the oracle (meters without group-by dimensions), without the closer tenant."""
    return {
        (r.tenant_id, r.customer_id, r.meter, r.window_start): r
        for r in fetch_usage(cfg.postgres)
        if r.tenant_id != CLOSER_TENANT
    }


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll until the condition holds or fail with a message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_topic(bootstrap_servers: str, topic: str, decode: Callable[[bytes], dict], timeout: float = 60) -> list[dict]:
    """Every committed record of a topic (read_committed), decoded."""
    from connectors.kafka_reader import read_committed

    return list(read_committed(bootstrap_servers, topic, decode, timeout=timeout))


def publish_avro(cfg: JobConfig, topic: str, schema_path: Path, records: list[dict]) -> None:
    """Write records with one of the project's Avro schemas to a topic, keyed by tenant/customer, as the usage job would."""
    import io

    import fastavro
    from kafka import KafkaProducer

    from connectors.avro_types import load_schema

    schema = fastavro.parse_schema(load_schema(schema_path))
    producer = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all")
    try:
        for r in records:
            out = io.BytesIO()
            fastavro.schemaless_writer(out, schema, r)
            producer.send(topic, out.getvalue(), key=f"{r['tenant_id']}/{r['customer_id']}".encode())
        producer.flush()
    finally:
        producer.close()


def publish_closed_windows(cfg: JobConfig, windows: list[dict]) -> None:
    """Write closed-window records (avro/closed_window.avsc) to the closed-windows topic, as the usage job or a reprocessing would."""
    from jobs.plan import CLOSED_WINDOW_SCHEMA

    publish_avro(cfg, cfg.kafka.closed_windows_topic, CLOSED_WINDOW_SCHEMA, windows)


def publish_late_events(cfg: JobConfig, records: list[dict]) -> None:
    """Write late-event records (avro/late_usage_event.avsc) to the late-events topic, as the usage job would."""
    from jobs.plan import LATE_EVENT_SCHEMA

    publish_avro(cfg, cfg.kafka.late_events_topic, LATE_EVENT_SCHEMA, records)


def late_event_record(
    tenant: str, event_id: str, customer: str, meter: str, quantity: str, window_start: datetime, size: timedelta
) -> dict:
    """A late-events record (avro/late_usage_event.avsc) as the usage job writes it, one second into its window."""
    now = datetime.now(UTC)
    return {
        "event_id": event_id,
        "tenant_id": tenant,
        "customer_id": customer,
        "meter": meter,
        "quantity": Decimal(quantity),
        "event_time": window_start + timedelta(seconds=1),
        "dimensions": {},
        "window_start": window_start,
        "window_end": window_start + size,
        "watermark": now,
        "lateness_ms": int((now - window_start).total_seconds() * 1000),
        "seen_at": now,
    }


def write_final_rows(cfg: JobConfig, windows: list[dict]) -> None:
    """Final rows in the usage table for windows published straight to the topic (what reconcile and corrections read)."""
    from sinks.postgres import connect
    from sinks.postgres_schema import USAGE_KEY_COLUMNS

    sql = (
        f"INSERT INTO {cfg.postgres.usage_table} (tenant_id, customer_id, meter, dimensions_key, window_start, window_end, quantity, event_count, revision, is_final) "
        f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, true) ON CONFLICT ({', '.join(USAGE_KEY_COLUMNS)}) "
        "DO UPDATE SET quantity = EXCLUDED.quantity, event_count = EXCLUDED.event_count, revision = EXCLUDED.revision"
    )
    with connect(cfg.postgres) as conn, conn.transaction():
        for w in windows:
            conn.execute(
                sql,
                (
                    w["tenant_id"],
                    w["customer_id"],
                    w["meter"],
                    "{}",
                    w["window_start"].replace(tzinfo=None),
                    w["window_end"].replace(tzinfo=None),
                    w["quantity"],
                    w["event_count"],
                    w["revision"],
                ),
            )


def closed_window(
    tenant: str, customer: str, meter: str, start: datetime, size: timedelta, quantity: str, revision: int
) -> dict:
    """One closed-window record."""
    return {
        "tenant_id": tenant,
        "customer_id": customer,
        "meter": meter,
        "dimensions_key": "{}",
        "window_start": start,
        "window_end": start + size,
        "quantity": Decimal(quantity),
        "event_count": revision,
        "revision": revision,
    }


def wait_restarted(cfg: JobConfig, job_id: str, since_ms: int) -> None:
    """Wait until the job restarted after ``since_ms`` (epoch ms) and every task runs again."""
    from meterflow.local.flink_jobs import job_details

    wait_for(lambda: job_details(cfg, job_id)["timestamps"].get("RESTARTING", 0) > since_ms, 120, "the job to restart")
    wait_recovered(cfg, job_id)


def wait_recovered(cfg: JobConfig, job_id: str, timeout: float = 300) -> None:
    """Wait until every task runs again. Nothing is started behind the test's back: a TaskManager
    that did not survive the fault fails the test."""
    from meterflow.local.flink_jobs import job_details

    def running() -> bool:
        details = job_details(cfg, job_id)
        return details["state"] == "RUNNING" and all(v["status"] == "RUNNING" for v in details.get("vertices", []))

    wait_for(running, timeout, f"job {job_id} to run again")


def replacements_so_far(cfg: JobConfig) -> int:
    """How many lost TaskManagers the stack's supervisor has replaced, from its log."""
    from meterflow.local.flink import FlinkCluster
    from meterflow.local.supervisor_log import replacements

    return len(replacements(FlinkCluster(cfg).supervisor_log))


def replaced_after(cfg: JobConfig, before: int, killed_at_ms: int) -> None:
    """Wait until the stack's supervisor has logged one more replacement than ``before``, and check it
    waited stack.taskmanager_restart_delay after the kill (the log has whole seconds)."""
    from meterflow.local.flink import FlinkCluster
    from meterflow.local.supervisor_log import replacements

    delay = cfg.stack.taskmanager_restart_delay.total_seconds()
    log = FlinkCluster(cfg).supervisor_log
    wait_for(lambda: len(replacements(log)) > before, delay + 60, "the stack's supervisor to replace the TaskManager")
    replaced_at = replacements(log)[before].timestamp()
    assert replaced_at + 1 >= killed_at_ms / 1000 + delay, "the replacement waited stack.taskmanager_restart_delay"


def restored_before(stats: dict, killed_at_ms: int) -> dict:
    """The checkpoint a job restored (its REST checkpoint statistics), asserted to be one triggered before ``killed_at_ms``."""
    restored = (stats.get("latest") or {}).get("restored") or {}
    triggered = {c["id"]: c["trigger_timestamp"] for c in stats.get("history", [])}
    assert restored.get("id") is not None, ("no restore in the checkpoint statistics", stats.get("latest"))
    assert triggered.get(restored["id"], 0) < killed_at_ms, (
        "restored from a checkpoint taken before the kill",
        restored,
    )
    return restored


def kill_with_calls_in_flight(
    cfg: JobConfig, job_id: str, fake: Any, calls: int, timeout: float
) -> tuple[set[str], int]:
    """Once the fake provider holds ``calls`` unanswered calls: kill -9 the TaskManager, make the fake
    fast, and wait for the stack's supervisor to start a new TaskManager and the job to restart.
    Returns the identifiers in flight at the kill and the kill's epoch ms."""
    wait_for(lambda: fake.in_flight >= calls, timeout, "calls in flight")
    in_flight = fake.unanswered()
    before = replacements_so_far(cfg)
    killed_at = kill_taskmanagers(cfg)
    fake.latency = 0.05
    replaced_after(cfg, before, killed_at)
    wait_restarted(cfg, job_id, killed_at)
    return in_flight, killed_at


def send_large(bootstrap: str, topic: str, value: bytes) -> None:
    """One value, on a producer of its own that does not refuse what the broker would take: the
    broker judges the size. Its own, as kafka-python's (idempotent) producer fails every later send
    of the same producer once the broker has refused one as too large."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2 * len(value) + 4096)
    try:
        producer.send(topic, value).get(timeout=60)
    finally:
        producer.close()


def largest_accepted_value(bootstrap: str, topic: str, limit: int) -> bytes:
    """The largest value of non-Avro bytes the topic accepts, found by sending sizes down from ``limit``
    until the broker takes one: its max.message.bytes less the record batch's overhead."""
    from kafka.errors import MessageSizeTooLargeError

    for size in range(limit, limit - 1024, -1):
        value = b"\xff" * size
        try:
            send_large(bootstrap, topic, value)
            return value
        except MessageSizeTooLargeError:
            continue
    raise AssertionError(f"{topic} accepted no value within 1 KB of {limit} bytes")


def vertex_input_watermark(cfg: JobConfig, job_id: str, name_contains: str) -> int | None:
    """The lowest current input watermark (epoch ms) over the subtasks of the job's vertex whose name
    contains ``name_contains``, from the REST API; None before every subtask has one."""
    from meterflow.local.flink_jobs import job_details, rest

    vertex = next(v for v in job_details(cfg, job_id)["vertices"] if name_contains in v["name"])
    marks = [
        int(m["value"])
        for m in rest(cfg, f"/jobs/{job_id}/vertices/{vertex['id']}/watermarks")
        if m["id"].endswith(".currentInputWatermark")
    ]
    # Long.MIN_VALUE until a subtask saw a watermark.
    return min(marks) if marks and min(marks) > -(2**62) else None


def wait_watermark(
    cfg: JobConfig, job_id: str, at_least_ms: int, name_contains: str = "close windows", timeout: float = 300
) -> None:
    """Wait until every subtask of the vertex (default: the window closer) has an input watermark of at least ``at_least_ms``."""
    wait_for(
        lambda: (vertex_input_watermark(cfg, job_id, name_contains) or -(2**63)) >= at_least_ms,
        timeout,
        f"the watermark at '{name_contains}' to reach {at_least_ms}",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(config_path: Path, log_path: Path) -> Iterator[int]:
    """``meterflow serve`` on ``config_path`` as its own process on a free loopback port, until the block ends."""
    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from meterflow.commands import main; main()", "--config", str(config_path)]
            + ["serve", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2):
                    return True
            except OSError:
                return False

        try:
            wait_for(healthy, 60, "meterflow serve to answer")
            yield port
        finally:
            proc.terminate()
            proc.wait(20)
