"""The window guard in the usage job's own wiring, locally: validate -> guard -> dedup -> classify ->
window aggregate, over literal records from a file standing in for the Kafka source.

With ``input.max_dimension_combinations: 3`` a window counts three group-by combinations, the fourth
is a dead letter with its own bytes and Kafka coordinates, and an admitted combination still counts
after the cap. The refused event takes no dedup state: a copy of it is refused again, not dropped as
a duplicate, so a replay after the cap is raised counts it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from connectors.avro_types import derive_nullable_columns, load_schema
from jobs.plan import (
    BOUNDED_PAYLOAD_FUNCTION,
    CLASSIFIED_VIEW,
    COUNT_DEAD_LETTER_FUNCTION,
    dead_letter_insert,
    window_changelog_query,
)
from jobs.source_plan import (
    BOUNDED_TIME,
    FORMAT_DIMENSIONS_KEY,
    FORMAT_REJECT,
    USAGE_SOURCE_TABLE,
    VALIDATED_VIEW,
    bounded_event_time,
    validate_query,
)
from jobs.sql import sql_interval
from meterflow.config import load_config
from meterflow.corrections import dimensions_key

pytestmark = [pytest.mark.flink, pytest.mark.slow]

START = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
CONFIG = """
kafka:
  bootstrap_servers: 127.0.0.1:9
  usage_events_topic: usage-in
input:
  max_dimension_combinations: 3
meters:
  - name: tokens
    group_by: [model]
    allow_negative: true
"""


def _event(n: int, model: str, quantity: str, at: timedelta) -> dict:
    return {
        "event_id": f"e{n}",
        "tenant_id": "t1",
        "customer_id": "c1",
        "meter": "tokens",
        "quantity": Decimal(quantity),
        "event_time": START + at,
        "dimensions": {"model": model, "region": "eu"},
    }


EVENTS = [
    _event(1, "a", "1.5", timedelta(seconds=1)),
    _event(2, "b", "2", timedelta(seconds=2)),
    _event(3, "c", "3", timedelta(seconds=3)),
    _event(4, "d", "-4.000000001", timedelta(seconds=4)),  # the fourth combination: refused
    _event(5, "a", "10", timedelta(seconds=5)),  # an admitted combination after the cap: counted
    _event(6, "d", "1", timedelta(minutes=1, seconds=1)),  # the next window: a cap of its own
    {**_event(4, "d", "-4.000000001", timedelta(seconds=4))},  # a copy of the refused event: refused again
]
REFUSED_OFFSETS = (3, 6)


def _json_line(event: dict, offset: int, dimensions_key: str) -> str:
    at = event["event_time"]
    row = {
        **event,
        FORMAT_DIMENSIONS_KEY: dimensions_key,
        "quantity": "QUANTITY",
        "event_time": at.strftime("%Y-%m-%d %H:%M:%S.") + f"{at.microsecond // 1000:03d}",
        "source_offset": offset,
        "kafka_ms": int(at.timestamp() * 1000) + 1_000,
    }
    # The quantity as a bare JSON number, parsed exactly (never through a float).
    return json.dumps(row).replace('"QUANTITY"', str(event["quantity"]))


def _stand_in_source(t_env, cfg, events: list[dict], directory) -> None:
    """The source's columns over a JSON file: the decoded fields, the format's group-by key and no reject, Kafka coordinates, watermark."""
    directory.mkdir()
    keys = [dimensions_key(e["dimensions"], cfg.meter(e["meter"]).group_by) for e in events]
    (directory / "part-0.json").write_text("\n".join(_json_line(e, i, keys[i]) for i, e in enumerate(events)) + "\n")
    fields = ", ".join(c.ddl() for c in derive_nullable_columns(load_schema()))
    appended = "TO_TIMESTAMP_LTZ(`kafka_ms`, 3)"
    t_env.execute_sql(
        f"CREATE TEMPORARY TABLE `{USAGE_SOURCE_TABLE}` ({fields}, `source_offset` BIGINT, `kafka_ms` BIGINT, "
        f"`{FORMAT_DIMENSIONS_KEY}` STRING NOT NULL, `{FORMAT_REJECT}` AS CAST(NULL AS STRING), `payload` AS ENCODE(`event_id`, 'UTF-8'), "
        f"`source_topic` AS '{cfg.kafka.usage_events_topic}', `source_partition` AS 0, `kafka_timestamp` AS {appended}, "
        f"`{BOUNDED_TIME}` AS {bounded_event_time(cfg).replace('`kafka_timestamp`', appended)}, `proc_time` AS PROCTIME(), "
        f"WATERMARK FOR `{BOUNDED_TIME}` AS `{BOUNDED_TIME}` - {sql_interval(cfg.event_time.watermark_delay)}) "
        f"WITH ('connector' = 'filesystem', 'path' = '{directory}', 'format' = 'json')"
    )


@pytest.fixture
def guarded_job(write_config, tmp_path):
    """The job's environment at parallelism 1 (one input order), with the stand-in source and the job's
    own wiring from the validation to the guard's views."""
    from jobs.usage_job import build_environment, declare_routed_views
    from meterflow.local.flink import FLINK_CONNECTOR_JARS, JVM_JAR_DIR

    cfg = load_config(write_config(CONFIG), environ={})
    jars = [*sorted(JVM_JAR_DIR.glob("*.jar")), *sorted(FLINK_CONNECTOR_JARS.glob("*.jar"))]
    _, t_env = build_environment(cfg, {"pipeline.jars": ";".join(p.as_uri() for p in jars)})
    _stand_in_source(t_env, cfg, EVENTS, tmp_path / "events")
    t_env.create_temporary_view(VALIDATED_VIEW, t_env.sql_query(validate_query(cfg)))
    declare_routed_views(t_env, cfg)
    return cfg, t_env


def test_three_combinations_are_counted_and_the_fourth_is_a_dead_letter(guarded_job):
    """Window rows for a, b and c (a with its event after the cap), none for d; d in the next window counts."""
    cfg, t_env = guarded_job
    with t_env.execute_sql(window_changelog_query(cfg)).collect() as results:
        rows = {(json.loads(r[3])["model"], r[4]): (Decimal(r[6]), r[7]) for r in results}
    first, second = START.replace(tzinfo=None), START.replace(tzinfo=None) + timedelta(minutes=1)
    assert rows == {
        ("a", first): (Decimal("11.5"), 2),
        ("b", first): (Decimal("2"), 1),
        ("c", first): (Decimal("3"), 1),
        ("d", second): (Decimal("1"), 1),
    }

    query = f"SELECT `payload`, `reject_reason`, `source_topic`, `source_partition`, `source_offset` FROM `{CLASSIFIED_VIEW}` WHERE `reject_reason` IS NOT NULL"
    with t_env.execute_sql(query).collect() as results:
        letters = sorted((tuple(r) for r in results), key=lambda r: r[4])
    # The refused event and its copy, each a dead letter with its own bytes and coordinates: the
    # refusal left no dedup state that would have dropped the copy (or a replay) as a duplicate.
    reason = "dimension combinations: window 2026-06-01T12:00:00Z of t1/c1/tokens already has 3 combinations (input.max_dimension_combinations)"
    assert letters == [(b"e4", reason, "usage-in", 0, offset) for offset in REFUSED_OFFSETS]


def test_the_guards_refusals_take_the_dead_letter_insert(guarded_job):
    """The job's one dead-letter insert carries the guard's refusals: payload, reason (counted by kind), coordinates."""
    cfg, t_env = guarded_job
    for function in (COUNT_DEAD_LETTER_FUNCTION, BOUNDED_PAYLOAD_FUNCTION):
        t_env.create_java_temporary_system_function(*function)
    select = dead_letter_insert(cfg).split("\n", 1)[1]
    with t_env.execute_sql(select).collect() as results:
        letters = sorted((tuple(r) for r in results), key=lambda r: r[4])
    assert [(bytes(r[0]), r[1].split(":")[0], r[2], r[3], r[4]) for r in letters] == [
        (b"e4", "dimension combinations", "usage-in", 0, o) for o in REFUSED_OFFSETS
    ]
