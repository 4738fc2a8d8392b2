"""Pure generation of the job's Flink SQL: the tables, the options and the window aggregate.

Everything per event runs in JVM operators declared here (Kafka source, Avro decoding, window
aggregate, JDBC upsert); Python only builds the statements and submits them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from connectors.avro_types import Column, derive_columns, load_schema
from meterflow.config import JobConfig

USAGE_SOURCE_TABLE = "usage_events"
USAGE_WINDOWS_SINK_TABLE = "usage_windows_sink"


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


def table_options(cfg: JobConfig) -> dict[str, str]:
    """Table-environment options the job sets (the cluster-wide ones live in flink-conf/)."""
    return {
        "table.local-time-zone": "UTC",
        "table.exec.source.idle-timeout": f"{int(cfg.event_time.source_idle_timeout.total_seconds() * 1000)} ms",
        "pipeline.name": cfg.flink.job_name,
    }


def usage_source_ddl(cfg: JobConfig, columns: list[Column] | None = None, connector: dict[str, str] | None = None) -> str:
    """Source of usage events: columns derived from the .avsc, event-time watermark from config.

    ``connector`` replaces the Kafka options (graph tests read a bounded file with the same columns).
    """
    columns = columns if columns is not None else derive_columns(load_schema())
    cols = ",\n  ".join(c.ddl() for c in columns)
    watermark = f"WATERMARK FOR `event_time` AS `event_time` - {sql_interval(cfg.event_time.watermark_delay)}"
    options = connector if connector is not None else kafka_source_options(cfg)
    return f"CREATE TABLE `{USAGE_SOURCE_TABLE}` (\n  {cols},\n  {watermark}\n) {_with(options)}"


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
    """The INSERT that runs the pipeline: the window aggregate into the Postgres sink."""
    return f"INSERT INTO `{USAGE_WINDOWS_SINK_TABLE}`\n{window_aggregate_query(cfg)}"


def window_aggregate_query(cfg: JobConfig) -> str:
    """SUM and COUNT per (tenant, customer, meter, tumbling event-time window).

    ``revision`` is the number of events the row covers: every update of a window adds at least
    one event, so it strictly increases and lets the sink refuse an older row replayed after a failover.
    """
    size = sql_interval(cfg.event_time.window_size)
    return (
        "SELECT\n"
        "  `tenant_id`, `customer_id`, `meter`,\n"
        f"  TUMBLE_START(`event_time`, {size}) AS `window_start`,\n"
        f"  TUMBLE_END(`event_time`, {size}) AS `window_end`,\n"
        "  CAST(SUM(`quantity`) AS DECIMAL(38, 9)) AS `quantity`,\n"
        "  COUNT(*) AS `event_count`,\n"
        "  COUNT(*) AS `revision`\n"
        f"FROM `{USAGE_SOURCE_TABLE}`\n"
        f"GROUP BY `tenant_id`, `customer_id`, `meter`, TUMBLE(`event_time`, {size})"
    )
