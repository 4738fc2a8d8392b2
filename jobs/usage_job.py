"""The meterflow usage job: wires Kafka -> event-time windows -> Postgres on a Flink cluster.

Submit with ``meterflow submit`` or directly::

    flink run -d -py jobs/usage_job.py -- --config meterflow.yaml

All per-event work runs in JVM operators declared as SQL (see jobs/plan.py); this module only
wires them.
"""

from __future__ import annotations

import argparse
import sys

from pyflink.common import Configuration
from pyflink.datastream import StreamExecutionEnvironment
from pyflink.table import DataTypes, Schema, StatementSet, StreamTableEnvironment

from jobs.plan import (
    CLASSIFIED_VIEW,
    JdbcTarget,
    classify_query,
    dedup_query,
    late_events_insert,
    late_events_sink_ddl,
    table_options,
    usage_source_ddl,
    usage_windows_sink_ddl,
    window_aggregate_sql,
)
from meterflow.config import JobConfig, load_config
from meterflow.errors import ConfigError


def build_environment(cfg: JobConfig, extra: dict[str, str] | None = None) -> StreamTableEnvironment:
    """Streaming table environment with exactly-once checkpointing from config."""
    conf = Configuration()
    conf.set_string("execution.checkpointing.interval", f"{int(cfg.flink.checkpoint_interval.total_seconds() * 1000)} ms")
    conf.set_string("execution.checkpointing.mode", "EXACTLY_ONCE")
    conf.set_string("execution.checkpointing.dir", cfg.checkpoint_uri())
    conf.set_string("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
    conf.set_string("parallelism.default", str(cfg.flink.parallelism))
    for key, value in (extra or {}).items():
        conf.set_string(key, value)
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    t_env = StreamTableEnvironment.create(env)
    for key, value in table_options(cfg).items():
        t_env.get_config().set(key, value)
    return t_env


def jdbc_target(cfg: JobConfig) -> JdbcTarget:
    """The Postgres usage table as the JDBC sink sees it."""
    if cfg.postgres.password is None:
        msg = "no Postgres password: set METERFLOW_POSTGRES_PASSWORD or put it in the secrets file"
        raise ConfigError(msg)
    return JdbcTarget(cfg.postgres.jdbc_url(), cfg.postgres.usage_table, cfg.postgres.user, cfg.postgres.password.get_secret_value())


def declare_pipeline(t_env: StreamTableEnvironment, cfg: JobConfig, source_connector: dict[str, str] | None = None) -> StatementSet:
    """Source -> dedup -> classify once -> (windows -> Postgres | late -> Kafka); returns the statement set."""
    t_env.execute_sql(usage_source_ddl(cfg, connector=source_connector))
    t_env.execute_sql(usage_windows_sink_ddl(jdbc_target(cfg)))
    t_env.execute_sql(late_events_sink_ddl(cfg))
    classified = t_env.sql_query(classify_query(cfg, f"({dedup_query()})"))
    # Classify once: materialise the late flag before branching. A flag recomputed in each branch
    # can see two watermarks and count one event both in a window and as late.
    stream = t_env.to_data_stream(classified)
    rowtime = Schema.new_builder().column_by_metadata("rowtime", DataTypes.TIMESTAMP_LTZ(3)).watermark("rowtime", "SOURCE_WATERMARK()").build()
    t_env.create_temporary_view(CLASSIFIED_VIEW, t_env.from_data_stream(stream, rowtime))
    statements = t_env.create_statement_set()
    statements.add_insert_sql(window_aggregate_sql(cfg))
    statements.add_insert_sql(late_events_insert())
    return statements


def main(argv: list[str] | None = None) -> None:
    """Load config, declare the pipeline and submit it to the cluster."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config file (default: $METERFLOW_CONFIG or ./meterflow.yaml)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    t_env = build_environment(cfg)
    result = declare_pipeline(t_env, cfg).execute()
    job_client = result.get_job_client()
    if job_client is not None:
        print(f"submitted job {job_client.get_job_id()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
