"""Send message values to Kafka as they are (re-sending dead letters): idempotent, every one acknowledged."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from meterflow.errors import ProduceError


def send_values(
    bootstrap_servers: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes]],
    *,
    max_request_size: int = 1_048_576,
    on_sent: Callable[[int], None] = lambda n: None,
) -> int:
    """Send (key, value) records unchanged; block until every one is acknowledged. Returns the count.

    Idempotent producer with acks=all: a retry after a lost acknowledgement never writes a record
    twice. ``max_request_size`` must cover the largest value (kafka-python refuses bigger ones
    before sending). ``on_sent`` is called with the number acknowledged since its last call.
    """
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    try:
        producer = KafkaProducer(
            bootstrap_servers=bootstrap_servers, acks="all", enable_idempotence=True, linger_ms=5, max_request_size=max_request_size, delivery_timeout_ms=120_000
        )
    except KafkaError as e:
        msg = f"cannot connect to Kafka at {bootstrap_servers}: {e}"
        raise ProduceError(msg) from e
    acked = [0]
    errors: list[BaseException] = []
    reported, sent = 0, 0

    def on_ack(_: object) -> None:
        acked[0] += 1

    def report() -> None:
        nonlocal reported
        if acked[0] > reported:
            on_sent(acked[0] - reported)
            reported = acked[0]

    try:
        for key, value in records:
            producer.send(topic, value, key=key).add_callback(on_ack).add_errback(errors.append)
            sent += 1
            if sent % 100 == 0:
                if errors:
                    raise errors[0]
                report()
        producer.flush()
        if errors:
            raise errors[0]
        report()
    except KafkaError as e:
        msg = f"sending to {topic} failed after {acked[0]} of {sent} acknowledged: {e}"
        raise ProduceError(msg) from e
    finally:
        producer.close()
    if acked[0] != sent:
        msg = f"sending to {topic}: {sent} records sent but {acked[0]} acknowledged"
        raise ProduceError(msg)
    return sent
