"""End to end on the real stack: Avro events on Kafka -> job on the Flink cluster -> Postgres totals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from meterflow import flink_jobs
from meterflow.producer import SyntheticSpec, send_events, synthetic_events
from meterflow.stack import FlinkCluster
from tests.e2e.helpers import closing_events, expected_totals, table_totals, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _totals(rows):
    return {k: (r.quantity, r.event_count) for k, r in rows.items()}


def test_window_totals_in_postgres_and_replay_is_idempotent(e2e_stack):
    """Exact per-window totals reach Postgres; reprocessing the same input leaves every total unchanged."""
    cfg, path = e2e_stack.config("skeleton")
    FlinkCluster(cfg).up()  # a TaskManager lost by an earlier test is replaced first
    job_id = flink_jobs.submit(cfg, path)
    try:
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
        events = list(synthetic_events(SyntheticSpec(count=20_000, tenants=3, customers=7, start=start, span=timedelta(minutes=3), seed=5)))
        send_events(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, events)
        closers = closing_events(start + timedelta(minutes=3), cfg.kafka.partitions)
        send_events(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, closers, partition_for=lambda i, e: i)
        expected = expected_totals(events, cfg.event_time.window_size)
        assert len(expected) > 300
        wait_for(lambda: _totals(table_totals(cfg)) == expected, 300, "window totals in Postgres")
        wait_for(lambda: all(r.is_final for r in table_totals(cfg).values()), 120, "closed windows marked final")
        first = table_totals(cfg)
        assert all(r.revision == r.event_count for r in first.values())
    finally:
        flink_jobs.cancel(cfg, job_id)

    # Replay: a fresh consumer group re-reads the topic from the start and re-upserts every window.
    replay_cfg, replay_path = e2e_stack.config("replay", kafka={**e2e_stack.base["kafka"], "consumer_group": cfg.kafka.consumer_group + "-replay"})
    replay_started = datetime.now(UTC)
    replay_id = flink_jobs.submit(replay_cfg, replay_path)
    try:
        wait_for(lambda: all(r.updated_at > replay_started for r in table_totals(replay_cfg).values()), 180, "the replay to rewrite every row")
        assert _totals(table_totals(replay_cfg)) == expected
    finally:
        flink_jobs.cancel(replay_cfg, replay_id)

