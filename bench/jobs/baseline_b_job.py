"""Baseline B: the usage windows written the naive PyFlink way, with the Python DataStream API.

KafkaSource (raw bytes, per-partition watermarks on the payload's event time) -> Python Avro
decode -> key_by (tenant, event id) keep-first dedup -> key_by (tenant, customer, meter) ->
TumblingEventTimeWindows -> allowed_lateness -> side_output_late_data -> Python aggregate -> the
same JDBC upsert sink as meterflow; late events to a JDBC table. Per-event work runs in Python.

Self-contained (functions are shipped to the Python workers by value):
``flink run -py bench/jobs/baseline_b_job.py --config X --parallelism N --stop-offsets 0:123,1:456``.
"""

from __future__ import annotations

import argparse
import io
import sys
from decimal import Decimal

from pyflink.common import Configuration, Duration, Types, WatermarkStrategy
from pyflink.common.serialization import ByteArraySchema
from pyflink.common.time import Time
from pyflink.datastream import OutputTag, StreamExecutionEnvironment
from pyflink.datastream.connectors.kafka import KafkaOffsetsInitializer, KafkaSource, KafkaTopicPartition
from pyflink.datastream.functions import AggregateFunction, KeyedProcessFunction, ProcessWindowFunction
from pyflink.datastream.state import ValueStateDescriptor
from pyflink.datastream.window import TumblingEventTimeWindows
from pyflink.java_gateway import get_gateway
from pyflink.table import StreamTableEnvironment

from jobs.plan import JdbcTarget, usage_windows_sink_ddl
from meterflow.config import load_config


def event_type():
    # (tenant, event_id, customer, meter, quantity as decimal string)
    return Types.TUPLE([Types.STRING(), Types.STRING(), Types.STRING(), Types.STRING(), Types.STRING()])


class Decode:
    """Plain Avro bytes -> tuple, with fastavro; the schema is parsed once per worker."""

    def __init__(self, schema_json: str) -> None:
        self.schema_json = schema_json
        self.schema = None

    def __call__(self, payload: bytes):
        import fastavro

        if self.schema is None:
            import json

            self.schema = fastavro.parse_schema(json.loads(self.schema_json))
        e = fastavro.schemaless_reader(io.BytesIO(payload), self.schema)
        return e["tenant_id"], e["event_id"], e["customer_id"], e["meter"], str(e["quantity"])


class KeepFirst(KeyedProcessFunction):
    """Keyed by (tenant, event id): pass the first copy, drop later ones."""

    def open(self, runtime_context) -> None:
        self.seen = runtime_context.get_state(ValueStateDescriptor("seen", Types.BOOLEAN()))

    def process_element(self, value, ctx):
        if self.seen.value() is None:
            self.seen.update(True)
            yield value


class SumCount(AggregateFunction):
    """Exact sum (Decimal) and count of a window's events."""

    def create_accumulator(self):
        return [Decimal(0), 0]

    def add(self, value, accumulator):
        accumulator[0] += Decimal(value[4])
        accumulator[1] += 1
        return accumulator

    def get_result(self, accumulator):
        return str(accumulator[0]), accumulator[1]

    def merge(self, a, b):
        return [a[0] + b[0], a[1] + b[1]]


class WithWindow(ProcessWindowFunction):
    """Attach the key and window bounds to the aggregate."""

    def process(self, key, context, elements):
        quantity, count = next(iter(elements))
        w = context.window()
        yield key[0], key[1], key[2], w.start, w.end, quantity, count


def main(argv: list[str]) -> None:
    """Build and submit the job."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--parallelism", type=int, default=1)
    parser.add_argument("--stop-offsets", required=True, help="partition:offset,... where reading stops")
    parser.add_argument("--table", required=True)
    parser.add_argument("--late-table", required=True)
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    et = cfg.event_time

    conf = Configuration()
    conf.set_string(
        "execution.checkpointing.interval", f"{int(cfg.flink.checkpoint_interval.total_seconds() * 1000)} ms"
    )
    conf.set_string("execution.checkpointing.mode", "EXACTLY_ONCE")
    conf.set_string("execution.checkpointing.dir", cfg.checkpoint_uri())
    conf.set_string("parallelism.default", str(args.parallelism))
    conf.set_string("pipeline.name", f"baseline-b-p{args.parallelism}")
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    t_env = StreamTableEnvironment.create(env)
    t_env.get_config().set("table.local-time-zone", "UTC")

    topic = cfg.kafka.usage_events_topic
    stops = {
        KafkaTopicPartition(topic, int(p)): int(o)
        for p, o in (item.split(":") for item in args.stop_offsets.split(","))
    }
    source = (
        KafkaSource.builder()
        .set_bootstrap_servers(cfg.kafka.bootstrap_servers)
        .set_topics(topic)
        .set_group_id(cfg.kafka.consumer_group)
        .set_starting_offsets(KafkaOffsetsInitializer.earliest())
        .set_bounded(KafkaOffsetsInitializer.offsets(stops))
        .set_value_only_deserializer(ByteArraySchema())
        .set_property("isolation.level", "read_committed")
        .build()
    )
    watermarks = WatermarkStrategy.for_bounded_out_of_orderness(
        Duration.of_millis(int(et.watermark_delay.total_seconds() * 1000))
    ).with_idleness(Duration.of_millis(int(et.source_idle_timeout.total_seconds() * 1000)))
    # The record timestamp is the produce time. Per-partition watermarks need the event time inside the
    # source, where PyFlink runs no Python: read it from the raw bytes in the JVM (jvm/ AvroEventTimeAssigner).
    assigner = get_gateway().jvm.dev.meterflow.format.AvroEventTimeAssigner()
    watermarks = WatermarkStrategy(watermarks._j_watermark_strategy.withTimestampAssigner(assigner))
    from connectors.avro_types import USAGE_EVENT_SCHEMA

    decode = Decode(USAGE_EVENT_SCHEMA.read_text())
    raw = env.from_source(source, watermarks, "usage events", type_info=Types.PRIMITIVE_ARRAY(Types.BYTE()))
    events = raw.map(decode, output_type=event_type()).name("decode")
    unique = (
        events.key_by(lambda e: (e[0], e[1]), key_type=Types.TUPLE([Types.STRING(), Types.STRING()]))
        .process(KeepFirst(), output_type=event_type())
        .name("dedup")
    )
    late_tag = OutputTag("late", event_type())
    windows = (
        unique.key_by(
            lambda e: (e[0], e[2], e[3]), key_type=Types.TUPLE([Types.STRING(), Types.STRING(), Types.STRING()])
        )
        .window(TumblingEventTimeWindows.of(Time.milliseconds(int(et.window_size.total_seconds() * 1000))))
        .allowed_lateness(int(et.allowed_lateness.total_seconds() * 1000))
        .side_output_late_data(late_tag)
        .aggregate(
            SumCount(),
            window_function=WithWindow(),
            accumulator_type=Types.PICKLED_BYTE_ARRAY(),
            output_type=Types.TUPLE(
                [
                    Types.STRING(),
                    Types.STRING(),
                    Types.STRING(),
                    Types.LONG(),
                    Types.LONG(),
                    Types.STRING(),
                    Types.LONG(),
                ]
            ),
        )
        .name("window sum")
    )
    late = windows.get_side_output(late_tag)

    password = cfg.postgres.password.get_secret_value() if cfg.postgres.password else ""
    t_env.execute_sql(
        usage_windows_sink_ddl(JdbcTarget(cfg.postgres.jdbc_url(), args.table, cfg.postgres.user, password))
    )
    t_env.execute_sql(
        "CREATE TABLE late_sink (tenant_id STRING, event_id STRING) WITH ("
        f"'connector' = 'jdbc', 'url' = '{cfg.postgres.jdbc_url()}', 'table-name' = '{args.late_table}', "
        f"'username' = '{cfg.postgres.user}', 'password' = '{password}')"
    )
    t_env.create_temporary_view(
        "windows",
        t_env.from_data_stream(windows).alias(
            "tenant_id", "customer_id", "meter", "start_ms", "end_ms", "quantity", "event_count"
        ),
    )
    t_env.create_temporary_view(
        "late_events", t_env.from_data_stream(late).alias("tenant_id", "event_id", "customer_id", "meter", "quantity")
    )
    statements = t_env.create_statement_set()
    statements.add_insert_sql(
        "INSERT INTO usage_windows_sink SELECT tenant_id, customer_id, meter, '{}', "
        "CAST(TO_TIMESTAMP_LTZ(start_ms, 3) AS TIMESTAMP(3)), CAST(TO_TIMESTAMP_LTZ(end_ms, 3) AS TIMESTAMP(3)), "
        "CAST(quantity AS DECIMAL(38, 9)), event_count, event_count FROM windows ON CONFLICT DO DEDUPLICATE"
    )
    statements.add_insert_sql("INSERT INTO late_sink SELECT tenant_id, event_id FROM late_events")
    client = statements.execute().get_job_client()
    if client is not None:
        print(f"submitted job {client.get_job_id()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
