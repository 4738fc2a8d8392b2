"""The two-stage graph's parameters from the config: the SQL graph's rules, each meter's aggregation, the retention."""

from __future__ import annotations

from datetime import timedelta

from jobs.guard_plan import GUARD_INPUT_COLUMNS
from jobs.stages_plan import MIN_CLOSED_RETENTION, STAGE_INPUT_COLUMNS, closed_retention, stage_parameters
from meterflow.config import load_config

METERS = """
event_time:
  window_size: 5m
  allowed_lateness: 30s
  early_fire_interval: 10s
  dedup_horizon: 2d
flink:
  checkpoint_interval: 3s
meters:
  - name: tokens
  - name: peak
    aggregation: MAX
  - name: users
    aggregation: UNIQUE_COUNT
    unique_dimension: user
"""


def test_the_stages_take_the_windows_lateness_horizon_and_each_meters_aggregation(write_config):
    p = stage_parameters(load_config(write_config(METERS), environ={}))
    assert (p.window_size_ms, p.allowed_lateness_ms, p.dedup_horizon_ms) == (300_000, 30_000, 2 * 86_400_000)
    assert p.aggregations == {"tokens": "SUM", "peak": "MAX", "users": "UNIQUE_COUNT"}
    assert p.unique_dimensions == {"users": "user"}
    assert (p.early_fire_ms, p.late_arrival_hold_ms) == (10_000, 3_000)
    assert p.retain_closed_ms > p.late_arrival_hold_ms


def test_a_closed_window_outlasts_the_sources_idle_and_catch_up_timeouts_and_the_hold(write_config):
    short = load_config(write_config(""), environ={})
    assert closed_retention(short) == MIN_CLOSED_RETENTION + timedelta(seconds=5)
    slow = load_config(
        write_config("event_time:\n  source_idle_timeout: 5m\n  source_catch_up_timeout: 10m\n"), environ={}
    )
    assert closed_retention(slow) == timedelta(minutes=30, seconds=5)
    # The second stage refuses a retention no longer than the hold: a long checkpoint interval still starts.
    hourly = stage_parameters(load_config(write_config("flink:\n  checkpoint_interval: 1h\n"), environ={}))
    assert hourly.retain_closed_ms > hourly.late_arrival_hold_ms == 3_600_000


def test_the_stages_read_their_columns_from_the_guards_output():
    # The guard's output goes straight to the stages (jvm/ CountedOrRejected finds the columns by name).
    assert set(STAGE_INPUT_COLUMNS) <= set(GUARD_INPUT_COLUMNS)
    assert "reject_reason" in GUARD_INPUT_COLUMNS
