"""Baseline A: the same job as a plain Python consumer (kafka-python + fastavro + psycopg), no Flink.

Written the way a careful team would without a stream processor: one poll is one batch and one
Postgres transaction. The batch is copied into a temporary table; ``INSERT ... ON CONFLICT DO
NOTHING RETURNING`` on a seen-events table keeps the first copy of each (tenant, event id); window
totals are upserted by adding the batch's sums; per-partition watermarks are stored in the same
transaction; offsets are committed to Kafka after the database commit (a crash in between replays
the batch, and the seen-events table makes that harmless).

Run as ``python -m bench.baseline_a --config X --prefix bench_a --expected N``. It writes its
progress (records processed) to ``--progress`` after every batch and exits after ``--expected``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

from connectors.avro_codec import decode_usage_event
from meterflow.config import load_config
from meterflow.windowing import is_window_closed, window_start_ms
from sinks.postgres import connect
from sinks.postgres_schema import check_identifier


def schema_sql(prefix: str) -> list[str]:
    """Tables of the baseline: seen events, window totals, late events, per-partition watermarks."""
    p = check_identifier(prefix)
    return [
        f"CREATE TABLE IF NOT EXISTS {p}_seen (tenant_id text NOT NULL, event_id text NOT NULL, PRIMARY KEY (tenant_id, event_id))",
        f"""CREATE TABLE IF NOT EXISTS {p}_totals (tenant_id text NOT NULL, customer_id text NOT NULL, meter text NOT NULL,
            window_start timestamp(3) NOT NULL, quantity numeric(38, 9) NOT NULL, event_count bigint NOT NULL,
            PRIMARY KEY (tenant_id, customer_id, meter, window_start))""",
        f"CREATE TABLE IF NOT EXISTS {p}_late (tenant_id text NOT NULL, event_id text NOT NULL, event_time timestamp(3) NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {p}_watermarks (kafka_partition int PRIMARY KEY, max_event_ms bigint NOT NULL)",
    ]


def batch_sql(prefix: str) -> str:
    """Dedup against the seen table, record late events, add on-time sums to the window totals."""
    p = check_identifier(prefix)
    return f"""
WITH fresh AS (
    INSERT INTO {p}_seen (tenant_id, event_id) SELECT tenant_id, event_id FROM batch
    ON CONFLICT DO NOTHING RETURNING tenant_id, event_id
), counted AS (
    SELECT b.* FROM batch b JOIN fresh USING (tenant_id, event_id)
), late AS (
    INSERT INTO {p}_late (tenant_id, event_id, event_time)
    SELECT tenant_id, event_id, to_timestamp(event_ms / 1000.0) AT TIME ZONE 'UTC' FROM counted WHERE is_late
)
INSERT INTO {p}_totals (tenant_id, customer_id, meter, window_start, quantity, event_count)
SELECT tenant_id, customer_id, meter, to_timestamp(window_ms / 1000.0) AT TIME ZONE 'UTC', sum(quantity), count(*)
FROM counted WHERE NOT is_late GROUP BY tenant_id, customer_id, meter, window_ms
ON CONFLICT (tenant_id, customer_id, meter, window_start) DO UPDATE
SET quantity = {p}_totals.quantity + excluded.quantity, event_count = {p}_totals.event_count + excluded.event_count
"""


class Watermarks:
    """Per-partition max event time; the watermark is the minimum over all partitions minus the delay."""

    def __init__(self, partitions: int, delay_ms: int, known: dict[int, int] | None = None) -> None:
        self.max_ms: dict[int, int] = dict(known or {})
        self.partitions, self.delay_ms = partitions, delay_ms

    def current(self) -> int | None:
        """The watermark, or None until every partition has been seen."""
        if len(self.max_ms) < self.partitions:
            return None
        return min(self.max_ms.values()) - self.delay_ms

    def observe(self, partition: int, event_ms: int) -> None:
        """Advance a partition's max event time."""
        if event_ms > self.max_ms.get(partition, event_ms - 1):
            self.max_ms[partition] = event_ms


def run(config: Path, prefix: str, expected: int, progress: Path, max_records: int) -> None:
    """Consume until ``expected`` records are processed; write progress after every batch."""
    from kafka import KafkaConsumer

    cfg = load_config(config, environ={})
    et = cfg.event_time
    window_ms = int(et.window_size.total_seconds() * 1000)
    lateness_ms = int(et.allowed_lateness.total_seconds() * 1000)
    conn = connect(cfg.postgres)
    with conn.transaction():
        for statement in schema_sql(prefix):
            conn.execute(statement)
        conn.execute(
            "CREATE TEMP TABLE batch (tenant_id text, event_id text, customer_id text, meter text, quantity numeric(38, 9), event_ms bigint, window_ms bigint, is_late boolean) ON COMMIT DELETE ROWS"
        )
        known = dict(conn.execute(f"SELECT kafka_partition, max_event_ms FROM {prefix}_watermarks").fetchall())
    marks = Watermarks(cfg.kafka.partitions, int(et.watermark_delay.total_seconds() * 1000), known)
    consumer = KafkaConsumer(
        cfg.kafka.usage_events_topic,
        bootstrap_servers=cfg.kafka.bootstrap_servers,
        group_id=cfg.kafka.consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=max_records,
        # The 1 MB default per partition fetch keeps partitions within minutes of event time of each
        # other; much larger fetches let one partition run far ahead, and the watermark (the slowest
        # partition) then lags the stream by as much.
        max_partition_fetch_bytes=1024 * 1024,
    )
    statement = batch_sql(prefix)
    done = 0
    try:
        while done < expected:
            polled = consumer.poll(timeout_ms=1000, max_records=max_records)
            if not polled:
                continue
            rows, seen_in_batch = [], set()
            for tp, messages in polled.items():
                for message in messages:
                    done += 1
                    try:
                        e = decode_usage_event(message.value)
                    except Exception:  # noqa: BLE001, S112 - a bad record is skipped here (Flink routes it to dead letters)
                        continue
                    event_ms = round(e["event_time"].timestamp() * 1000)
                    wm = marks.current()
                    marks.observe(tp.partition, event_ms)
                    ident = (e["tenant_id"], e["event_id"])
                    if ident in seen_in_batch:
                        continue
                    seen_in_batch.add(ident)
                    start = window_start_ms(event_ms, window_ms)
                    late = wm is not None and is_window_closed(start + window_ms, wm, lateness_ms)
                    rows.append(
                        (
                            e["tenant_id"],
                            e["event_id"],
                            e["customer_id"],
                            e["meter"],
                            e["quantity"],
                            event_ms,
                            start,
                            late,
                        )
                    )
            with conn.transaction():
                with conn.cursor().copy("COPY batch FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                conn.execute(statement)
                with conn.cursor() as cur:
                    cur.executemany(
                        f"INSERT INTO {prefix}_watermarks VALUES (%s, %s) ON CONFLICT (kafka_partition) DO UPDATE SET max_event_ms = excluded.max_event_ms",
                        list(marks.max_ms.items()),
                    )
            consumer.commit()
            tmp = progress.with_suffix(".tmp")
            tmp.write_text(f"{done} {time.time()}\n")
            os.replace(tmp, progress)
    finally:
        consumer.close()
        conn.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--prefix", default="bench_a")
    parser.add_argument("--expected", type=int, required=True, help="records to process before exiting")
    parser.add_argument("--progress", type=Path, required=True)
    parser.add_argument("--max-records", type=int, default=5000, help="records per poll (= per transaction)")
    args = parser.parse_args(argv)
    run(args.config, args.prefix, args.expected, args.progress, args.max_records)


if __name__ == "__main__":
    main()
