"""The usage source with the meterflow-avro format, planned in a local environment, and the validation SQL
over rows shaped as the format emits them: every bad record gets its reason. (The format's own reasons,
from the value and the configured meters, are jvm/ EventRulesTest's and MeterflowAvroFormatTest's.)"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from jobs.plan import COUNT_DEAD_LETTER_FUNCTION, routed_query
from jobs.source_plan import (
    BOUNDED_TIME,
    FORMAT_DIMENSIONS_KEY,
    FORMAT_REJECT,
    USAGE_SOURCE_TABLE,
    VALIDATED_VIEW,
    bounded_event_time,
    usage_source_ddl,
    usage_value_columns,
    validate_query,
)
from jobs.sql import sql_string
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
MALFORMED = "malformed Avro: truncated record in field meter"


def _reset(table_env) -> None:
    for kind in ("VIEW", "TABLE"):
        for name in (VALIDATED_VIEW, USAGE_SOURCE_TABLE):
            table_env.execute_sql(f"DROP TEMPORARY {kind} IF EXISTS `{name}`")
    table_env.execute_sql(f"DROP TEMPORARY SYSTEM FUNCTION IF EXISTS `{COUNT_DEAD_LETTER_FUNCTION[0]}`")


def _literal_row(case: str, event: dict | None, error: str | None) -> str:
    """A row as the format emits it: the fields (all NULL when it cannot decode), its reject, group-by key ('{}' here) and payload."""
    if event is None:
        fields = ["CAST(NULL AS STRING)"] * 4 + [
            "CAST(NULL AS DECIMAL(38, 9))",
            "CAST(NULL AS TIMESTAMP(3))",
            "CAST(NULL AS MAP<STRING, STRING>)",
        ]
    else:
        ts = event["event_time"].strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        dims = ", ".join(f"{sql_string(k)}, {sql_string(v)}" for k, v in event["dimensions"].items())
        fields = [sql_string(event[f]) for f in ("event_id", "tenant_id", "customer_id", "meter")]
        fields += [f"CAST('{event['quantity']}' AS DECIMAL(38, 9))", f"TIMESTAMP '{ts}'", f"MAP[{dims}]"]
    return f"({', '.join(fields)}, {sql_string(error) if error else 'CAST(NULL AS STRING)'}, '{{}}', CAST({sql_string(case)} AS BYTES))"


PRODUCED_MS = int(PRODUCED.timestamp() * 1000)


def _stand_in_source(table_env, cfg, records: list[tuple[str, dict | None, str | None, int, int]]) -> None:
    """Stand-in for the Kafka source: the format's columns over literal rows, the same computed columns.

    ``records``: (name, event, the format's reject, Kafka offset, Kafka timestamp in epoch ms); the name is the payload.
    The plausible event time is judged against ``PRODUCED``, whatever each record's timestamp.
    """
    rows = ", ".join(
        f"{_literal_row(name, event, error)[:-1]}, CAST({offset} AS BIGINT), CAST({ts} AS BIGINT))"
        for name, event, error, offset, ts in records
    )
    names = ", ".join(f"`{c.name}`" for c in usage_value_columns())
    produced = f"TO_TIMESTAMP_LTZ({PRODUCED_MS}, 3)"
    _reset(table_env)
    table_env.create_java_temporary_system_function(*COUNT_DEAD_LETTER_FUNCTION)
    table_env.execute_sql(
        f"CREATE TEMPORARY VIEW `{USAGE_SOURCE_TABLE}` AS SELECT *, 'in' AS `source_topic`, 0 AS `source_partition`, "
        "TO_TIMESTAMP_LTZ(`kafka_ms`, 3) AS `kafka_timestamp`, PROCTIME() AS `proc_time`, "
        f"{bounded_event_time(cfg).replace('`kafka_timestamp`', produced)} AS `{BOUNDED_TIME}` "
        f"FROM (VALUES {rows}) AS t({names}, `{FORMAT_REJECT}`, `{FORMAT_DIMENSIONS_KEY}`, `payload`, `source_offset`, `kafka_ms`)"
    )


def test_each_bad_record_is_rejected_with_its_reason(table_env, write_config):
    """The SQL's share of the validation: the format's reason (given here as the format gives it; the
    format's rules themselves are jvm/ EventRulesTest's) wins over an absurd time, an absurd time is a
    reason of its own, and good records (a negative credit the format let through too) pass exactly."""
    cfg = load_config(
        write_config("meters:\n  - name: tokens\n  - name: credits\n    allow_negative: true\n"), environ={}
    )
    future = PRODUCED + timedelta(hours=2)
    cases = {
        "good": (GOOD, None),
        "credit": ({**GOOD, "event_id": "e2", "meter": "credits", "quantity": Decimal("-3")}, None),
        "garbage": (None, MALFORMED),
        "no_id": ({**GOOD, "event_id": " "}, "missing field: event_id"),
        "unknown_meter_in_the_future": (
            {**GOOD, "meter": "gpu_hours", "event_time": future},
            "unknown meter: gpu_hours",
        ),
        "negative": ({**GOOD, "quantity": Decimal("-1")}, "negative quantity: meter tokens does not allow it"),
        "future": ({**GOOD, "event_time": future}, None),
        "ancient": ({**GOOD, "event_time": PRODUCED - timedelta(days=400)}, None),
    }
    _stand_in_source(table_env, cfg, [(name, event, error, 0, PRODUCED_MS) for name, (event, error) in cases.items()])
    query = f"SELECT `quantity`, `payload`, `{COUNT_DEAD_LETTER_FUNCTION[0]}`(`reject_reason`) AS `reason`, `event_time` FROM ({validate_query(cfg)})"
    with table_env.execute_sql(query).collect() as results:
        got = {bytes(r[1]).decode(): r for r in results}
    reason = {name: row[2] for name, row in got.items()}
    assert reason["good"] is None and reason["credit"] is None
    assert got["good"][0] == Decimal("12.345678901") and got["credit"][0] == Decimal("-3")
    assert got["good"][3] == GOOD["event_time"].replace(tzinfo=None)
    assert reason["garbage"] == MALFORMED
    assert reason["no_id"] == "missing field: event_id"
    assert reason["unknown_meter_in_the_future"] == "unknown meter: gpu_hours", "the format's reason first"
    assert reason["negative"] == "negative quantity: meter tokens does not allow it"
    assert reason["future"].startswith("event_time out of range: 2026-06-01 14:00:00")
    assert reason["ancient"].startswith("event_time out of range: 2025-")
    # Rejected records carry no plausible time: they can never move the watermark.
    assert got["future"][3] == got["ancient"][3] == datetime(1970, 1, 1)


def test_job_source_plans_with_the_format_and_no_decode_function(table_env, write_config):
    """The job's own source DDL finds the format in the meterflow-jvm jar and plans down to the execution graph."""
    from pyflink.table.explain_detail import ExplainDetail

    cfg = load_config(
        write_config("kafka:\n  bootstrap_servers: 127.0.0.1:9\nmeters:\n  - name: tokens\n    group_by: [region]\n"),
        environ={},
    )
    _reset(table_env)
    table_env.create_java_temporary_system_function(*COUNT_DEAD_LETTER_FUNCTION)
    table_env.execute_sql(usage_source_ddl(cfg))
    table_env.create_temporary_view(VALIDATED_VIEW, table_env.sql_query(validate_query(cfg)))
    # Translating to the execution plan asks the format for its runtime decoder (the column check).
    plan = table_env.sql_query(routed_query(cfg)).explain(ExplainDetail.JSON_EXECUTION_PLAN)
    assert (
        f"table=[[default_catalog, default_database, {USAGE_SOURCE_TABLE}, metadata=[value.raw, value.reject, value.dimensions-key, topic, partition, offset, timestamp], watermark=["
        in plan
    )
    # One Kafka source for the counted and the rejected side, and no decode, check or key anywhere but in it.
    assert plan.count('"pact" : "Data Source"') == 1
    assert "decode" not in plan
    assert "TRIM" not in plan and "JSON_OBJECT" not in plan and "missing field" not in plan


def test_format_refuses_a_table_that_is_not_the_usage_event(table_env):
    """A table whose columns are not the schema's fields fails at planning with the format's reason."""
    from pyflink.table.explain_detail import ExplainDetail

    _reset(table_env)
    table_env.execute_sql(
        f"CREATE TEMPORARY TABLE `{USAGE_SOURCE_TABLE}` (`payload` BYTES, `decode_error` STRING METADATA FROM 'value.error' VIRTUAL) "
        "WITH ('connector' = 'kafka', 'topic' = 't', 'properties.bootstrap.servers' = '127.0.0.1:9', 'format' = 'meterflow-avro')"
    )
    with pytest.raises(Exception, match="decodes avro/usage_event.avsc into"):
        table_env.sql_query(f"SELECT * FROM `{USAGE_SOURCE_TABLE}`").explain(ExplainDetail.JSON_EXECUTION_PLAN)


def test_rejected_records_pass_the_dedup_without_touching_counted_events(table_env, write_config):
    """Through the job's routed query: a reject never hides a counted event of the same id, identical
    rejects are each kept (at other offsets, or at the same offset of a topic created again), and a
    counted event's copy is still dropped.

    The outcome does not depend on the order the records reach the dedup in.
    """
    cfg = load_config(write_config(""), environ={})
    produced_ms = PRODUCED_MS
    # (name, event, the format's reject, Kafka offset, Kafka timestamp)
    cases = [
        (
            "unknown_meter_dup",
            {**GOOD, "event_id": "dup", "meter": "gpu_hours"},
            "unknown meter: gpu_hours",
            0,
            produced_ms,
        ),
        ("counted_dup", {**GOOD, "event_id": "dup"}, None, 1, produced_ms),
        ("copy_of_counted_dup", {**GOOD, "event_id": "dup"}, None, 2, produced_ms),
        ("garbage_a", None, MALFORMED, 3, produced_ms),
        ("garbage_b", None, MALFORMED, 4, produced_ms),
        ("garbage_a_recreated_topic", None, MALFORMED, 3, produced_ms + 86_400_000),
        ("other_tenant_dup", {**GOOD, "event_id": "dup", "tenant_id": "t2"}, None, 5, produced_ms),
    ]
    _stand_in_source(table_env, cfg, cases)
    table_env.create_temporary_view(VALIDATED_VIEW, table_env.sql_query(validate_query(cfg)))
    # Counted rows carry no payload: they are told apart by tenant.
    query = f"SELECT `payload`, `reject_reason`, `tenant_id`, `event_id`, `window_end` FROM ({routed_query(cfg)})"
    with table_env.execute_sql(query).collect() as results:
        rows_out = [tuple(r) for r in results]
    rejected = sorted(bytes(r[0]).decode() for r in rows_out if r[1] is not None)
    counted = sorted(r[2] for r in rows_out if r[1] is None)
    assert rejected == ["garbage_a", "garbage_a_recreated_topic", "garbage_b", "unknown_meter_dup"]
    assert counted == ["t1", "t2"], rows_out
    assert all(r[3] == "dup" and r[4] is not None for r in rows_out if r[1] is None)
    assert all(r[2] is None and r[4] is None for r in rows_out if r[1] is not None)
