"""Send message values to Kafka (events a producer makes, dead letters re-sent): idempotent, every one acknowledged."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from meterflow.errors import ProduceError

# (key, value) or (key, value, partition, timestamp ms); None leaves the choice to the producer.
Outgoing = tuple[bytes | None, bytes] | tuple[bytes | None, bytes, int | None, int | None]


def send_values(
    bootstrap_servers: str,
    topic: str,
    records: Iterable[Outgoing],
    *,
    rate: float = 0.0,
    max_request_size: int = 1_048_576,
    batch_size: int = 16_384,
    on_sent: Callable[[int], None] = lambda n: None,
    noun: str = "records",
) -> int:
    """Send records unchanged; block until every one is acknowledged. Returns the count.

    Idempotent producer with acks=all, retried for up to 2 minutes: a broker restart or a lost
    acknowledgement is ridden out and never writes a record twice. Sends are pipelined:
    acknowledgements are counted by callbacks, so the sender never waits for a round trip
    (kafka-python blocks ``send`` only when its buffer is full).

    Args:
        rate: records per second (0 = as fast as possible).
        max_request_size: must cover the largest value (kafka-python refuses bigger ones before sending).
        on_sent: called with the number acknowledged since its last call.
        noun: what the records are, in error messages.
    """
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    try:
        producer = KafkaProducer(
            bootstrap_servers=bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            batch_size=batch_size,
            max_request_size=max_request_size,
            delivery_timeout_ms=120_000,
        )
    except KafkaError as e:
        msg = f"cannot connect to Kafka at {bootstrap_servers}: {e}"
        raise ProduceError(msg) from e
    acked = [0]
    errors: list[BaseException] = []
    reported, sent, started = 0, 0, time.monotonic()

    def on_ack(_: object) -> None:
        acked[0] += 1

    def report() -> None:
        nonlocal reported
        # One read: the producer's I/O thread counts acknowledgements while this runs.
        now = acked[0]
        if now > reported:
            on_sent(now - reported)
            reported = now

    try:
        for record in records:
            key, value, partition, timestamp_ms = (*record, None, None)[:4]
            producer.send(topic, value, key=key, partition=partition, timestamp_ms=timestamp_ms).add_callback(
                on_ack
            ).add_errback(errors.append)
            sent += 1
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            if sent % 100 == 0:
                if errors:
                    raise errors[0]
                report()
        producer.flush()
        if errors:
            raise errors[0]
        report()
    except KafkaError as e:
        msg = f"sending to {topic} failed after {acked[0]} of {sent} {noun} acknowledged: {e}"
        raise ProduceError(msg) from e
    finally:
        producer.close()
    if acked[0] != sent:
        msg = f"sending to {topic}: {sent} {noun} sent but {acked[0]} acknowledged"
        raise ProduceError(msg)
    return sent
