"""The meterflow usage job: wires the Flink graph, nothing else.

Kafka (decoded by the meterflow-avro format) -> validate -> dedup -> classify late/on time once ->
dead letters | late events | window guard (dimension combinations, sum) -> window aggregate ->
per-fire upserts + window closer -> final rows + the closed-windows topic (billing reads it in its
own job, jobs/billing_job.py); the guard's refusals are dead letters too.

Submit with ``meterflow submit`` or directly::

    flink run -d -py jobs/usage_job.py --config meterflow.yaml

All per-event work runs in JVM operators declared as SQL (jobs/source_plan.py, jobs/plan.py) and the
Java code in udf/ (the Avro format, functions, the window closer); the job runs no Python operator.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from py4j.java_gateway import get_java_class
from pyflink.common import Configuration
from pyflink.datastream import DataStream, StreamExecutionEnvironment
from pyflink.java_gateway import get_gateway
from pyflink.table import DataTypes, Schema, StatementSet, StreamTableEnvironment
from pyflink.table.changelog_mode import ChangelogMode

from jobs.plan import (
    BOUNDED_PAYLOAD_FUNCTION,
    CLASSIFIED_VIEW,
    CLOSED_WINDOWS_VIEW,
    COUNT_DEAD_LETTER_FUNCTION,
    GUARD_DEAD_LETTER_PURPOSE,
    GUARD_DEAD_LETTER_SINK_TABLE,
    GUARD_DEAD_LETTERS_VIEW,
    GUARDED_VIEW,
    classifier_fields,
    closed_windows_insert,
    closed_windows_sink_ddl,
    dead_letter_insert,
    dead_letter_sink_ddl,
    late_events_insert,
    late_events_sink_ddl,
    routed_query,
    state_backend_options,
    table_options,
    window_changelog_query,
)
from jobs.source_plan import VALIDATED_VIEW, usage_source_ddl, validate_query
from meterflow.config import JobConfig, load_config
from meterflow.errors import ConfigError
from meterflow.security import WindowSinkTarget, window_sink_target_of
from sinks.postgres_schema import usage_upsert_sql
from sinks.window_closer import CLOSED_WINDOW_COLUMNS


def build_environment(cfg: JobConfig, extra: dict[str, str] | None = None) -> tuple[StreamExecutionEnvironment, StreamTableEnvironment]:
    """Streaming table environment with exactly-once checkpointing from config."""
    conf = Configuration()
    conf.set_string("execution.checkpointing.interval", f"{int(cfg.flink.checkpoint_interval.total_seconds() * 1000)} ms")
    conf.set_string("execution.checkpointing.mode", "EXACTLY_ONCE")
    conf.set_string("execution.checkpointing.dir", cfg.checkpoint_uri())
    conf.set_string("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
    conf.set_string("parallelism.default", str(cfg.flink.parallelism))
    # Chained operators hand records over without a defensive copy, and the SQL operators reuse
    # their output rows. Safe because each operator of the job is done with a record before the
    # next arrives (Calc, the classifier, the Kafka writers, the network exchange), and what is
    # kept longer is a copy: the Postgres sinks buffer rows freshly converted to external rows.
    conf.set_string("pipeline.object-reuse", "true")
    for key, value in {**state_backend_options(cfg), **(extra or {})}.items():
        conf.set_string(key, value)
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    t_env = StreamTableEnvironment.create(env)
    for key, value in table_options(cfg).items():
        t_env.get_config().set(key, value)
    return env, t_env


def window_sink_target(cfg: JobConfig) -> WindowSinkTarget:
    """The Postgres usage table as udf/ UsageWindowSink sees it: the password's source, not its value."""
    if cfg.postgres.password is None:
        msg = "no Postgres password: set METERFLOW_POSTGRES_PASSWORD (or METERFLOW_POSTGRES_PASSWORD_FILE) or put it in the secrets file"
        raise ConfigError(msg)
    return window_sink_target_of(cfg)


def _rowtime_schema() -> Schema:
    """A stream's own columns plus its record timestamps as ``rowtime``, with the stream's watermarks."""
    return Schema.new_builder().column_by_metadata("rowtime", DataTypes.TIMESTAMP_LTZ(3)).watermark("rowtime", "SOURCE_WATERMARK()").build()


def _materialise_classified(t_env: StreamTableEnvironment, cfg: JobConfig) -> Any:
    """Evaluate the routed query once, classify each event late or on time in the JVM, register the view.

    Branches that read the view see one evaluation per record; reading the query itself from two
    INSERTs would evaluate it twice, and a watermark-dependent column could disagree. The
    classifier (udf/ LatenessClassifier) holds the watermark in checkpointed state, so a restore
    never judges an event against "no watermark yet" (Flink does not checkpoint watermarks).
    """
    jvm = get_gateway().jvm
    routed = t_env.sql_query(routed_query(cfg))._j_table
    row_type = routed.getResolvedSchema().toPhysicalRowDataType()
    # Internal rows (RowData) in and out: no conversion to external rows on either side of the classifier.
    rows = t_env._j_tenv.toDataStream(routed, row_type.bridgedTo(get_java_class(jvm.org.apache.flink.table.data.RowData)))
    classifier = jvm.dev.meterflow.udf.LatenessClassifier
    lateness_ms = int(cfg.event_time.allowed_lateness.total_seconds() * 1000)
    j_classified = classifier.apply(rows, row_type.getLogicalType(), classifier(*classifier_fields(), lateness_ms), "classify late or on time", "classify-lateness")
    t_env.create_temporary_view(CLASSIFIED_VIEW, t_env.from_data_stream(DataStream(j_classified), _rowtime_schema()))
    return j_classified


def _guard_windows(t_env: StreamTableEnvironment, cfg: JobConfig, j_classified: Any) -> None:
    """The window guard (udf/ WindowGuard) on the classified stream's counted on-time rows, registered as views.

    ``GUARDED_VIEW``: the rows it admits, unchanged, with their rowtime (the window aggregate reads
    it). ``GUARD_DEAD_LETTERS_VIEW``: the ones it refuses, as dead-letter rows. Keyed by (tenant,
    customer, meter, window), it is a task of its own: a keyed exchange after the classifier's.
    """
    guard = get_gateway().jvm.dev.meterflow.udf.WindowGuard
    lateness_ms = int(cfg.event_time.allowed_lateness.total_seconds() * 1000)
    # Internal rows in and out, of the classifier's row type (its InternalTypeInfo).
    limits = guard(j_classified.getType().toRowType(), cfg.input.max_dimension_combinations, lateness_ms, cfg.kafka.usage_events_topic)
    j_guarded = guard.apply(j_classified, limits, "guard window limits", "guard-window-limits")
    t_env.create_temporary_view(GUARDED_VIEW, t_env.from_data_stream(DataStream(j_guarded), _rowtime_schema()))
    t_env.create_temporary_view(GUARD_DEAD_LETTERS_VIEW, t_env.from_data_stream(DataStream(j_guarded.getSideOutput(guard.deadLetters()))))


def declare_routed_views(t_env: StreamTableEnvironment, cfg: JobConfig) -> None:
    """From the validated view to the views the branches read: ``CLASSIFIED_VIEW`` (dead letters, late
    events), ``GUARDED_VIEW`` (the window aggregate) and ``GUARD_DEAD_LETTERS_VIEW`` (the guard's dead letters)."""
    _guard_windows(t_env, cfg, _materialise_classified(t_env, cfg))


def _write_windows(stream: DataStream, target: WindowSinkTarget, *, final: bool) -> None:
    """Window rows into Postgres, committed with the checkpoints (udf/ UsageWindowSink).

    The sink carries where the TaskManager reads the password (udf/ Secrets), never the password.
    """
    udf = get_gateway().jvm.dev.meterflow.udf
    password = udf.Secrets(target.password_variable, target.secrets_file)
    sink = udf.UsageWindowSink(target.url, target.user, password, usage_upsert_sql(target.table), final)
    name, uid = ("write final windows", "write-final-windows") if final else ("write window updates", "write-window-updates")
    stream._j_data_stream.sinkTo(sink).name(name).uid(uid)


WINDOW_CHANGELOG_SCHEMA = (
    ("tenant_id", DataTypes.STRING()),
    ("customer_id", DataTypes.STRING()),
    ("meter", DataTypes.STRING()),
    ("dimensions_key", DataTypes.STRING()),
    ("window_start", DataTypes.TIMESTAMP(3)),
    ("window_end", DataTypes.TIMESTAMP(3)),
    ("quantity", DataTypes.STRING()),
    ("event_count", DataTypes.BIGINT()),
    ("revision", DataTypes.BIGINT()),
)


def _close_windows(changelog: DataStream, allowed_lateness_ms: int) -> DataStream:
    """Each window once, with its final value: the JVM closer of udf/ (dev.meterflow.udf.WindowCloser).

    Declared through the Java DataStream API: one element per window update would otherwise cross
    into a Python worker, whose per-key state round trips cap the whole job at a few hundred
    windows per second.
    """
    closer = get_gateway().jvm.dev.meterflow.udf.WindowCloser
    j_closed = changelog._j_data_stream.keyBy(closer.windowKey()).process(closer(allowed_lateness_ms), closer.outputType())
    return DataStream(j_closed.name("close windows").uid("close-windows-jvm"))


def _declare_windows(t_env: StreamTableEnvironment, cfg: JobConfig) -> None:
    """The window aggregate of the guarded rows, computed once, feeding both the per-fire rows and the window closer's final rows."""
    builder = Schema.new_builder()
    for name, data_type in WINDOW_CHANGELOG_SCHEMA:
        builder = builder.column(name, data_type.not_null())
    schema = builder.primary_key("tenant_id", "customer_id", "meter", "dimensions_key", "window_start").build()
    changelog = t_env.to_changelog_stream(t_env.sql_query(window_changelog_query(cfg, GUARDED_VIEW)), schema, ChangelogMode.upsert())
    _write_windows(changelog, window_sink_target(cfg), final=False)
    closed = _close_windows(changelog, int(cfg.event_time.allowed_lateness.total_seconds() * 1000))
    _write_windows(closed, window_sink_target(cfg), final=True)
    closed_schema = Schema.new_builder()
    for name, _, data_type in CLOSED_WINDOW_COLUMNS:
        closed_schema = closed_schema.column(name, data_type)
    # Records emitted by the closer's timers carry the timer time: the watermark flows on.
    closed_schema = closed_schema.column_by_metadata("rowtime", DataTypes.TIMESTAMP_LTZ(3)).watermark("rowtime", "SOURCE_WATERMARK()")
    t_env.create_temporary_view(CLOSED_WINDOWS_VIEW, t_env.from_data_stream(closed, closed_schema.build()))


def declare_pipeline(t_env: StreamTableEnvironment, cfg: JobConfig) -> StatementSet:
    """Kafka (decoded in the source) -> validate -> dedup -> classify once -> (dead letters | guard -> windows | late)."""
    t_env.create_java_temporary_system_function(*COUNT_DEAD_LETTER_FUNCTION)
    t_env.create_java_temporary_system_function(*BOUNDED_PAYLOAD_FUNCTION)
    t_env.execute_sql(usage_source_ddl(cfg))
    t_env.execute_sql(late_events_sink_ddl(cfg))
    t_env.execute_sql(dead_letter_sink_ddl(cfg))
    t_env.execute_sql(dead_letter_sink_ddl(cfg, GUARD_DEAD_LETTER_SINK_TABLE, GUARD_DEAD_LETTER_PURPOSE))
    t_env.execute_sql(closed_windows_sink_ddl(cfg))
    t_env.create_temporary_view(VALIDATED_VIEW, t_env.sql_query(validate_query(cfg)))
    # Classified events and rejected records in one materialised stream: the topic is read once,
    # and the dedup, the classifier and the late and dead-letter sinks run chained. The window
    # guard follows, keyed by window, in a task of its own with its dead-letter sink.
    declare_routed_views(t_env, cfg)
    _declare_windows(t_env, cfg)
    statements = t_env.create_statement_set()
    statements.add_insert_sql(late_events_insert())
    statements.add_insert_sql(dead_letter_insert(cfg))
    # The guard's refusals: the same topic, through a sink instance of their own (own transactions).
    statements.add_insert_sql(dead_letter_insert(cfg, GUARD_DEAD_LETTER_SINK_TABLE, GUARD_DEAD_LETTERS_VIEW))
    # Each closed window once, exactly-once, for billing and other consumers (see avro/closed_window.avsc).
    statements.add_insert_sql(closed_windows_insert())
    return statements


def main(argv: list[str] | None = None) -> None:
    """Load config, declare the pipeline and submit it to the cluster."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config file (default: $METERFLOW_CONFIG or ./meterflow.yaml)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    # The tables the job writes, created (idempotently) so a first submit needs no manual step.
    from sinks.ledger import apply_schemas

    apply_schemas(cfg)
    env, t_env = build_environment(cfg)
    # The window rows go to DataStream sinks (committed with checkpoints), the Kafka outputs to SQL
    # sinks: attach the SQL inserts to the same stream graph and submit it as one job.
    declare_pipeline(t_env, cfg).attach_as_datastream()
    job_client = env.execute_async(cfg.flink.job_name)
    print(f"submitted job {job_client.get_job_id()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
