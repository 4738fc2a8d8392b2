"""The JVM decoder and the validation SQL in a local environment: every bad record gets its reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from connectors.avro_codec import encode_usage_event
from jobs.plan import COUNT_DEAD_LETTER_FUNCTION, DECODE_FUNCTION, USAGE_SOURCE_TABLE, bounded_event_time, validate_query
from meterflow.config import load_config

pytestmark = [pytest.mark.flink, pytest.mark.slow]

PRODUCED = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
GOOD = {
    "event_id": "e1",
    "tenant_id": "t1",
    "customer_id": "c1",
    "meter": "tokens",
    "quantity": Decimal("12.345678901"),
    "event_time": PRODUCED - timedelta(seconds=30),
    "dimensions": {"model": "m"},
}


def test_each_bad_record_is_rejected_with_its_reason(table_env, write_config):
    """Malformed bytes, empty ids, unknown meters, forbidden negatives and absurd times are rejected; good ones pass exactly."""
    cfg = load_config(write_config("meters:\n  - name: tokens\n  - name: credits\n    allow_negative: true\n"), environ={})
    cases = {
        "good": encode_usage_event(GOOD),
        "credit": encode_usage_event({**GOOD, "event_id": "e2", "meter": "credits", "quantity": Decimal("-3")}),
        "garbage": b"\x01\x02garbage",
        "empty": b"",
        "trailing": encode_usage_event(GOOD) + b"\x00",
        "no_id": encode_usage_event({**GOOD, "event_id": " "}),
        "unknown_meter": encode_usage_event({**GOOD, "meter": "gpu_hours"}),
        "negative": encode_usage_event({**GOOD, "quantity": Decimal("-1")}),
        "future": encode_usage_event({**GOOD, "event_time": PRODUCED + timedelta(hours=2)}),
        "ancient": encode_usage_event({**GOOD, "event_time": PRODUCED - timedelta(days=400)}),
    }
    for name, java_class in (DECODE_FUNCTION, COUNT_DEAD_LETTER_FUNCTION):
        table_env.create_java_temporary_system_function(name, java_class)
    rows = ", ".join(f"('{name}', X'{payload.hex()}')" for name, payload in cases.items())
    # Stand-in for the Kafka source: the same computed columns over literal payloads.
    table_env.execute_sql(f"DROP TEMPORARY TABLE IF EXISTS `{USAGE_SOURCE_TABLE}`")
    table_env.execute_sql(f"DROP TEMPORARY VIEW IF EXISTS `{USAGE_SOURCE_TABLE}`")
    table_env.execute_sql(
        f"CREATE TEMPORARY VIEW `{USAGE_SOURCE_TABLE}` AS SELECT `payload`, 'in' AS `source_topic`, 0 AS `source_partition`, "
        f"CAST(0 AS BIGINT) AS `source_offset`, TO_TIMESTAMP_LTZ({int(PRODUCED.timestamp() * 1000)}, 3) AS `kafka_timestamp`, "
        f"`{DECODE_FUNCTION[0]}`(`payload`) AS `event`, PROCTIME() AS `proc_time`, "
        f"{bounded_event_time(cfg).replace('`kafka_timestamp`', f'TO_TIMESTAMP_LTZ({int(PRODUCED.timestamp() * 1000)}, 3)')} AS `event_time` "
        f"FROM (VALUES {rows}) AS t(`case_name`, `payload`)"
    )
    query = f"SELECT `quantity`, `payload`, `{COUNT_DEAD_LETTER_FUNCTION[0]}`(`reject_reason`) AS `reason` FROM ({validate_query(cfg)})"
    by_payload = {payload: name for name, payload in cases.items()}
    with table_env.execute_sql(query).collect() as results:
        got = {by_payload[bytes(r[1])]: r for r in results}
    reason = {name: row[2] for name, row in got.items()}
    assert reason["good"] is None and reason["credit"] is None
    assert got["good"][0] == Decimal("12.345678901") and got["credit"][0] == Decimal("-3")
    assert reason["garbage"].startswith("malformed Avro:")
    assert reason["empty"] == "malformed Avro: empty message"
    assert reason["trailing"] == "malformed Avro: trailing bytes after the record"
    assert reason["no_id"] == "missing field: event_id"
    assert reason["unknown_meter"] == "unknown meter: gpu_hours"
    assert reason["negative"] == "negative quantity: meter tokens does not allow it"
    assert reason["future"].startswith("event_time out of range: 2026-06-01 14:00:00")
    assert reason["ancient"].startswith("event_time out of range: 2025-")
