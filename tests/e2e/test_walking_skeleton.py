"""End to end on the real stack: Avro events on Kafka -> job on the Flink cluster -> Postgres totals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from connectors.kafka_admin import group_lag
from connectors.producer import SyntheticSpec, send_events, synthetic_events
from meterflow.local import flink_jobs
from tests.e2e.helpers import closing_events, expected_totals, table_totals, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _totals(rows):
    return {k: (r.quantity, r.event_count) for k, r in rows.items()}


def test_window_totals_in_postgres_and_replay_is_idempotent(e2e_stack):
    """Exact per-window totals reach Postgres; reprocessing the same input leaves every final row untouched."""
    cfg, path = e2e_stack.config("skeleton")
    job_id = flink_jobs.submit(cfg, path)
    try:
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
        events = list(
            synthetic_events(
                SyntheticSpec(count=20_000, tenants=3, customers=7, start=start, span=timedelta(minutes=3), seed=5)
            )
        )
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

    # Replay: a fresh consumer group re-reads the whole topic and recomputes every window. Its rows
    # are committed with the checkpoint that also commits its offsets; final rows never change.
    replay_cfg, replay_path = e2e_stack.config(
        "replay", kafka={**e2e_stack.base["kafka"], "consumer_group": cfg.kafka.consumer_group + "-replay"}
    )
    replay_id = flink_jobs.submit(replay_cfg, replay_path)
    try:
        group = replay_cfg.kafka.consumer_group
        wait_for(
            lambda: group_lag(cfg.kafka.bootstrap_servers, group, cfg.kafka.usage_events_topic) == 0,
            180,
            "the replay to consume and commit the whole topic",
        )
        committed = flink_jobs.completed_checkpoints(replay_cfg, replay_id)
        wait_for(
            lambda: flink_jobs.completed_checkpoints(replay_cfg, replay_id) >= committed + 2,
            60,
            "two more checkpoints of the replay",
        )
        after = table_totals(replay_cfg)
        assert _totals(after) == expected
        assert {k: r.updated_at for k, r in after.items()} == {k: r.updated_at for k, r in first.items()}
    finally:
        flink_jobs.cancel(replay_cfg, replay_id)
