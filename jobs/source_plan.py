"""Pure generation of the usage source: Kafka values decoded by the meterflow-avro format, a plausible
event time for the watermark, and the validation that gives every record it cannot count a reason.

The format (jvm/ ``dev.meterflow.format``) decodes each value once, in the Kafka source, straight into
Flink's internal row; a malformed value becomes a row whose fields are NULL and whose ``format_reject``
says why, with the raw bytes alongside, so one bad message is a dead letter, never a job failure. The
format also applies the rules that need only the value and the configured meters (blank ids, unknown
meter, a negative quantity where not allowed) and builds the group-by key, in Java, once per record;
what SQL adds per record is the plausible event time, which needs the record's Kafka timestamp.
"""

from __future__ import annotations

import json

from connectors.avro_types import Column, derive_nullable_columns, load_schema
from jobs.sql import ms, sql_interval, sql_string, sql_with
from meterflow.config import JobConfig
from meterflow.handover import Handover

USAGE_SOURCE_TABLE = "usage_events"
VALIDATED_VIEW = "validated_events"
# The format's name, as jvm/ MeterflowAvroFormatFactory registers it.
USAGE_FORMAT = "meterflow-avro"
# The format's registry option (MeterflowAvroFormatFactory.SCHEMA_REGISTRY_URL); Flink takes a format's
# options prefixed with its name when the table says 'format' = 'meterflow-avro'.
SCHEMA_REGISTRY_URL_OPTION = f"{USAGE_FORMAT}.schema-registry.url"
# The configured meters, for the format's checks and group-by key (MeterflowAvroFormatFactory.METERS).
METERS_OPTION = f"{USAGE_FORMAT}.meters"
# The format's metadata columns: why a record cannot be counted as far as its value tells, and its group-by key.
FORMAT_REJECT = "format_reject"
FORMAT_DIMENSIONS_KEY = "format_dimensions_key"
# The connector and its options, as jvm/ MeterflowKafkaTableFactory registers them: Flink's Kafka
# connector with idleness that waits for a partition to be read up to its head.
SOURCE_CONNECTOR = "meterflow-kafka"
IDLE_TIMEOUT_OPTION = "meterflow.idle-timeout"
CATCH_UP_TIMEOUT_OPTION = "meterflow.catch-up-timeout"
# The plausible event time (the watermark's column); the decoded `event_time` stays as sent.
BOUNDED_TIME = "bounded_time"
OUT_OF_RANGE_TIME = "TIMESTAMP '1970-01-01 00:00:00.000'"
# At a handover (meterflow/handover.py), the validated view's column saying the graph before read the record already.
REPLAYED = "replayed"


def usage_value_columns() -> list[Column]:
    """The format's physical columns: every field of avro/usage_event.avsc, nullable (a malformed record has none)."""
    return derive_nullable_columns(load_schema())


EVENT_FIELDS = tuple(c.name for c in usage_value_columns())


def kafka_source_options(cfg: JobConfig, value_format: str) -> dict[str, str]:
    """Kafka connector options of a source of the usage-events topic with values in ``value_format``.

    With ``kafka.schema_registry_url`` set, the meterflow-avro format also decodes values in the
    registry's wire format; without it they are dead letters (plain and single-object values need none).
    """
    options = {
        "connector": "kafka",
        "topic": cfg.kafka.usage_events_topic,
        "properties.bootstrap.servers": cfg.kafka.bootstrap_servers,
        "properties.group.id": cfg.kafka.consumer_group,
        # Resume from the group's committed offsets (committed on checkpoint); a new group starts at the beginning.
        "scan.startup.mode": "group-offsets",
        "properties.auto.offset.reset": "earliest",
        # Producers may write transactionally; never count aborted records.
        "properties.isolation.level": "read_committed",
        "scan.topic-partition-discovery.interval": "60 s",
        "format": value_format,
    }
    if value_format == USAGE_FORMAT:
        options[METERS_OPTION] = format_meters(cfg)
        if cfg.kafka.schema_registry_url:
            options[SCHEMA_REGISTRY_URL_OPTION] = cfg.kafka.schema_registry_url
    return options


def bounded_event_time(cfg: JobConfig) -> str:
    """The decoded event time if it is plausible, else a sentinel that can never raise the watermark.

    An event dated far ahead would drag the watermark forward and make everyone else's events late,
    so only times within [appended - max_event_age, appended + max_event_ahead] count, where
    "appended" is the Kafka record timestamp: the broker's append time, as the usage-events topic is
    LogAppendTime (connectors/topics.py; ``meterflow submit`` refuses a topic that is not), so a
    producer's clock, however wrong, moves neither bound. Judging against the record, stored in the
    log, not the job's clock, makes the decision deterministic: a replay, or a second branch, decides the same.
    """
    et = cfg.event_time
    t = "`event_time`"
    appended = "CAST(`kafka_timestamp` AS TIMESTAMP(3))"
    return (
        f"CASE WHEN {t} IS NOT NULL"
        f" AND {t} >= TIMESTAMPADD(SECOND, -{int(et.max_event_age.total_seconds())}, {appended})"
        f" AND {t} <= TIMESTAMPADD(SECOND, {int(et.max_event_ahead.total_seconds())}, {appended})"
        f" THEN {t} ELSE {OUT_OF_RANGE_TIME} END"
    )


def usage_source_ddl(cfg: JobConfig, handover: Handover | None = None) -> str:
    """Kafka source of usage events, decoded by the meterflow-avro format, with per-partition watermarks.

    The columns are the schema's fields (derived from avro/usage_event.avsc), then the format's
    metadata: ``format_reject`` (why the value is not a countable usage event as far as the value and
    the meters tell, else NULL), ``format_dimensions_key`` (:func:`dimensions_key_column`) and
    ``payload`` (the value's bytes, kept for dead letters), then the record's Kafka coordinates.
    """
    fields = ",\n  ".join(c.ddl() for c in usage_value_columns())
    watermark = f"WATERMARK FOR `{BOUNDED_TIME}` AS `{BOUNDED_TIME}` - {sql_interval(cfg.event_time.watermark_delay)}"
    return (
        f"CREATE TABLE `{USAGE_SOURCE_TABLE}` (\n"
        f"  {fields},\n"
        f"  `{FORMAT_REJECT}` STRING METADATA FROM 'value.reject' VIRTUAL,\n"
        f"  `{FORMAT_DIMENSIONS_KEY}` STRING NOT NULL METADATA FROM 'value.dimensions-key' VIRTUAL,\n"
        "  `payload` BYTES METADATA FROM 'value.raw' VIRTUAL,\n"
        "  `source_topic` STRING METADATA FROM 'topic' VIRTUAL,\n"
        "  `source_partition` INT METADATA FROM 'partition' VIRTUAL,\n"
        "  `source_offset` BIGINT METADATA FROM 'offset' VIRTUAL,\n"
        "  `kafka_timestamp` TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL,\n"
        f"  `{BOUNDED_TIME}` AS {bounded_event_time(cfg)},\n"
        "  `proc_time` AS PROCTIME(),\n"
        f"  {watermark}\n"
        f") {sql_with(usage_source_options(cfg, handover))}"
    )


def usage_source_options(cfg: JobConfig, handover: Handover | None = None) -> dict[str, str]:
    """The usage source's options: Kafka's, through the meterflow-kafka connector and its catch-up-aware idleness.

    A partition stops holding the watermark after ``source_idle_timeout`` of silence only once it was
    read up to its head; one still reading its backlog (after a start, a restore, an outage) only
    after ``source_catch_up_timeout`` (jvm/ ``CatchUpIdleness``). At a handover, a first start reads
    from the handover's replay start (a record timestamp); a restore reads from its checkpoint as always.
    """
    et = cfg.event_time
    options = {
        **kafka_source_options(cfg, USAGE_FORMAT),
        "connector": SOURCE_CONNECTOR,
        IDLE_TIMEOUT_OPTION: f"{ms(et.source_idle_timeout)} ms",
        CATCH_UP_TIMEOUT_OPTION: f"{ms(et.source_catch_up_timeout)} ms",
    }
    if handover is not None:
        options["scan.startup.mode"] = "timestamp"
        options["scan.startup.timestamp-millis"] = str(handover.replay_from_ms)
    return options


def replayed_expr(handover: Handover) -> str:
    """True for a record of the handover's topic below the offset the graph before had reached on its partition: that graph read it."""
    below = " OR ".join(
        f"(`source_partition` = {partition} AND `source_offset` < {offset})"
        for partition, offset in sorted(handover.read_below.items())
    )
    return f"(`source_topic` = {sql_string(handover.topic)} AND ({below}))" if below else "FALSE"


def format_meters(cfg: JobConfig) -> str:
    """The format's ``meters`` option (jvm/ ``EventRules.parse``): each meter's name, whether it allows a negative quantity, its group-by dimensions."""
    return json.dumps(
        {m.name: {"allow_negative": m.allow_negative, "group_by": sorted(m.group_by)} for m in cfg.meters},
        separators=(",", ":"),
    )


def dimensions_key_column(cfg: JobConfig) -> str:
    """The canonical key of a meter's group-by dimensions, computed in the source by the format (jvm/ ``EventRules.dimensionsKey``).

    A JSON object, keys sorted, a missing dimension as the empty string; '{}' when the meter has none,
    byte for byte as meterflow/corrections.py ``dimensions_key``. Without any group-by in the config
    it stays the literal '{}', of the type (CHAR(2)) the window state was keyed by before.
    """
    return f"`{FORMAT_DIMENSIONS_KEY}`" if any(m.group_by for m in cfg.meters) else "'{}'"


def validate_query(cfg: JobConfig, handover: Handover | None = None) -> str:
    """Decoded fields (event_time the plausible one), the group-by key, plus ``reject_reason`` (NULL for a countable event).

    Deterministic per record, so the dead-letter branch and the counting branch always agree. The
    reasons, in order: the format's (``format_reject``: malformed value, input contract, ``missing
    field: <id>``, ``unknown meter: <m>``, ``negative quantity: meter <m> does not allow it``), then
    an implausible event time. The ``dimensions_key`` comes from the source, once, for the window
    guard and the window aggregate alike (on a rejected record it means nothing and is dropped at
    the dedup). At a handover, ``replayed`` follows (:func:`replayed_expr`).
    """
    checks = [f"WHEN `{FORMAT_REJECT}` IS NOT NULL THEN `{FORMAT_REJECT}`"]
    checks.append(
        f"WHEN `{BOUNDED_TIME}` = {OUT_OF_RANGE_TIME} THEN CONCAT('event_time out of range: ', CAST(`event_time` AS STRING),"
        " ' is not within [appended - event_time.max_event_age, appended + event_time.max_event_ahead], appended = ',"
        " CAST(CAST(`kafka_timestamp` AS TIMESTAMP(3)) AS STRING))"
    )
    fields = ", ".join(f"`{BOUNDED_TIME}` AS `event_time`" if f == "event_time" else f"`{f}`" for f in EVENT_FIELDS)
    return (
        f"SELECT\n  {fields}, `proc_time`,\n"
        "  `payload`, `source_topic`, `source_partition`, `source_offset`, `kafka_timestamp`,\n"
        f"  {dimensions_key_column(cfg)} AS `dimensions_key`,\n"
        f"  CASE {' '.join(checks)} END AS `reject_reason`"
        + (f",\n  {replayed_expr(handover)} AS `{REPLAYED}`" if handover is not None else "")
        + f"\nFROM `{USAGE_SOURCE_TABLE}`"
    )
