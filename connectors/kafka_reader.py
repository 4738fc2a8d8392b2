"""Read a whole topic as a read_committed consumer (audits, tests): only committed transactions."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from meterflow.errors import MeterflowError


@contextmanager
def assigned_consumer(bootstrap_servers: str, topic: str, **options: Any) -> Iterator[tuple[Any, list[Any]]]:
    """A read_committed consumer without a group, assigned every partition of ``topic``, and those partitions.

    ``options`` go to KafkaConsumer. Closed on exit. MeterflowError when Kafka does not answer or
    the topic does not exist.
    """
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap_servers, isolation_level="read_committed", enable_auto_commit=False, **options
        )
    except KafkaError as e:
        msg = f"cannot connect to Kafka at {bootstrap_servers}: {e}"
        raise MeterflowError(msg) from e
    try:
        partition_ids = consumer.partitions_for_topic(topic)
        if partition_ids is None:
            msg = f"topic {topic} does not exist"
            raise MeterflowError(msg)
        partitions = [TopicPartition(topic, p) for p in sorted(partition_ids)]
        consumer.assign(partitions)
        yield consumer, partitions
    finally:
        consumer.close()


def read_committed(
    bootstrap_servers: str,
    topic: str,
    decode: Callable[[bytes], Any],
    *,
    timeout: float = 60,
    on_progress: Callable[[int, int], None] | None = None,
) -> Iterator[Any]:
    """Yield every committed record of ``topic`` from the beginning to the end offsets seen at the start.

    Args:
        on_progress: called with (records read, records expected) as reading advances.
    """
    with assigned_consumer(bootstrap_servers, topic, consumer_timeout_ms=2000) as (consumer, partitions):
        consumer.seek_to_beginning(*partitions)
        begin, end = consumer.beginning_offsets(partitions), consumer.end_offsets(partitions)
        expected = sum(end[tp] - begin[tp] for tp in partitions)  # upper bound: includes transaction markers
        read, deadline = 0, time.monotonic() + timeout
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            if time.monotonic() > deadline:
                msg = f"reading {topic} did not reach its end offsets within {timeout:.0f}s"
                raise MeterflowError(msg)
            for batch in consumer.poll(timeout_ms=1000).values():
                for record in batch:
                    read += 1
                    yield decode(record.value)
            if on_progress:
                on_progress(read, expected)


def read_range(
    bootstrap_servers: str, topic: str, since_ms: int, until_ms: int, *, timeout: float = 300
) -> Iterator[tuple[int, int, bytes]]:
    """Yield (partition, Kafka timestamp ms, value) of the committed records of ``topic`` with a timestamp
    in [since_ms, until_ms), each partition in offset order (partitions one after another).

    Seeks each partition to the first offset at or after ``since_ms`` (offsets_for_times) and reads
    to the end offset seen at the start.
    """
    with assigned_consumer(bootstrap_servers, topic) as (consumer, partitions):
        deadline = time.monotonic() + timeout
        for tp in partitions:
            consumer.assign([tp])  # one partition at a time, in offset order
            end = consumer.end_offsets([tp])[tp]
            start = consumer.offsets_for_times({tp: since_ms})[tp]
            if start is None:
                continue  # nothing at or after since_ms
            consumer.seek(tp, start.offset)
            while consumer.position(tp) < end:
                if time.monotonic() > deadline:
                    msg = f"reading {topic} did not reach its end offsets within {timeout:.0f}s"
                    raise MeterflowError(msg)
                for record in consumer.poll(timeout_ms=1000).get(tp, []):
                    if since_ms <= record.timestamp < until_ms:
                        yield tp.partition, record.timestamp, record.value


def read_from(
    bootstrap_servers: str, topic: str, starts: Mapping[int, int], *, timeout: float = 300
) -> Iterator[tuple[int, int, bytes]]:
    """Yield (partition, offset, value) of the committed records of ``topic`` from ``starts`` (next
    offset per partition; the beginning where absent) to the end offsets seen at the start.

    What an incremental reader that keeps its own offsets (in the same transaction as its results)
    needs: it resumes exactly where its last committed batch ended. A stored offset below the
    partition's beginning (records deleted by retention) starts at the beginning.
    """
    with assigned_consumer(bootstrap_servers, topic, consumer_timeout_ms=2000) as (consumer, partitions):
        begin, end = consumer.beginning_offsets(partitions), consumer.end_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, max(starts.get(tp.partition, 0), begin[tp]))
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            if time.monotonic() > deadline:
                msg = f"reading {topic} did not reach its end offsets within {timeout:.0f}s"
                raise MeterflowError(msg)
            for tp, batch in consumer.poll(timeout_ms=1000).items():
                for record in batch:
                    if record.offset < end[tp]:
                        yield tp.partition, record.offset, record.value


def first_retained(bootstrap_servers: str, topic: str, *, timeout: float = 30) -> dict[int, tuple[int, int | None]]:
    """Per partition of ``topic``: its log start offset and the Kafka timestamp (ms) of its first
    committed record still kept, None when it keeps none."""
    found: dict[int, tuple[int, int | None]] = {}
    with assigned_consumer(bootstrap_servers, topic, consumer_timeout_ms=2000) as (consumer, partitions):
        begin, end = consumer.beginning_offsets(partitions), consumer.end_offsets(partitions)
        for tp in partitions:
            consumer.assign([tp])
            consumer.seek(tp, begin[tp])
            first, deadline = None, time.monotonic() + timeout
            while first is None and consumer.position(tp) < end[tp] and time.monotonic() < deadline:
                records = consumer.poll(timeout_ms=1000, max_records=1).get(tp, [])
                first = records[0].timestamp if records else None
            found[tp.partition] = (begin[tp], first)
    return found
