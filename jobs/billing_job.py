"""The meterflow billing job: closed windows from Kafka to the billing provider. Wiring only.

closed-windows topic (read_committed) ──┐
                                        ├─▶ keyBy(tenant, customer, meter) ─▶ batches ─▶ deliver (async, ≤ max_in_flight per subtask)
ledger retry scan (1/s, due retries) ───┘     (JVM)                              (JVM)       └─▶ provider (Stripe meter events) + Postgres ledger

Its own job on the cluster (``<flink.job_name>-billing``), its own consumer group and checkpoints:
a slow, failing or rate-limiting provider never holds the usage job's checkpoints. Submit with
``meterflow submit`` (both jobs) or directly::

    flink run -d -py jobs/billing_job.py --config meterflow.yaml
"""

from __future__ import annotations

import argparse
import sys

from pyflink.common import Configuration, Time, Types
from pyflink.datastream import AsyncDataStream, DataStream, StreamExecutionEnvironment
from pyflink.java_gateway import get_gateway
from pyflink.table import StreamTableEnvironment

from jobs.billing_operator import DeliverClosedWindows, RetryScan, batch_type, input_type, outcome_type
from jobs.billing_plan import (
    DELIVERY_BATCH_DELAY_MS,
    RETRIES_VIEW,
    RETRY_TICKS_TABLE,
    billing_input_query,
    closed_windows_source_ddl,
    delivery_batch_capacity,
    delivery_batch_rows,
    delivery_batches_in_flight,
    retry_ticks_ddl,
)
from meterflow.config import JobConfig, config_without_secrets, load_config


def build_environment(
    cfg: JobConfig, extra: dict[str, str] | None = None
) -> tuple[StreamExecutionEnvironment, StreamTableEnvironment]:
    """Streaming environment with exactly-once checkpoints; async I/O needs Python's process mode."""
    conf = Configuration()
    conf.set_string(
        "execution.checkpointing.interval", f"{int(cfg.flink.checkpoint_interval.total_seconds() * 1000)} ms"
    )
    conf.set_string("execution.checkpointing.mode", "EXACTLY_ONCE")
    conf.set_string("execution.checkpointing.dir", cfg.job_state_uri(cfg.billing_job_name))
    conf.set_string("execution.checkpointing.savepoint-dir", f"{cfg.job_state_uri(cfg.billing_job_name)}/savepoints")
    conf.set_string("execution.checkpointing.timeout", f"{int(cfg.flink.checkpoint_timeout.total_seconds() * 1000)} ms")
    conf.set_string("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
    conf.set_string("parallelism.default", str(cfg.billing_parallelism))
    conf.set_string("python.execution-mode", "process")
    # Records reach the Python worker a bundle at a time, and a bundle ends by waiting for every call
    # it started: bundles of a few rounds of max_in_flight keep the calls overlapping without
    # holding records back (measured in docs/benchmarks.md).
    conf.set_string("python.fn-execution.bundle.size", str(8 * delivery_batches_in_flight(cfg.billing_max_in_flight)))
    conf.set_string("python.fn-execution.bundle.time", "500")
    conf.set_string("pipeline.name", cfg.billing_job_name)
    for key, value in (extra or {}).items():
        conf.set_string(key, value)
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    t_env = StreamTableEnvironment.create(env)
    t_env.get_config().set("table.local-time-zone", "UTC")
    # Stable uids for the SQL operators too (the Kafka source's offsets), so a savepoint maps back.
    t_env.get_config().set("table.exec.uid.generation", "ALWAYS")
    return env, t_env


def declare_pipeline(env: StreamExecutionEnvironment, t_env: StreamTableEnvironment, cfg: JobConfig) -> None:
    """closed windows + due retries -> key by customer and meter -> async delivery -> outcomes (discarded)."""
    shipped = config_without_secrets(cfg)
    t_env.execute_sql(closed_windows_source_ddl(cfg))
    t_env.execute_sql(retry_ticks_ddl(cfg.billing_parallelism))
    retries = (
        t_env.to_data_stream(t_env.from_path(RETRY_TICKS_TABLE))
        .flat_map(RetryScan(shipped), output_type=input_type())
        .name("scan the ledger for due retries")
        .uid("billing-retry-scan")
    )
    t_env.create_temporary_view(RETRIES_VIEW, t_env.from_data_stream(retries))
    # Keyed in the JVM on the first column (tenant, customer, meter): a window crosses into Python
    # once, at the delivery step, instead of once more for a Python key_by.
    rows = t_env.to_data_stream(t_env.sql_query(billing_input_query()))._j_data_stream
    by_key = get_gateway().jvm.org.apache.flink.streaming.api.functions.python.KeyByKeySelector()
    keyed = rows.keyBy(by_key, Types.ROW([Types.STRING()]).get_java_type_info())
    # A subtask's rows cross into Python a batch at a time: PyFlink's cost per element is paid per batch.
    batch_rows = delivery_batch_rows(cfg.billing_max_in_flight)
    batcher = get_gateway().jvm.dev.meterflow.operators.RowBatcher(batch_rows, DELIVERY_BATCH_DELAY_MS)
    batches = DataStream(
        keyed.transform("gather windows into batches", batch_type().get_java_type_info(), batcher).uid("billing-batch")
    )
    # No operator timeout: each call has billing.request_timeout, and PyFlink's async operator
    # starts a timer thread per element when one is set (measured: most of its per-element cost).
    timeout = Time.milliseconds(0)
    outcomes = (
        AsyncDataStream.unordered_wait(
            batches,
            DeliverClosedWindows(shipped),
            timeout,
            capacity=delivery_batch_capacity(cfg.billing_max_in_flight),
            output_type=outcome_type(),
        )
        .name("deliver to the billing provider")
        .uid("billing-deliver")
    )
    # The ledger is the record of every outcome; the stream only has to end somewhere.
    discard = get_gateway().jvm.org.apache.flink.streaming.api.functions.sink.v2.DiscardingSink()
    outcomes._j_data_stream.sinkTo(discard).name("billing outcomes (recorded in the ledger)").uid("billing-outcomes")


def main(argv: list[str] | None = None) -> None:
    """Load config, declare the billing pipeline and submit it to the cluster."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=None, help="YAML config file (default: $METERFLOW_CONFIG or ./meterflow.yaml)"
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    from sinks.ledger import apply_billing_schema

    apply_billing_schema(cfg)
    env, t_env = build_environment(cfg)
    declare_pipeline(env, t_env, cfg)
    job_client = env.execute_async(cfg.billing_job_name)
    print(f"submitted job {job_client.get_job_id()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
