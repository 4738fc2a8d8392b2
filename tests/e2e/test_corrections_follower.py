"""The deployment's corrections follower on the real stack: ``meterflow submit`` starts it, late
events become corrections without anyone running a command, a follower killed with late events in
flight is started again by the operator's next ``meterflow submit`` and applies each event once,
and its metrics say it runs and what waits (what waits for a window's final row is unit-tested)."""

from __future__ import annotations

import os
import signal
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner

from connectors.avro_codec import UsageEvent
from connectors.kafka_admin import group_lag
from connectors.producer import send_events
from meterflow.commands import cli
from meterflow.commands.corrections import read_late_events
from meterflow.local import flink_jobs
from meterflow.local.base import free_ports, pid_alive
from meterflow.local.corrections_follower import CorrectionsFollower
from meterflow.windowing import window_bounds
from sinks.postgres import connect
from tests.e2e.helpers import (
    closing_events,
    late_event_record,
    private_job,
    publish_late_events,
    table_totals,
    wait_for,
)

pytestmark = [pytest.mark.e2e]


def _event(event_id: str, customer: str, quantity: str, at: datetime) -> UsageEvent:
    return UsageEvent(
        event_id=event_id,
        tenant_id="t1",
        customer_id=customer,
        meter="tokens",
        quantity=Decimal(quantity),
        event_time=at,
        dimensions={},
    )


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("meterflow_corrections_")
    }


def test_submit_runs_the_corrections_follower_and_a_killed_one_resumes_exactly_once(e2e_stack):
    run = uuid.uuid4().hex[:6]
    [port] = free_ports(1)
    cfg, path = private_job(
        e2e_stack,
        "follow",
        event_time={
            "window_size": "10s",
            "watermark_delay": "2s",
            "allowed_lateness": "0s",
            "source_idle_timeout": "5s",
        },
        corrections={
            "table": f"fol_{run}",
            "events_table": f"fol_{run}_events",
            "offsets_table": f"fol_{run}_offsets",
            "follow_interval": "2s",
            "metrics_port": port,
        },
    )
    follower = CorrectionsFollower(cfg, path)
    size = cfg.event_time.window_size
    a_start, _ = window_bounds(datetime.now(UTC) - timedelta(minutes=30), size)

    def recorded() -> list[tuple[str, int]]:
        with connect(cfg.postgres) as conn:
            return conn.execute(
                f"SELECT event_id, count(*) FROM {cfg.corrections.events_table} GROUP BY event_id ORDER BY event_id"
            ).fetchall()

    submitted = CliRunner().invoke(cli, ["--config", str(path), "submit"], catch_exceptions=False)
    assert submitted.exit_code == 0, submitted.output
    assert "corrections follower started" in submitted.output and follower.running()
    [job] = flink_jobs.running_jobs(cfg, cfg.flink.job_name)
    try:
        on_time = [_event("on-1", "c1", "1.5", a_start + timedelta(seconds=1))]
        send_events(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, on_time)
        wait_for(
            lambda: group_lag(cfg.kafka.bootstrap_servers, cfg.kafka.consumer_group, cfg.kafka.usage_events_topic) == 0,
            300,
            "the on-time event consumed",
        )
        send_events(
            cfg.kafka.bootstrap_servers,
            cfg.kafka.usage_events_topic,
            closing_events(a_start + timedelta(minutes=3), cfg.kafka.partitions),
            partition_for=lambda i, e: i,
        )
        wait_for(
            lambda: [r.is_final for r in table_totals(cfg).values()] == [True], 420, "the window final in Postgres"
        )
        # Late events through the job: the follower records them with nobody running a command.
        send_events(
            cfg.kafka.bootstrap_servers,
            cfg.kafka.usage_events_topic,
            [_event("late-1", "c1", "0.25", a_start + timedelta(seconds=3))],
        )
        wait_for(lambda: recorded() == [("late-1", 1)], 180, "the follower to record the late event")

        # kill -9 with late events in flight: two more for the final window and one for a window
        # no on-time event reached (a correction of its own), written just before and while it is down.
        pid = pid_alive(follower.pid_file)
        publish_late_events(cfg, [late_event_record("t1", "late-2", "c1", "tokens", "0.5", a_start, size)])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not follower.running(), 30, "the follower gone")
        waiting_start = a_start + 5 * size
        publish_late_events(
            cfg,
            [
                late_event_record("t1", "late-3", "c1", "tokens", "0.125", a_start, size),
                late_event_record("t1", "late-w", "c9", "tokens", "7", waiting_start, size),
            ],
        )
        assert len(read_late_events(cfg)) == 4

        # What an operator does next: submit again. The job runs and is left alone; the follower starts again.
        again = CliRunner().invoke(cli, ["--config", str(path), "submit"], catch_exceptions=False)
        assert (
            again.exit_code == 0
            and "already running" in again.output
            and "corrections follower started" in again.output
        ), again.output
        assert [j["jid"] for j in flink_jobs.running_jobs(cfg, cfg.flink.job_name)] == [job["jid"]]
        wait_for(
            lambda: recorded() == [("late-1", 1), ("late-2", 1), ("late-3", 1), ("late-w", 1)],
            180,
            "the restarted follower to record the rest, each once",
        )
        with connect(cfg.postgres) as conn:
            [(delta,)] = conn.execute(
                f"SELECT sum(delta) FROM {cfg.corrections.table} WHERE customer_id = 'c1'"
            ).fetchall()
        assert delta == Decimal("0.875")

        # Its metrics: nothing waits, its last run just ended, and the late topic's retention.
        metrics = _metrics(port)
        assert (
            metrics["meterflow_corrections_waiting_events"],
            metrics["meterflow_corrections_waiting_oldest_age_seconds"],
        ) == (0, 0)
        assert metrics["meterflow_corrections_recorded_total"] == 2, "the restarted follower's own count"
        assert metrics["meterflow_corrections_late_topic_retention_seconds"] == 7 * 24 * 3600, (
            "the broker's default retention"
        )
        assert metrics["meterflow_corrections_last_pass_timestamp_seconds"] > datetime.now(UTC).timestamp() - 60
    finally:
        follower.stop()
        flink_jobs.cancel(cfg, job["jid"])
    assert not follower.running()
