"""Pure generation of the job's Flink SQL: the options, dedup, classification, window aggregate and sinks.

Everything per event runs in JVM operators declared here and in jobs/source_plan.py (Kafka source
with the meterflow-avro format, validation); Python only builds the statements and submits them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from connectors.avro_types import AVRO_DIR, derive_columns, load_schema
from connectors.topics import dead_letter_max_message_bytes
from jobs.source_plan import EVENT_FIELDS, REPLAYED, USAGE_SOURCE_TABLE, VALIDATED_VIEW
from jobs.sql import ms as _ms
from jobs.sql import sql_epoch_ms, sql_interval, sql_string, sql_with
from meterflow.config import JobConfig, MeterConfig

USAGE_WINDOWS_SINK_TABLE = "usage_windows_sink"
LATE_EVENTS_SINK_TABLE = "late_events_sink"
CLASSIFIED_VIEW = "classified_events"
LATE_EVENT_SCHEMA = AVRO_DIR / "late_usage_event.avsc"


def table_options(cfg: JobConfig) -> dict[str, str]:
    """Table-environment options the job sets (the cluster-wide ones live in flink-conf/)."""
    et = cfg.event_time
    options = {
        "table.local-time-zone": "UTC",
        # Idleness is the usage source's own (jobs/source_plan.py, jvm/ CatchUpIdleness): Flink's would
        # mark a restored split idle before it has fetched, and the watermark would pass its backlog.
        "table.exec.source.idle-timeout": "0 ms",
        # Dedup state (event ids) expires after the horizon; window state is cleaned by the window itself.
        "table.exec.state.ttl": f"{_ms(et.dedup_horizon)} ms",
        "pipeline.name": cfg.flink.job_name,
        # Stable operator uids derived from the plan, so savepoints map back after a resubmit.
        "table.exec.uid.generation": "ALWAYS",
    }
    if et.allowed_lateness:
        # A fired window stays and re-fires with every late event until watermark > end - 1 ms + lateness.
        options["table.exec.emit.allow-lateness"] = f"{_ms(et.allowed_lateness)} ms"
        options["table.exec.emit.late-fire.enabled"] = "true"
        options["table.exec.emit.late-fire.delay"] = "0 ms"
    if et.early_fire_interval:
        options["table.exec.emit.early-fire.enabled"] = "true"
        options["table.exec.emit.early-fire.delay"] = f"{_ms(et.early_fire_interval)} ms"
    return options


def state_backend_options(cfg: JobConfig) -> dict[str, str]:
    """Job options of the configured state backend; RocksDB checkpoints only what changed since the last one.

    RocksDB also gets Bloom filters: nearly every dedup lookup is of a new id, which without a
    filter reads an index block of every sorted file that could hold it, more of them as the
    horizon fills (docs/operations.md, "Sizing the dedup state").
    """
    options: dict[str, str] = {"state.backend.type": cfg.flink.state_backend}
    if cfg.flink.state_backend == "rocksdb":
        options["execution.checkpointing.incremental"] = "true"
        options["state.backend.rocksdb.use-bloom-filter"] = "true"
    return options


COUNT_DEAD_LETTER_FUNCTION = ("count_dead_letter", "dev.meterflow.operators.CountDeadLetter")
BOUNDED_PAYLOAD_FUNCTION = ("bounded_payload", "dev.meterflow.operators.BoundedPayload")
DEAD_LETTER_SINK_TABLE = "dead_letter_sink"
DEAD_LETTER_SCHEMA = AVRO_DIR / "dead_letter.avsc"
REJECTED = "`reject_reason` IS NOT NULL"


def dead_letter_sink_ddl(cfg: JobConfig, table: str = DEAD_LETTER_SINK_TABLE, purpose: str = "dead-letter") -> str:
    """Kafka sink of rejected records: Avro per avro/dead_letter.avsc, exactly-once, to the dead-letter topic.

    Its producer takes requests as large as the topic takes messages (connectors/topics.py): a dead
    letter of the largest input is larger than the input, and a record the producer refuses would
    fail the checkpoint and restart the job forever. Another sink instance to the same topic (another
    source of rejects) needs its own ``table`` and ``purpose``: the purpose names its transactions.
    """
    producer = {"properties.max.request.size": str(dead_letter_max_message_bytes(cfg))}
    return _exactly_once_kafka_sink(cfg, table, DEAD_LETTER_SCHEMA, cfg.kafka.dead_letter_topic, purpose, producer)


def rejected_to_route(handover: bool) -> str:
    """The rejected records the dead-letter insert takes: all of them, but at a handover those the
    graph before read already (``replayed``), whose dead letters went out then."""
    return f"{REJECTED} AND NOT `{REPLAYED}`" if handover else REJECTED


def dead_letter_insert(
    cfg: JobConfig, table: str = DEAD_LETTER_SINK_TABLE, source: str = CLASSIFIED_VIEW, where: str = REJECTED
) -> str:
    """Route every rejected record, raw bytes and reason, to a dead-letter sink (and count it).

    Bounded whatever was sent: the reason is cut to MAX_REASON_CHARS characters (jvm/ CountDeadLetter)
    and the payload to ``kafka.max_message_bytes`` bytes (jvm/ BoundedPayload; only an input topic
    created elsewhere with a larger limit holds longer ones), the reason saying what was cut. So a
    dead letter always fits its topic. ``source`` must have the columns of ``CLASSIFIED_VIEW``'s
    rejects: ``payload``, ``reject_reason``, ``source_topic``, ``source_partition``, ``source_offset``.
    """
    limit = cfg.kafka.max_message_bytes
    payload = f"`{BOUNDED_PAYLOAD_FUNCTION[0]}`(`payload`, {limit})"
    reason = f"`{COUNT_DEAD_LETTER_FUNCTION[0]}`(`reject_reason`, `payload`, {limit})"
    return (
        f"INSERT INTO `{table}`\n"
        f"SELECT {payload}, {reason}, `source_topic`, `source_partition`, `source_offset`, LOCALTIMESTAMP\n"
        f"FROM `{source}` WHERE {where}"
    )


@dataclass(frozen=True)
class JdbcTarget:
    """Where the JDBC sink writes; the password is passed in, never stored in config files."""

    url: str
    table: str
    user: str
    password: str


CLOSED_WINDOWS_VIEW = "closed_windows"


def usage_windows_sink_ddl(target: JdbcTarget, flush_rows: int = 1000, flush_interval_ms: int = 200) -> str:
    """Flink's JDBC upsert sink into a usage table, at-least-once (flushes ahead of checkpoints).

    The usage job does not use it: its rows go through jvm/ ``UsageWindowSink``, committed with
    the checkpoints. It remains for the benchmark's naive baseline, which measures what a plain
    PyFlink job would do.
    """
    options = {
        "connector": "jdbc",
        "url": target.url,
        "table-name": target.table,
        "username": target.user,
        "password": target.password,
        "sink.buffer-flush.max-rows": str(flush_rows),
        "sink.buffer-flush.interval": f"{flush_interval_ms} ms",
        # Few retries: a lasting outage should fail the task and restore from the checkpoint.
        "sink.max-retries": "3",
    }
    return (
        f"CREATE TABLE `{USAGE_WINDOWS_SINK_TABLE}` (\n"
        "  `tenant_id` STRING NOT NULL,\n"
        "  `customer_id` STRING NOT NULL,\n"
        "  `meter` STRING NOT NULL,\n"
        "  `dimensions_key` STRING NOT NULL,\n"
        "  `window_start` TIMESTAMP(3) NOT NULL,\n"
        "  `window_end` TIMESTAMP(3) NOT NULL,\n"
        "  `quantity` DECIMAL(38, 9) NOT NULL,\n"
        "  `event_count` BIGINT NOT NULL,\n"
        "  `revision` BIGINT NOT NULL,\n"
        "  PRIMARY KEY (`tenant_id`, `customer_id`, `meter`, `dimensions_key`, `window_start`, `window_end`) NOT ENFORCED\n"
        f") {sql_with(options)}"
    )


def window_changelog_query(cfg: JobConfig) -> str:
    """The window aggregate of on-time events (classified once, see classify_query).

    Quantity leaves as an exact decimal string: the changelog also feeds a Python operator, and
    the Python bridge has no exact DECIMAL(38, 9) type. The sinks cast it back.
    """
    query = window_aggregate_query(cfg, CLASSIFIED_VIEW, "rowtime", "WHERE `reject_reason` IS NULL AND NOT `is_late`")
    quantity = f"CAST({quantity_expr(cfg)} AS DECIMAL(38, 9)) AS `quantity`"
    return query.replace(quantity, f"CAST(CAST({quantity_expr(cfg)} AS DECIMAL(38, 9)) AS STRING) AS `quantity`")


def _aggregate(meter: MeterConfig) -> str:
    if meter.aggregation == "SUM":
        return "SUM(`quantity`)"
    if meter.aggregation == "COUNT":
        return "CAST(COUNT(*) AS DECIMAL(38, 9))"
    if meter.aggregation == "MAX":
        return "MAX(`quantity`)"
    if meter.aggregation == "LATEST":
        # The quantity of the event with the greatest event_time (ties: greatest event_id):
        # zero-padded epoch ms sort as strings. The separator is U+0001, which the input contract
        # keeps out of every event_id: an id may hold any printable character, '|' included, and
        # U+0001 sorts below all of them, so "a" < "a|b" here as in the id order.
        stamp = f"LPAD(CAST({sql_epoch_ms('`event_time`')} AS STRING), 15, '0')"
        latest = f"MAX(CASE WHEN `meter` = {sql_string(meter.name)} THEN CONCAT({stamp}, CHR(1), `event_id`, CHR(1), CAST(`quantity` AS STRING)) END)"
        return f"CAST(SPLIT_INDEX({latest}, CHR(1), 2) AS DECIMAL(38, 9))"
    # UNIQUE_COUNT: distinct values of one dimension; the CASE keeps other meters out of its state.
    dim = sql_string(meter.unique_dimension or "")
    return f"CAST(COUNT(DISTINCT CASE WHEN `meter` = {sql_string(meter.name)} THEN `dimensions`[{dim}] END) AS DECIMAL(38, 9))"


def quantity_expr(cfg: JobConfig) -> str:
    """Each meter's aggregation; a group holds one meter, so a CASE on it picks the aggregate."""
    if all(m.aggregation == "SUM" for m in cfg.meters):
        return "SUM(`quantity`)"
    cases = " ".join(f"WHEN {sql_string(m.name)} THEN {_aggregate(m)}" for m in cfg.meters)
    return f"CASE `meter` {cases} END"


def window_aggregate_query(
    cfg: JobConfig, source: str = USAGE_SOURCE_TABLE, time_column: str = "event_time", where: str = ""
) -> str:
    """Each meter's aggregation per (tenant, customer, meter, dimensions key, tumbling event-time window).

    ``revision`` is the number of events the row covers: every update of a window adds at least
    one event, so it strictly increases and lets the sink refuse an older row replayed after a failover.
    """
    size = sql_interval(cfg.event_time.window_size)
    return (
        "SELECT\n"
        "  `tenant_id`, `customer_id`, `meter`, `dimensions_key`,\n"
        f"  CAST(TUMBLE_START(`{time_column}`, {size}) AS TIMESTAMP(3)) AS `window_start`,\n"
        f"  CAST(TUMBLE_END(`{time_column}`, {size}) AS TIMESTAMP(3)) AS `window_end`,\n"
        f"  CAST({quantity_expr(cfg)} AS DECIMAL(38, 9)) AS `quantity`,\n"
        "  COUNT(*) AS `event_count`,\n"
        "  COUNT(*) AS `revision`\n"
        f"FROM `{source}` {where}\n"
        f"GROUP BY `tenant_id`, `customer_id`, `meter`, `dimensions_key`, TUMBLE(`{time_column}`, {size})"
    )


def dedup_query(source: str = USAGE_SOURCE_TABLE, columns: tuple[str, ...] = EVENT_FIELDS) -> str:
    """Keep the first copy of each (tenant_id, event_id); append-only, keeps event_time as rowtime.

    The state per id lives for ``dedup_horizon`` (table.exec.state.ttl): a copy arriving later than
    that is counted again, so the horizon must exceed how long producers may retry.
    """
    cols = ", ".join(f"`{c}`" for c in columns)
    return (
        f"SELECT {cols} FROM (\n"
        f"  SELECT {cols}, ROW_NUMBER() OVER (PARTITION BY `tenant_id`, `event_id` ORDER BY `proc_time` ASC) AS `row_num`\n"
        f"  FROM {source}\n"
        ") WHERE `row_num` = 1"
    )


def classify_query(cfg: JobConfig, deduped: str) -> str:
    """Each unique event with its window, the columns the lateness decision reads.

    The decision itself is made once per event by the JVM classifier (jvm/ ``LatenessClassifier``)
    on the materialised stream, which appends ``DECISION_COLUMNS`` to each row, against a watermark
    held in checkpointed state: a SQL ``CURRENT_WATERMARK`` starts from NULL after every restore,
    so a replay could call on time an event whose window was already purged, and lose it.
    A rejected record (``reject_reason`` set) gets no window, so the classifier passes it unchanged.
    """
    size_ms = _ms(cfg.event_time.window_size)
    event_ms = sql_epoch_ms("`event_time`")
    start_ms = f"({event_ms} - MOD({event_ms}, {size_ms}))"
    counted = "`reject_reason` IS NULL"
    cols = ", ".join(f"`{c}`" for c in EVENT_FIELDS)
    rejects = ", ".join(f"`{c}`" for c, _ in _REJECT_COLUMNS)
    return (
        f"SELECT {cols},\n"
        f"  CASE WHEN {counted} THEN `dimensions_key` END AS `dimensions_key`,\n"
        f"  CASE WHEN {counted} THEN CAST(TO_TIMESTAMP_LTZ({start_ms}, 3) AS TIMESTAMP(3)) END AS `window_start`,\n"
        f"  CASE WHEN {counted} THEN CAST(TO_TIMESTAMP_LTZ({start_ms} + {size_ms}, 3) AS TIMESTAMP(3)) END AS `window_end`,\n"
        f"  {rejects}\n"
        f"FROM {deduped}"
    )


# Columns only rejected records carry (NULL on counted events), with their types.
_REJECT_COLUMNS = (
    ("payload", "BYTES"),
    ("source_topic", "STRING"),
    ("source_partition", "INT"),
    ("source_offset", "BIGINT"),
    ("reject_reason", "STRING"),
)
_WINDOW_COLUMNS = ("dimensions_key", "window_start", "window_end")


ROUTED_COLUMNS = (*EVENT_FIELDS, *_WINDOW_COLUMNS, *(c for c, _ in _REJECT_COLUMNS))
# What the classifier appends to each routed row (jvm/ LatenessClassifier.DECISION_COLUMNS).
DECISION_COLUMNS = ("watermark", "lateness_ms", "is_late")
CLASSIFIED_COLUMNS = (*ROUTED_COLUMNS, *DECISION_COLUMNS)


def classifier_fields() -> tuple[int, int]:
    """Positions in a routed row of what the JVM classifier reads: the event time and the window end."""
    return (ROUTED_COLUMNS.index("event_time"), ROUTED_COLUMNS.index("window_end"))


def routed_query(cfg: JobConfig, source: str = VALIDATED_VIEW) -> str:
    """Every record once, in one stream: unique events classified late or on time, and rejected records.

    Rejected records go through the dedup too, so the dedup, the classifier and the late and
    dead-letter sinks have one input and run chained in one task, and the topic is read and
    decoded once. The dedup key of a rejected record is its Kafka coordinates and timestamp in
    ``event_id`` with a NULL ``tenant_id``: unique to it, so it is never taken for a copy, and never equal to
    a counted event's key, whose ``tenant_id`` is set. The dead-letter branch reads only its bytes,
    reason and coordinates. Counted events carry those as NULL, so the keyed exchange moves no
    payload for them. The caller materialises the stream once; the dead-letter, window and late
    branches filter its rows. Rejected rows have ``reject_reason`` set and NULL window and decision
    columns; counted rows the reverse. ``source`` has the validated view's columns; the job reads
    the window guard's ``GUARDED_VIEW``, whose refusals are rejected records like any other.
    """
    counted = "`reject_reason` IS NULL"
    # The record's timestamp too: a topic deleted and created again starts its offsets over.
    coordinates = "CONCAT(`source_topic`, '/', CAST(`source_partition` AS STRING), '/', CAST(`source_offset` AS STRING), '/', CAST(`kafka_timestamp` AS STRING))"
    keyed = {
        "tenant_id": f"CASE WHEN {counted} THEN `tenant_id` END",
        "event_id": f"CASE WHEN {counted} THEN `event_id` ELSE {coordinates} END",
    }
    events = ", ".join(f"{keyed[c]} AS `{c}`" if c in keyed else f"`{c}`" for c in EVENT_FIELDS)
    rejects = ", ".join(
        f"CASE WHEN NOT {counted} THEN `{c}` END AS `{c}`" for c, _ in _REJECT_COLUMNS if c != "reject_reason"
    )
    key = f"CASE WHEN {counted} THEN `dimensions_key` END AS `dimensions_key`"
    both = f"(SELECT {events}, `proc_time`, {key}, {rejects}, `reject_reason` FROM `{source}`)"
    return classify_query(
        cfg, f"({dedup_query(both, (*EVENT_FIELDS, 'dimensions_key', *(c for c, _ in _REJECT_COLUMNS)))})"
    )


def late_events_sink_ddl(cfg: JobConfig) -> str:
    """Kafka sink of late events: Avro per avro/late_usage_event.avsc, exactly-once (transactional)."""
    return _exactly_once_kafka_sink(cfg, LATE_EVENTS_SINK_TABLE, LATE_EVENT_SCHEMA, cfg.kafka.late_events_topic, "late")


def _exactly_once_kafka_sink(
    cfg: JobConfig, table: str, schema: Path, topic: str, purpose: str, extra: dict[str, str] | None = None
) -> str:
    """A transactional Avro Kafka sink whose columns are derived from ``schema``; ``extra`` adds options.

    Records become visible to read_committed readers when the checkpoint covering them completes.
    """
    cols = ",\n  ".join(c.ddl() for c in derive_columns(load_schema(schema)))
    options = {
        "connector": "kafka",
        "topic": topic,
        "properties.bootstrap.servers": cfg.kafka.bootstrap_servers,
        "properties.transaction.timeout.ms": str(_ms(cfg.kafka.transaction_timeout)),
        "sink.delivery-guarantee": "exactly-once",
        "sink.transactional-id-prefix": f"{cfg.flink.job_name}-{purpose}",
        "format": "avro",
        **(extra or {}),
    }
    return f"CREATE TABLE `{table}` (\n  {cols}\n) {sql_with(options)}"


LATE_EVENT_COLUMNS = (*EVENT_FIELDS, "window_start", "window_end", "watermark", "lateness_ms")


def late_events_insert(
    source: str = CLASSIFIED_VIEW, where: str = "WHERE `reject_reason` IS NULL AND `is_late`"
) -> str:
    """Route every late event, with why it is late, to the late-events sink.

    ``source`` has ``LATE_EVENT_COLUMNS``: the classified view (whose late rows ``where`` picks), or
    the two-stage graph's late rows (jvm/ ``StageRows.LATE_COLUMNS``), all late.
    """
    cols = ", ".join(f"`{c}`" for c in LATE_EVENT_COLUMNS)
    return (
        f"INSERT INTO `{LATE_EVENTS_SINK_TABLE}`\n"
        f"SELECT {cols}, LOCALTIMESTAMP AS `seen_at`\n"
        f"FROM `{source}` {where}".rstrip()
    )


CLOSED_WINDOWS_SINK_TABLE = "closed_windows_sink"
CLOSED_WINDOW_SCHEMA = AVRO_DIR / "closed_window.avsc"


def closed_windows_sink_ddl(cfg: JobConfig) -> str:
    """Kafka sink of closed windows: Avro per avro/closed_window.avsc, exactly-once (transactional).

    The integration point for billing and any other consumer of final usage: each closed window is
    published once, visible to read_committed readers when the checkpoint covering it completes.
    """
    return _exactly_once_kafka_sink(
        cfg, CLOSED_WINDOWS_SINK_TABLE, CLOSED_WINDOW_SCHEMA, cfg.kafka.closed_windows_topic, "closed-windows"
    )


def closed_windows_insert() -> str:
    """Every window the closer emits, with its final value, to the closed-windows sink.

    The closer's rows carry times as epoch ms and the quantity as an exact decimal string (the
    Python bridge has no DECIMAL(38, 9)); both go back to the Avro logical types here, in the JVM.
    """

    def ts(column: str) -> str:
        return f"CAST(TO_TIMESTAMP_LTZ(`{column}`, 3) AS TIMESTAMP(3))"

    return (
        f"INSERT INTO `{CLOSED_WINDOWS_SINK_TABLE}`\n"
        f"SELECT `tenant_id`, `customer_id`, `meter`, `dimensions_key`, {ts('window_start_ms')}, {ts('window_end_ms')},\n"
        "  CAST(`quantity` AS DECIMAL(38, 9)), `event_count`, `revision`\n"
        f"FROM `{CLOSED_WINDOWS_VIEW}`"
    )
