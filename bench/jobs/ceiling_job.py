"""The ceiling: the same Kafka source as meterflow (raw bytes, read_committed) into a discarding sink.

``flink run -py bench/jobs/ceiling_job.py --config X --parallelism N``
"""

from __future__ import annotations

import argparse
import sys

from pyflink.common import Configuration
from pyflink.datastream import StreamExecutionEnvironment
from pyflink.table import StreamTableEnvironment

from jobs.source_plan import kafka_source_options
from jobs.sql import sql_with
from meterflow.config import load_config


def main(argv: list[str]) -> None:
    """Build and submit the job."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--parallelism", type=int, default=1)
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    conf = Configuration()
    conf.set_string(
        "execution.checkpointing.interval", f"{int(cfg.flink.checkpoint_interval.total_seconds() * 1000)} ms"
    )
    conf.set_string("execution.checkpointing.mode", "EXACTLY_ONCE")
    conf.set_string("execution.checkpointing.dir", cfg.checkpoint_uri())
    conf.set_string("parallelism.default", str(args.parallelism))
    conf.set_string("pipeline.name", f"ceiling-p{args.parallelism}")
    t_env = StreamTableEnvironment.create(StreamExecutionEnvironment.get_execution_environment(conf))
    t_env.execute_sql(f"CREATE TABLE usage_events (`payload` BYTES) {sql_with(kafka_source_options(cfg, 'raw'))}")
    t_env.execute_sql("CREATE TABLE discard (`payload` BYTES) WITH ('connector' = 'blackhole')")
    client = t_env.execute_sql("INSERT INTO discard SELECT `payload` FROM usage_events").get_job_client()
    if client is not None:
        print(f"submitted job {client.get_job_id()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
