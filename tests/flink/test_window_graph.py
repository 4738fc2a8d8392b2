"""The job's SQL graph in a local environment: derived source columns + watermark + window aggregate."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from connectors.avro_types import derive_columns, load_schema
from jobs.plan import USAGE_SOURCE_TABLE, sql_interval, window_aggregate_query
from jobs.windowing import window_bounds
from meterflow.config import load_config
from meterflow.producer import SyntheticSpec, synthetic_events

pytestmark = [pytest.mark.flink, pytest.mark.slow]


def _json_line(event) -> str:
    # Decimal written as a bare JSON number so the quantity is parsed exactly, never via float.
    dims = ",".join(f'"{k}":"{v}"' for k, v in event["dimensions"].items())
    ts = event["event_time"].strftime("%Y-%m-%d %H:%M:%S.") + f"{event['event_time'].microsecond // 1000:03d}"
    return (
        f'{{"event_id":"{event["event_id"]}","tenant_id":"{event["tenant_id"]}","customer_id":"{event["customer_id"]}",'
        f'"meter":"{event["meter"]}","quantity":{event["quantity"]},"event_time":"{ts}","dimensions":{{{dims}}}}}'
    )


def test_window_totals_equal_oracle(table_env, tmp_path, write_config):
    """Every (tenant, customer, meter, window) total from the job's SQL equals an independent sum."""
    cfg = load_config(write_config("event_time:\n  window_size: 1m\n  watermark_delay: 2s\n"), environ={})
    spec = SyntheticSpec(count=4000, tenants=3, customers=4, start=datetime(2026, 5, 1, 12, 0, tzinfo=UTC), span=timedelta(minutes=7), seed=11)
    events = list(synthetic_events(spec))
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "part-0.json").write_text("\n".join(_json_line(e) for e in events) + "\n")

    table_env.execute_sql(f"DROP TEMPORARY TABLE IF EXISTS `{USAGE_SOURCE_TABLE}`")
    table_env.execute_sql(f"DROP TEMPORARY VIEW IF EXISTS `{USAGE_SOURCE_TABLE}`")
    # Same derived columns and watermark as the job's decoded source, read from a bounded file.
    cols = ", ".join(c.ddl() for c in derive_columns(load_schema()))
    table_env.execute_sql(
        f"CREATE TEMPORARY TABLE `{USAGE_SOURCE_TABLE}` ({cols}, "
        f"WATERMARK FOR `event_time` AS `event_time` - {sql_interval(cfg.event_time.watermark_delay)}) "
        f"WITH ('connector' = 'filesystem', 'path' = '{tmp_path / 'events'}', 'format' = 'json')"
    )
    with table_env.execute_sql(window_aggregate_query(cfg)).collect() as results:
        got = {(r[0], r[1], r[2], r[3]): (r[5], r[6], r[7]) for r in results}

    expected: dict = defaultdict(lambda: [Decimal(0), 0])
    for e in events:
        start, _ = window_bounds(e["event_time"], cfg.event_time.window_size)
        acc = expected[(e["tenant_id"], e["customer_id"], e["meter"], start.replace(tzinfo=None))]
        acc[0] += e["quantity"]
        acc[1] += 1
    assert len(got) == len(expected) > 50
    for key, (quantity, count) in expected.items():
        assert got[key] == (quantity, count, count), key
    assert all(isinstance(v[0], Decimal) for v in got.values())
