"""The job's SQL graph in a local environment: derived source columns + watermark + window aggregate."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from connectors.avro_types import derive_columns, load_schema
from connectors.producer import SyntheticSpec, synthetic_events
from jobs.plan import USAGE_SOURCE_TABLE, sql_interval, window_aggregate_query
from jobs.source_plan import FORMAT_DIMENSIONS_KEY, dimensions_key_column
from meterflow.config import load_config
from meterflow.corrections import dimensions_key
from meterflow.windowing import window_bounds

pytestmark = [pytest.mark.flink, pytest.mark.slow]


def _json_line(event, key: str) -> str:
    # Decimal written as a bare JSON number so the quantity is parsed exactly, never via float.
    dims = ",".join(f'"{k}":"{v}"' for k, v in event["dimensions"].items())
    ts = event["event_time"].strftime("%Y-%m-%d %H:%M:%S.") + f"{event['event_time'].microsecond // 1000:03d}"
    return (
        f'{{"event_id":"{event["event_id"]}","tenant_id":"{event["tenant_id"]}","customer_id":"{event["customer_id"]}",'
        f'"meter":"{event["meter"]}","quantity":{event["quantity"]},"event_time":"{ts}","dimensions":{{{dims}}},'
        f'"{FORMAT_DIMENSIONS_KEY}":{json.dumps(key)}}}'
    )


def _load_events(table_env, cfg, events, directory) -> None:
    """A bounded file table with the job's derived columns and watermark, holding ``events``, each with
    its group-by key in the format's column: Python's ``dimensions_key`` (meterflow/corrections.py),
    whose bytes the format's key has (tests/unit/test_dimensions_key_cases.py)."""
    directory.mkdir()
    group_by = {m.name: m.group_by for m in cfg.meters}
    lines = (_json_line(e, dimensions_key(e["dimensions"], group_by.get(e["meter"], ()))) for e in events)
    (directory / "part-0.json").write_text("\n".join(lines) + "\n")
    table_env.execute_sql(f"DROP TEMPORARY TABLE IF EXISTS `{USAGE_SOURCE_TABLE}`")
    table_env.execute_sql(f"DROP TEMPORARY VIEW IF EXISTS `{USAGE_SOURCE_TABLE}`")
    cols = ", ".join(c.ddl() for c in derive_columns(load_schema()))
    table_env.execute_sql(
        f"CREATE TEMPORARY TABLE `{USAGE_SOURCE_TABLE}` ({cols}, `{FORMAT_DIMENSIONS_KEY}` STRING NOT NULL, "
        f"WATERMARK FOR `event_time` AS `event_time` - {sql_interval(cfg.event_time.watermark_delay)}) "
        f"WITH ('connector' = 'filesystem', 'path' = '{directory}', 'format' = 'json')"
    )


def test_window_totals_equal_oracle(table_env, tmp_path, write_config):
    """Every (tenant, customer, meter, window) total from the job's SQL equals an independent sum."""
    cfg = load_config(write_config("event_time:\n  window_size: 1m\n  watermark_delay: 2s\n"), environ={})
    spec = SyntheticSpec(
        count=4000,
        tenants=3,
        customers=4,
        start=datetime(2026, 5, 1, 12, 0, tzinfo=UTC),
        span=timedelta(minutes=7),
        seed=11,
    )
    events = list(synthetic_events(spec))
    _load_events(table_env, cfg, events, tmp_path / "events")
    keyed = f"SELECT *, {dimensions_key_column(cfg)} AS `dimensions_key` FROM `{USAGE_SOURCE_TABLE}`"
    table_env.execute_sql("DROP TEMPORARY VIEW IF EXISTS `keyed_events`")
    table_env.create_temporary_view("keyed_events", table_env.sql_query(keyed))
    with table_env.execute_sql(window_aggregate_query(cfg, "keyed_events")).collect() as results:
        got = {(r[0], r[1], r[2], r[4]): (r[6], r[7], r[8]) for r in results}

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


METERS_YAML = """
event_time:
  window_size: 1m
  watermark_delay: 2s
meters:
  - name: tokens
    group_by: [model, region]
  - name: api_calls
    aggregation: COUNT
  - name: peak_connections
    aggregation: MAX
  - name: storage_gb
    aggregation: LATEST
  - name: active_users
    aggregation: UNIQUE_COUNT
    unique_dimension: user
"""


def _oracle(meter, events):
    if meter == "tokens":
        return sum((e["quantity"] for e in events), Decimal(0))
    if meter == "api_calls":
        return Decimal(len(events))
    if meter == "peak_connections":
        return max(e["quantity"] for e in events)
    if meter == "storage_gb":
        return max(events, key=lambda e: (e["event_time"], e["event_id"]))["quantity"]
    return Decimal(len({e["dimensions"]["user"] for e in events}))


def _meter_events() -> list[dict]:
    """3,000 events over the five aggregations, sorted by event time, with LATEST ties at a window's last millisecond."""
    import random

    rng = random.Random(5)
    start = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    meters = ["tokens", "api_calls", "peak_connections", "storage_gb", "active_users"]
    events = []
    for i in range(3000):
        meter = meters[i % len(meters)]
        dims = {"model": rng.choice(["a", "b"]), "user": f"u{rng.randrange(40)}"}
        if rng.random() < 0.8:
            dims["region"] = rng.choice(["eu", "us"])  # sometimes missing: groups under ""
        at = start + timedelta(milliseconds=rng.randrange(180_000))
        # Some ids hold the characters an encoding of the LATEST tie-break could trip on.
        event_id = f"e|{i}|" if i % 7 == 0 else (f"e{i // 10}" + "|" * (i % 3) if i % 11 == 0 else f"e{i}")
        events.append(
            {
                "event_id": event_id,
                "tenant_id": "t",
                "customer_id": f"c{rng.randrange(3)}",
                "meter": meter,
                "quantity": Decimal(rng.randint(1, 10_000)).scaleb(-2),
                "event_time": at,
                "dimensions": dims,
            }
        )
    # LATEST ties at the window's last millisecond: the greatest id wins, "tie|b" > "tie|" > "tie".
    for event_id, quantity in (("tie|b", "7"), ("tie", "5"), ("tie|", "6")):
        events.append(
            {
                "event_id": event_id,
                "tenant_id": "t",
                "customer_id": "c0",
                "meter": "storage_gb",
                "quantity": Decimal(quantity),
                "event_time": _LAST,
                "dimensions": {},
            }
        )
    events.sort(key=lambda e: e["event_time"])
    return events


_LAST = datetime(2026, 5, 1, 12, 0, tzinfo=UTC) + timedelta(milliseconds=59_999)


def _assert_each_meter(got: dict, events: list[dict]) -> None:
    """``got`` maps (customer, meter, dimensions key, window start) to (quantity, event count); each equals the oracle."""
    import json

    groups = defaultdict(list)
    for e in events:
        dims = {d: e["dimensions"].get(d, "") for d in ("model", "region")} if e["meter"] == "tokens" else None
        key = (
            e["customer_id"],
            e["meter"],
            dims and json.dumps(dims, sort_keys=True, separators=(",", ":")),
            window_bounds(e["event_time"], timedelta(minutes=1))[0].replace(tzinfo=None),
        )
        groups[key].append(e)
    assert len(got) == len(groups)
    canonical = {
        (
            k[0],
            k[1],
            None if k[2] == "{}" else json.dumps(json.loads(k[2]), sort_keys=True, separators=(",", ":")),
            k[3],
        ): v
        for k, v in got.items()
    }
    for (customer, meter, dims, start_), members in groups.items():
        quantity, count = canonical[(customer, meter, dims, start_)]
        assert quantity == _oracle(meter, members), (customer, meter, dims, start_)
        assert count == len(members)
    assert canonical[("c0", "storage_gb", None, _LAST.replace(tzinfo=None, microsecond=0, second=0))][0] == Decimal(7)


def _keyed_events(table_env, cfg, events, directory) -> None:
    """The events as the view ``keyed_events``: the job's source columns with their ``dimensions_key``."""
    _load_events(table_env, cfg, events, directory)
    keyed = f"SELECT *, {dimensions_key_column(cfg)} AS `dimensions_key` FROM `{USAGE_SOURCE_TABLE}`"
    table_env.execute_sql("DROP TEMPORARY VIEW IF EXISTS `keyed_events`")
    table_env.create_temporary_view("keyed_events", table_env.sql_query(keyed))


def test_each_meter_aggregation_and_group_by(table_env, tmp_path, write_config):
    """SUM with group-by dimensions, COUNT, MAX, LATEST and UNIQUE_COUNT each equal a plain-Python oracle."""
    cfg = load_config(write_config(METERS_YAML), environ={})
    events = _meter_events()
    _keyed_events(table_env, cfg, events, tmp_path / "events")
    with table_env.execute_sql(window_aggregate_query(cfg, "keyed_events")).collect() as results:
        got = {(r[1], r[2], r[3], r[4]): (r[6], r[7]) for r in results}
    _assert_each_meter(got, events)


def test_the_two_stages_give_each_meter_the_same_totals(table_env, tmp_path, write_config):
    """The two-stage graph's final rows (jvm/ TwoStages, the job's parameters) equal the same oracle, every copy of an id counted once.

    Copies of ids are added, in the same window as their first and 70 s later: the first copy counts, in its window.
    """
    from jobs.usage_job import apply_stages

    cfg = load_config(write_config(METERS_YAML), environ={})
    events = _meter_events()
    later = [
        {**e, "quantity": e["quantity"] + 1, "event_time": e["event_time"] + timedelta(seconds=70)} for e in events[::9]
    ]
    alongside = [{**e, "quantity": e["quantity"] + 2} for e in events[::13]]  # the same window
    sent = sorted(events + later + alongside, key=lambda e: e["event_time"])
    firsts: dict[tuple[str, str], dict] = {}
    for e in sent:
        firsts.setdefault((e["tenant_id"], e["event_id"]), e)
    _keyed_events(table_env, cfg, sent, tmp_path / "events")
    stages = apply_stages(table_env, "SELECT * FROM `keyed_events`", cfg)
    got = {}
    finals = stages.finals().executeAndCollect()
    try:
        while finals.hasNext():
            r = finals.next()
            start = datetime.fromtimestamp(r.getField(4) / 1000, UTC).replace(tzinfo=None)
            key = (r.getField(1), r.getField(2), r.getField(3), start)
            assert key not in got, f"one final row per window: {key}"
            assert re.fullmatch(r"-?\d+\.\d{9}", r.getField(6)), r.getField(6)  # the job's DECIMAL(38, 9) as text
            assert r.getField(8) == r.getField(7), "the revision is the event count"
            got[key] = (Decimal(r.getField(6)), r.getField(7))
    finally:
        finals.close()
    # The first copy of each id is the one the input holds first (one subtask sees an id's copies in input order).
    _assert_each_meter(got, list(firsts.values()))
