"""Pure generation of the job's Flink SQL: the tables, the options and the window aggregate.

Everything per event runs in JVM operators declared here (Kafka source, Avro decoding, window
aggregate, JDBC upsert); Python only builds the statements and submits them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from connectors.avro_types import AVRO_DIR, Column, derive_columns, load_schema
from meterflow.config import JobConfig

USAGE_SOURCE_TABLE = "usage_events"
USAGE_WINDOWS_SINK_TABLE = "usage_windows_sink"
LATE_EVENTS_SINK_TABLE = "late_events_sink"
CLASSIFIED_VIEW = "classified_events"
LATE_EVENT_SCHEMA = AVRO_DIR / "late_usage_event.avsc"
EVENT_FIELDS = ("event_id", "tenant_id", "customer_id", "meter", "quantity", "event_time", "dimensions")


def sql_interval(value: timedelta) -> str:
    """A Flink SQL interval literal for a duration, exact to the millisecond."""
    ms = int(value / timedelta(milliseconds=1))
    if ms % 1000 == 0:
        return f"INTERVAL '{ms // 1000}' SECOND"
    return f"INTERVAL '{ms // 1000}.{ms % 1000:03d}' SECOND(3)"


def sql_string(value: str) -> str:
    """A single-quoted SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def _with(options: dict[str, str]) -> str:
    body = ",\n  ".join(f"{sql_string(k)} = {sql_string(v)}" for k, v in options.items())
    return f"WITH (\n  {body}\n)"


def _ms(value: timedelta) -> int:
    return int(value / timedelta(milliseconds=1))


def table_options(cfg: JobConfig) -> dict[str, str]:
    """Table-environment options the job sets (the cluster-wide ones live in flink-conf/)."""
    et = cfg.event_time
    options = {
        "table.local-time-zone": "UTC",
        "table.exec.source.idle-timeout": f"{_ms(et.source_idle_timeout)} ms",
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


def sql_epoch_ms(expr: str) -> str:
    """Epoch milliseconds of a TIMESTAMP(3) expression (Flink has no millisecond TIMESTAMPDIFF)."""
    return f"(EXTRACT(EPOCH FROM {expr}) * 1000 + MOD(EXTRACT(MILLISECOND FROM {expr}), 1000))"


def usage_source_ddl(cfg: JobConfig, columns: list[Column] | None = None, connector: dict[str, str] | None = None) -> str:
    """Source of usage events: columns derived from the .avsc, event-time watermark from config.

    ``connector`` replaces the Kafka options (graph tests read a bounded file with the same columns).
    """
    columns = columns if columns is not None else derive_columns(load_schema())
    cols = ",\n  ".join(c.ddl() for c in columns)
    watermark = f"WATERMARK FOR `event_time` AS `event_time` - {sql_interval(cfg.event_time.watermark_delay)}"
    options = connector if connector is not None else kafka_source_options(cfg)
    return f"CREATE TABLE `{USAGE_SOURCE_TABLE}` (\n  {cols},\n  `proc_time` AS PROCTIME(),\n  {watermark}\n) {_with(options)}"


def kafka_source_options(cfg: JobConfig) -> dict[str, str]:
    """Kafka connector options of the usage source (plain Avro values)."""
    return {
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
        "format": "avro",
    }


@dataclass(frozen=True)
class JdbcTarget:
    """Where the JDBC sink writes; the password is passed in, never stored in config files."""

    url: str
    table: str
    user: str
    password: str


def usage_windows_sink_ddl(target: JdbcTarget, flush_rows: int = 1000) -> str:
    """JDBC upsert sink into ``usage_windows``.

    The connector flushes its buffer on every checkpoint (and every ``flush_rows``), so rows whose
    input a completed checkpoint covers are in Postgres. Upserts are idempotent; the table's
    trigger ignores a row whose revision is older than the stored one (see sinks/postgres_schema.py).
    """
    options = {
        "connector": "jdbc",
        "url": target.url,
        "table-name": target.table,
        "username": target.user,
        "password": target.password,
        "sink.buffer-flush.max-rows": str(flush_rows),
        "sink.buffer-flush.interval": "1 s",
        "sink.max-retries": "10",
    }
    return (
        f"CREATE TABLE `{USAGE_WINDOWS_SINK_TABLE}` (\n"
        "  `tenant_id` STRING NOT NULL,\n"
        "  `customer_id` STRING NOT NULL,\n"
        "  `meter` STRING NOT NULL,\n"
        "  `window_start` TIMESTAMP(3) NOT NULL,\n"
        "  `window_end` TIMESTAMP(3) NOT NULL,\n"
        "  `quantity` DECIMAL(38, 9) NOT NULL,\n"
        "  `event_count` BIGINT NOT NULL,\n"
        "  `revision` BIGINT NOT NULL,\n"
        "  PRIMARY KEY (`tenant_id`, `customer_id`, `meter`, `window_start`) NOT ENFORCED\n"
        f") {_with(options)}"
    )


def window_aggregate_sql(cfg: JobConfig) -> str:
    """The INSERT of on-time events (classified once, see classify_query) into the Postgres sink."""
    return f"INSERT INTO `{USAGE_WINDOWS_SINK_TABLE}`\n{window_aggregate_query(cfg, CLASSIFIED_VIEW, 'rowtime', 'WHERE NOT `is_late`')}"


def window_aggregate_query(cfg: JobConfig, source: str = USAGE_SOURCE_TABLE, time_column: str = "event_time", where: str = "") -> str:
    """SUM and COUNT per (tenant, customer, meter, tumbling event-time window).

    ``revision`` is the number of events the row covers: every update of a window adds at least
    one event, so it strictly increases and lets the sink refuse an older row replayed after a failover.
    """
    size = sql_interval(cfg.event_time.window_size)
    return (
        "SELECT\n"
        "  `tenant_id`, `customer_id`, `meter`,\n"
        f"  CAST(TUMBLE_START(`{time_column}`, {size}) AS TIMESTAMP(3)) AS `window_start`,\n"
        f"  CAST(TUMBLE_END(`{time_column}`, {size}) AS TIMESTAMP(3)) AS `window_end`,\n"
        "  CAST(SUM(`quantity`) AS DECIMAL(38, 9)) AS `quantity`,\n"
        "  COUNT(*) AS `event_count`,\n"
        "  COUNT(*) AS `revision`\n"
        f"FROM `{source}` {where}\n"
        f"GROUP BY `tenant_id`, `customer_id`, `meter`, TUMBLE(`{time_column}`, {size})"
    )


def dedup_query() -> str:
    """Keep the first copy of each (tenant_id, event_id); append-only, keeps event_time as rowtime.

    The state per id lives for ``dedup_horizon`` (table.exec.state.ttl): a copy arriving later than
    that is counted again, so the horizon must exceed how long producers may retry.
    """
    cols = ", ".join(f"`{c}`" for c in EVENT_FIELDS)
    return (
        f"SELECT {cols} FROM (\n"
        f"  SELECT {cols}, ROW_NUMBER() OVER (PARTITION BY `tenant_id`, `event_id` ORDER BY `proc_time` ASC) AS `row_num`\n"
        f"  FROM `{USAGE_SOURCE_TABLE}`\n"
        ") WHERE `row_num` = 1"
    )


def classify_query(cfg: JobConfig, deduped: str) -> str:
    """Tag each unique event late or on time, with the same rule the window operator drops by.

    Late iff watermark >= window_end - 1 ms + allowed_lateness (the window is already purged).
    The caller materialises this once (to_data_stream -> from_data_stream) before branching, so the
    window branch and the late branch see one decision per event, never two.
    """
    size_ms = _ms(cfg.event_time.window_size)
    lateness_ms = _ms(cfg.event_time.allowed_lateness)
    event_ms = sql_epoch_ms("`event_time`")
    wm = "CURRENT_WATERMARK(`event_time`)"
    start_ms = f"({event_ms} - MOD({event_ms}, {size_ms}))"
    cols = ", ".join(f"`{c}`" for c in EVENT_FIELDS)
    return (
        f"SELECT {cols},\n"
        f"  CAST(TO_TIMESTAMP_LTZ({start_ms}, 3) AS TIMESTAMP(3)) AS `window_start`,\n"
        f"  CAST(TO_TIMESTAMP_LTZ({start_ms} + {size_ms}, 3) AS TIMESTAMP(3)) AS `window_end`,\n"
        f"  CAST({wm} AS TIMESTAMP(3)) AS `watermark`,\n"
        f"  CAST({sql_epoch_ms(wm)} - {event_ms} AS BIGINT) AS `lateness_ms`,\n"
        f"  ({wm} IS NOT NULL AND {sql_epoch_ms(wm)} >= {start_ms} + {size_ms} - 1 + {lateness_ms}) AS `is_late`\n"
        f"FROM {deduped}"
    )


def late_events_sink_ddl(cfg: JobConfig) -> str:
    """Kafka sink of late events: Avro per avro/late_usage_event.avsc, exactly-once (transactional)."""
    cols = ",\n  ".join(c.ddl() for c in derive_columns(load_schema(LATE_EVENT_SCHEMA)))
    options = {
        "connector": "kafka",
        "topic": cfg.kafka.late_events_topic,
        "properties.bootstrap.servers": cfg.kafka.bootstrap_servers,
        "properties.transaction.timeout.ms": str(_ms(cfg.kafka.transaction_timeout)),
        "sink.delivery-guarantee": "exactly-once",
        "sink.transactional-id-prefix": f"{cfg.flink.job_name}-late",
        "format": "avro",
    }
    return f"CREATE TABLE `{LATE_EVENTS_SINK_TABLE}` (\n  {cols}\n) {_with(options)}"


def late_events_insert() -> str:
    """Route every late event, with why it is late, to the late-events sink."""
    cols = ", ".join(f"`{c}`" for c in EVENT_FIELDS)
    return (
        f"INSERT INTO `{LATE_EVENTS_SINK_TABLE}`\n"
        f"SELECT {cols}, `window_start`, `window_end`, `watermark`, `lateness_ms`, LOCALTIMESTAMP AS `seen_at`\n"
        f"FROM `{CLASSIFIED_VIEW}` WHERE `is_late`"
    )
