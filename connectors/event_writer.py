"""Usage events to the input topic one request at a time, each acknowledged by Kafka (HTTP ingest).

One idempotent producer (``acks=all``) for the process, shared by the requests in flight (the
Kafka client is thread-safe). Each event goes as the project's plain Avro, keyed by customer
(connectors/producer.py), as ``meterflow produce`` writes it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from kafka import KafkaProducer
from kafka.errors import KafkaError

from connectors.avro_codec import UsageEvent, encode_usage_event
from connectors.producer import message_key


class KafkaEventWriter:
    """Write events and wait for their acknowledgement: each one's error, or None once acknowledged."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self.topic = topic
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            retries=5,
            request_timeout_ms=10_000,
            max_block_ms=5_000,
        )

    def write(self, events: Sequence[UsageEvent], timeout_s: float) -> list[str | None]:
        futures = []
        for event in events:
            try:
                futures.append(self._producer.send(self.topic, key=message_key(event), value=encode_usage_event(event)))
            except KafkaError as e:  # the buffer full past max_block_ms, the broker unknown
                futures.append(e)
        # Each request waits for its own events only, never for what other requests buffered (no flush).
        deadline = time.monotonic() + timeout_s
        errors: list[str | None] = []
        for future in futures:
            if isinstance(future, KafkaError):
                errors.append(f"not written: {type(future).__name__}")
                continue
            try:
                future.get(timeout=max(deadline - time.monotonic(), 0))
            except KafkaError as e:  # KafkaTimeoutError too: not acknowledged in time
                errors.append(f"not written: {type(e).__name__}")
            else:
                errors.append(None)
        return errors

    def close(self) -> None:
        self._producer.close(timeout=10)
