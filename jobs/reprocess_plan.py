"""Pure generation of the reprocess query: a closed period's windows recomputed from the usage-events topic.

The same source and input contract as the usage job (jobs/source_plan.py: the meterflow-avro
format, the plausible event time, every rejection rule), read as a bounded batch from where the
period's first event can be appended to the topic's end, so the period's late events are in it too.
Every unique event of the period counts, late or not (the job routes the late ones to corrections;
a recomputation has no watermark). The first copy of an event id is the one counted, as in the job
(first appended; the job keeps the first to arrive). Not applied: the window guard's per-window
limits (``input.max_dimension_combinations``, ``input.max_unique_values``, the sum cap), which the job enforces on arrival; a
window the guard cut shows its refused events as a difference, for the operator to judge before
billing it.
"""

from __future__ import annotations

from jobs.plan import window_aggregate_query
from jobs.source_plan import EVENT_FIELDS, VALIDATED_VIEW, kafka_source_options, usage_source_ddl, validate_query
from jobs.sql import sql_with
from meterflow.config import JobConfig
from meterflow.reprocess import Period, read_from_ms
from meterflow.window_row import WINDOW_KEY, WINDOW_SPAN, WINDOW_VALUE, names

UNIQUE_EVENTS_VIEW = "reprocess_unique_events"
# A recomputed window: the window row without its revision (a recomputation has none).
RESULT_COLUMNS = names(WINDOW_KEY + WINDOW_SPAN + WINDOW_VALUE[:2])


def reprocess_source_options(cfg: JobConfig, period: Period) -> dict[str, str]:
    """The usage source's Kafka options as a bounded read: from the period's first possible append to
    the end offsets at the start, in a consumer group of its own (a batch read commits nothing)."""
    options = kafka_source_options(cfg, "meterflow-avro")
    options.update(
        {
            "properties.group.id": f"{cfg.kafka.consumer_group}-reprocess",
            "scan.startup.mode": "timestamp",
            "scan.startup.timestamp-millis": str(read_from_ms(period, cfg)),
            "scan.bounded.mode": "latest-offset",
        }
    )
    return options


def reprocess_source_ddl(cfg: JobConfig, period: Period) -> str:
    """The usage job's source table (same columns, format and computed event time), bounded."""
    streaming = usage_source_ddl(cfg)
    head = streaming[: streaming.rindex(") WITH (")]
    return f"{head}) {sql_with(reprocess_source_options(cfg, period))}"


def unique_events_query(period: Period) -> str:
    """Countable events of the period, the first copy of each (tenant_id, event_id) only.

    The dedup runs over every countable event read, before the period filter, so a copy dated
    elsewhere never makes the first one count twice.
    """
    cols = ", ".join(f"`{c}`" for c in (*EVENT_FIELDS, "dimensions_key"))
    since, until = (f"TIMESTAMP '{t:%Y-%m-%d %H:%M:%S}'" for t in (period.since, period.until))
    return (
        f"SELECT {cols} FROM (\n"
        f"  SELECT {cols}, ROW_NUMBER() OVER (PARTITION BY `tenant_id`, `event_id` ORDER BY `kafka_timestamp`, `source_partition`, `source_offset`) AS `copy`\n"
        f"  FROM `{VALIDATED_VIEW}` WHERE `reject_reason` IS NULL\n"
        f") WHERE `copy` = 1 AND `event_time` >= {since} AND `event_time` < {until}"
    )


def recompute_statements(cfg: JobConfig, period: Period) -> tuple[list[str], str]:
    """(DDL and views to run first, the query whose rows are the recomputed windows: RESULT_COLUMNS)."""
    setup = [
        reprocess_source_ddl(cfg, period),
        f"CREATE TEMPORARY VIEW `{VALIDATED_VIEW}` AS {validate_query(cfg)}",
        f"CREATE TEMPORARY VIEW `{UNIQUE_EVENTS_VIEW}` AS {unique_events_query(period)}",
    ]
    aggregate = window_aggregate_query(cfg, UNIQUE_EVENTS_VIEW, "event_time")
    cols = ", ".join(f"`{c}`" for c in RESULT_COLUMNS)
    return setup, f"SELECT {cols} FROM ({aggregate})"
