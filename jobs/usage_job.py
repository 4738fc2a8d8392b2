"""The meterflow usage job: wires the Flink graph, nothing else.

Kafka (decoded by the meterflow-avro format) -> validate -> window guard (dimension combinations,
sum) -> dedup -> classify late/on time once -> dead letters | late events | window aggregate ->
per-fire upserts + window closer -> final rows + the closed-windows topic (billing reads it in its
own job, jobs/billing_job.py).

Submit with ``meterflow submit`` or directly::

    flink run -d -py jobs/usage_job.py --config meterflow.yaml

All per-event work runs in JVM operators declared as SQL (jobs/source_plan.py, jobs/plan.py) and the
Java code in jvm/ (the Avro format, functions, the window closer); the job runs no Python operator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from py4j.java_gateway import get_java_class
from pyflink.common import Configuration
from pyflink.datastream import DataStream, StreamExecutionEnvironment
from pyflink.java_gateway import get_gateway
from pyflink.table import DataTypes, Schema, StatementSet, StreamTableEnvironment
from pyflink.table.changelog_mode import ChangelogMode

from jobs.closed_windows import CLOSED_WINDOW_COLUMNS
from jobs.guard_plan import GUARDED_VIEW, guard_input_query, unique_dimensions
from jobs.plan import (
    BOUNDED_PAYLOAD_FUNCTION,
    CLASSIFIED_VIEW,
    CLOSED_WINDOWS_VIEW,
    COUNT_DEAD_LETTER_FUNCTION,
    classifier_fields,
    closed_windows_insert,
    closed_windows_sink_ddl,
    dead_letter_insert,
    dead_letter_sink_ddl,
    late_events_insert,
    late_events_sink_ddl,
    rejected_to_route,
    routed_query,
    state_backend_options,
    table_options,
    window_changelog_query,
)
from jobs.source_plan import REPLAYED, VALIDATED_VIEW, usage_source_ddl, validate_query
from jobs.stages_plan import STAGE_LATE_VIEW, STAGE_REJECTED_VIEW, handover_start, stage_parameters
from meterflow.config import JobConfig, load_config
from meterflow.errors import ConfigError
from meterflow.handover import Handover
from meterflow.security import WindowSinkTarget, window_sink_target_of
from sinks.postgres_schema import usage_upsert_sql


def build_environment(
    cfg: JobConfig, extra: dict[str, str] | None = None
) -> tuple[StreamExecutionEnvironment, StreamTableEnvironment]:
    """Streaming table environment with exactly-once checkpointing from config."""
    conf = Configuration()
    conf.set_string(
        "execution.checkpointing.interval", f"{int(cfg.flink.checkpoint_interval.total_seconds() * 1000)} ms"
    )
    conf.set_string("execution.checkpointing.mode", "EXACTLY_ONCE")
    conf.set_string("execution.checkpointing.dir", cfg.job_state_uri(cfg.flink.job_name))
    conf.set_string("execution.checkpointing.savepoint-dir", f"{cfg.job_state_uri(cfg.flink.job_name)}/savepoints")
    conf.set_string("execution.checkpointing.timeout", f"{int(cfg.flink.checkpoint_timeout.total_seconds() * 1000)} ms")
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
    """The Postgres usage table as jvm/ UsageWindowSink sees it: the password's source, not its value."""
    if cfg.postgres.password is None:
        msg = "no Postgres password: set METERFLOW_POSTGRES_PASSWORD (or METERFLOW_POSTGRES_PASSWORD_FILE) or put it in the secrets file"
        raise ConfigError(msg)
    return window_sink_target_of(cfg)


def to_internal_rows(t_env: StreamTableEnvironment, query: str) -> tuple[Any, Any]:
    """A query's rows as a Java DataStream of internal rows (RowData: no conversion to external rows), and their type."""
    jvm = get_gateway().jvm
    table = t_env.sql_query(query)._j_table
    row_type = table.getResolvedSchema().toPhysicalRowDataType()
    return t_env._j_tenv.toDataStream(
        table, row_type.bridgedTo(get_java_class(jvm.org.apache.flink.table.data.RowData))
    ), row_type.getLogicalType()


def _apply_guard(t_env: StreamTableEnvironment, cfg: JobConfig, extra: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """The window guard (jvm/ WindowGuard) on the validated records, before the dedup: its Java stream and row type.

    It sets the reject reason of an event past ``input.max_dimension_combinations``,
    ``input.max_unique_values`` or the largest window sum, so that event takes the rejected records'
    path (raw bytes, coordinates) and no dedup state: replayed after the limit is raised, it counts.
    Keyed by (tenant, customer, meter, window), it is a task of its own between the source and the dedup.
    ``extra`` validated columns pass through it too.
    """
    rows, row_type = to_internal_rows(t_env, guard_input_query(extra))
    guard = get_gateway().jvm.dev.meterflow.operators.WindowGuard
    et = cfg.event_time
    limits = guard(
        row_type,
        cfg.input.max_dimension_combinations,
        int(et.window_size.total_seconds() * 1000),
        int(et.allowed_lateness.total_seconds() * 1000),
        _java_map(unique_dimensions(cfg)),
        cfg.input.max_unique_values,
    )
    return guard.apply(rows, limits, "guard window limits", "guard-window-limits"), row_type


def _guard_windows(t_env: StreamTableEnvironment, cfg: JobConfig) -> None:
    """The window guard's output as ``GUARDED_VIEW``, for the SQL dedup.

    The view declares the processing-time attribute the dedup orders by, and the event time as the
    rowtime with the source's watermarks.
    """
    j_guarded, _ = _apply_guard(t_env, cfg)
    schema = (
        Schema.new_builder()
        .column_by_expression("proc_time", "PROCTIME()")
        .watermark("event_time", "SOURCE_WATERMARK()")
        .build()
    )
    t_env.create_temporary_view(GUARDED_VIEW, t_env.from_data_stream(DataStream(j_guarded), schema))


def _materialise_classified(t_env: StreamTableEnvironment, cfg: JobConfig) -> None:
    """Evaluate the routed query once, classify each event late or on time in the JVM, register the view.

    Branches that read the view see one evaluation per record; reading the query itself from two
    INSERTs would evaluate it twice, and a watermark-dependent column could disagree. The
    classifier (jvm/ LatenessClassifier) holds the watermark in checkpointed state, so a restore
    never judges an event against "no watermark yet" (Flink does not checkpoint watermarks).
    """
    rows, row_type = to_internal_rows(t_env, routed_query(cfg, GUARDED_VIEW))
    classifier = get_gateway().jvm.dev.meterflow.operators.LatenessClassifier
    lateness_ms = int(cfg.event_time.allowed_lateness.total_seconds() * 1000)
    j_classified = classifier.apply(
        rows, row_type, classifier(*classifier_fields(), lateness_ms), "classify late or on time", "classify-lateness"
    )
    schema = (
        Schema.new_builder()
        .column_by_metadata("rowtime", DataTypes.TIMESTAMP_LTZ(3))
        .watermark("rowtime", "SOURCE_WATERMARK()")
        .build()
    )
    t_env.create_temporary_view(CLASSIFIED_VIEW, t_env.from_data_stream(DataStream(j_classified), schema))


def declare_routed_views(t_env: StreamTableEnvironment, cfg: JobConfig) -> None:
    """From the validated view to ``CLASSIFIED_VIEW``, which every branch reads: the window guard, then the dedup and the classifier."""
    _guard_windows(t_env, cfg)
    _materialise_classified(t_env, cfg)


def _write_windows(stream: DataStream, target: WindowSinkTarget, *, final: bool) -> None:
    """Window rows into Postgres, committed with the checkpoints (jvm/ UsageWindowSink).

    The sink carries where the TaskManager reads the password (jvm/ Secrets), never the password.
    """
    operators = get_gateway().jvm.dev.meterflow.operators
    password = operators.Secrets(target.password_variable, target.secrets_file)
    sink = operators.UsageWindowSink(target.url, target.user, password, usage_upsert_sql(target.table), final)
    name, uid = (
        ("write final windows", "write-final-windows") if final else ("write window updates", "write-window-updates")
    )
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


def _close_windows(changelog: DataStream, cfg: JobConfig) -> DataStream:
    """Each window once, with its final value: the JVM closer of jvm/ (dev.meterflow.operators.WindowCloser).

    Declared through the Java DataStream API: one element per window update would otherwise cross
    into a Python worker, whose per-key state round trips cap the whole job at a few hundred
    windows per second. A window whose first row arrives after its close time is held for one
    checkpoint interval (its rows become visible no sooner anyway) to gather its re-fires.
    """
    closer = get_gateway().jvm.dev.meterflow.operators.WindowCloser
    lateness_ms = int(cfg.event_time.allowed_lateness.total_seconds() * 1000)
    hold_ms = int(cfg.flink.checkpoint_interval.total_seconds() * 1000)
    j_closed = changelog._j_data_stream.keyBy(closer.windowKey()).process(
        closer(lateness_ms, hold_ms), closer.outputType()
    )
    return DataStream(j_closed.name("close windows").uid("close-windows-jvm"))


def _declare_windows(t_env: StreamTableEnvironment, cfg: JobConfig) -> None:
    """The window aggregate, computed once, feeding both the per-fire rows and the window closer's final rows."""
    builder = Schema.new_builder()
    for name, data_type in WINDOW_CHANGELOG_SCHEMA:
        builder = builder.column(name, data_type.not_null())
    schema = builder.primary_key("tenant_id", "customer_id", "meter", "dimensions_key", "window_start").build()
    changelog = t_env.to_changelog_stream(t_env.sql_query(window_changelog_query(cfg)), schema, ChangelogMode.upsert())
    _write_windows(changelog, window_sink_target(cfg), final=False)
    _publish_closed(t_env, _close_windows(changelog, cfg), cfg)


def _publish_closed(t_env: StreamTableEnvironment, closed: DataStream, cfg: JobConfig) -> None:
    """Final window rows (the closer's row type) into Postgres, and as ``CLOSED_WINDOWS_VIEW`` for the closed-windows topic."""
    _write_windows(closed, window_sink_target(cfg), final=True)
    closed_schema = Schema.new_builder()
    for name, _, data_type in CLOSED_WINDOW_COLUMNS:
        closed_schema = closed_schema.column(name, data_type)
    # Records emitted by the closer's timers carry the timer time: the watermark flows on.
    closed_schema = closed_schema.column_by_metadata("rowtime", DataTypes.TIMESTAMP_LTZ(3)).watermark(
        "rowtime", "SOURCE_WATERMARK()"
    )
    t_env.create_temporary_view(CLOSED_WINDOWS_VIEW, t_env.from_data_stream(closed, closed_schema.build()))


def _java_map(values: dict[str, str]) -> Any:
    """A Java HashMap of ``values``, for the JVM operators' parameters."""
    j_map = get_gateway().jvm.java.util.HashMap()
    for key, value in values.items():
        j_map.put(key, value)
    return j_map


def _stages_on(rows: Any, row_type: Any, cfg: JobConfig, handover: Handover | None = None) -> Any:
    """The two keyed JVM stages (jvm/ ``TwoStages``, a Java object with ``fires``, ``finals``, ``late`` and ``rejected``) on a Java stream of internal rows."""
    p = stage_parameters(cfg)
    watermark, closed_through = handover_start(handover)
    return get_gateway().jvm.dev.meterflow.stages.TwoStages.apply(
        rows,
        row_type,
        p.window_size_ms,
        p.allowed_lateness_ms,
        p.dedup_horizon_ms,
        _java_map(p.aggregations),
        _java_map(p.unique_dimensions),
        p.max_partials,
        p.early_fire_ms,
        p.late_arrival_hold_ms,
        p.retain_closed_ms,
        watermark,
        closed_through,
    )


def apply_stages(t_env: StreamTableEnvironment, query: str, cfg: JobConfig) -> Any:
    """The two stages on ``query``'s rows, which hold the columns they read (``STAGE_INPUT_COLUMNS``), ``event_time`` the rowtime."""
    rows, row_type = to_internal_rows(t_env, query)
    return _stages_on(rows, row_type, cfg)


def _declare_stages(t_env: StreamTableEnvironment, cfg: JobConfig, handover: Handover | None = None) -> None:
    """The window guard's output straight into the two stages, in Java: no table conversion per event.

    Their provisional and final rows go to the same Postgres sinks as the SQL graph's, the finals
    to ``CLOSED_WINDOWS_VIEW`` too; the late events they route become ``STAGE_LATE_VIEW``, and the
    rejected records, split from the counted ones in the guard's task, ``STAGE_REJECTED_VIEW``.
    At a handover the validated ``replayed`` column travels with them (meterflow/handover.py).
    """
    j_guarded, row_type = _apply_guard(t_env, cfg, (REPLAYED,) if handover is not None else ())
    stages = _stages_on(j_guarded, row_type, cfg, handover)
    _write_windows(DataStream(stages.fires()), window_sink_target(cfg), final=False)
    _publish_closed(t_env, DataStream(stages.finals()), cfg)
    t_env.create_temporary_view(STAGE_LATE_VIEW, t_env.from_data_stream(DataStream(stages.late())))
    t_env.create_temporary_view(STAGE_REJECTED_VIEW, t_env.from_data_stream(DataStream(stages.rejected())))


def declare_pipeline(t_env: StreamTableEnvironment, cfg: JobConfig, handover: Handover | None = None) -> StatementSet:
    """Kafka (decoded in the source) -> validate -> guard -> dedup -> classify once -> (dead letters | windows | late).

    With ``flink.usage_graph: two_stage``, the guard's counted events go to the two keyed stages
    (dedup, lateness and partials; merge and close) and its rejected records straight to the dead
    letters, taking no dedup state. ``handover`` starts it from the SQL graph's position (meterflow/handover.py):
    a record that graph read counts only in a window it left open, and is no dead letter or late event again.
    """
    if handover is not None and cfg.flink.usage_graph != "two_stage":
        msg = "a handover starts the two-stage graph: set flink.usage_graph: two_stage"
        raise ConfigError(msg)
    t_env.create_java_temporary_system_function(*COUNT_DEAD_LETTER_FUNCTION)
    t_env.create_java_temporary_system_function(*BOUNDED_PAYLOAD_FUNCTION)
    t_env.execute_sql(usage_source_ddl(cfg, handover))
    t_env.execute_sql(late_events_sink_ddl(cfg))
    t_env.execute_sql(dead_letter_sink_ddl(cfg))
    t_env.execute_sql(closed_windows_sink_ddl(cfg))
    t_env.create_temporary_view(VALIDATED_VIEW, t_env.sql_query(validate_query(cfg, handover)))
    statements = t_env.create_statement_set()
    if cfg.flink.usage_graph == "two_stage":
        _declare_stages(t_env, cfg, handover)
        statements.add_insert_sql(late_events_insert(STAGE_LATE_VIEW, where=""))
        statements.add_insert_sql(
            dead_letter_insert(cfg, source=STAGE_REJECTED_VIEW, where=rejected_to_route(handover is not None))
        )
    else:
        # The window guard, then classified events and rejected records in one materialised stream: the
        # topic is read once, and the dedup, the classifier and the late and dead-letter sinks run chained.
        declare_routed_views(t_env, cfg)
        _declare_windows(t_env, cfg)
        statements.add_insert_sql(late_events_insert())
        statements.add_insert_sql(dead_letter_insert(cfg))
    # Each closed window once, exactly-once, for billing and other consumers (see avro/closed_window.avsc).
    statements.add_insert_sql(closed_windows_insert())
    return statements


def main(argv: list[str] | None = None) -> None:
    """Load config, declare the pipeline and submit it to the cluster."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=None, help="YAML config file (default: $METERFLOW_CONFIG or ./meterflow.yaml)"
    )
    parser.add_argument(
        "--handover",
        default=None,
        help="Handover file (meterflow/handover.py) of a start from the SQL graph's position; meterflow submit passes it",
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    handover = Handover.load(Path(args.handover)) if args.handover else None
    # The tables the job writes, created (idempotently) so a first submit needs no manual step.
    from sinks.ledger import apply_schemas

    apply_schemas(cfg)
    env, t_env = build_environment(cfg)
    # The window rows go to DataStream sinks (committed with checkpoints), the Kafka outputs to SQL
    # sinks: attach the SQL inserts to the same stream graph and submit it as one job.
    declare_pipeline(t_env, cfg, handover).attach_as_datastream()
    job_client = env.execute_async(cfg.flink.job_name)
    print(f"submitted job {job_client.get_job_id()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
