"""Usage events for Kafka: a deterministic synthetic generator, a JSON-lines reader, and the sender.

Generation and parsing are pure (tests use them as the oracle's input); ``send_events`` is the only
part that talks to Kafka.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from connectors.avro_codec import UsageEvent, encode_usage_event
from meterflow.errors import ProduceError
from meterflow.input_contract import contract_violation

REQUIRED_FIELDS = ("event_id", "tenant_id", "customer_id", "meter", "quantity", "event_time")


@dataclass(frozen=True)
class SyntheticSpec:
    """What ``meterflow produce`` generates when no file is given."""

    count: int = 1000
    tenants: int = 2
    customers: int = 5
    meters: tuple[str, ...] = ("api_calls", "tokens")
    start: datetime = field(default_factory=lambda: datetime.now(UTC) - timedelta(minutes=10))
    span: timedelta = timedelta(minutes=8)
    seed: int = 7


def synthetic_events(spec: SyntheticSpec) -> Iterator[UsageEvent]:
    """Deterministic events spread over [start, start + span), in event-time order with small jitter."""
    rng = random.Random(spec.seed)  # noqa: S311 - reproducible synthetic data, not a secret
    span_ms = int(spec.span / timedelta(milliseconds=1))
    for i in range(spec.count):
        offset_ms = (span_ms * i) // max(spec.count, 1) + rng.randint(0, 500)
        meter = spec.meters[i % len(spec.meters)]
        # Exact quantities: whole units for counters, three decimals otherwise.
        quantity = Decimal(rng.randint(1, 5)) if meter == "api_calls" else Decimal(rng.randint(1, 500_000)).scaleb(-3)
        yield UsageEvent(
            event_id=f"evt-{spec.seed}-{i}",
            tenant_id=f"tenant-{rng.randrange(spec.tenants)}",
            customer_id=f"cust-{rng.randrange(spec.customers)}",
            meter=meter,
            quantity=quantity,
            event_time=min(
                spec.start + timedelta(milliseconds=offset_ms), spec.start + spec.span - timedelta(milliseconds=1)
            ),
            dimensions={"region": rng.choice(("eu", "us"))},
        )


@dataclass(frozen=True)
class RejectedLine:
    """A JSON-lines input line that is not a valid usage event, with the reason."""

    line_number: int
    reason: str
    text: str


def _shown(value: Any) -> str:
    """``repr(value)`` cut to 40 characters: a reason never repeats a huge field."""
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def parse_event(obj: Any) -> UsageEvent:
    """Turn one decoded JSON object into a usage event; ValueError with the reason if it is not one.

    ``quantity`` must be a JSON string or integer (a JSON float would already be inexact);
    ``event_time`` is ISO-8601 with a zone, or integer epoch milliseconds. An event that breaks the
    input contract (meterflow/input_contract.py) is refused with the reason the job would give it.
    """
    if not isinstance(obj, dict):
        msg = "not a JSON object"
        raise ValueError(msg)
    missing = [f for f in REQUIRED_FIELDS if obj.get(f) in (None, "")]
    if missing:
        msg = f"missing field(s): {', '.join(missing)}"
        raise ValueError(msg)
    for name in ("event_id", "tenant_id", "customer_id", "meter"):
        if not isinstance(obj[name], str):
            msg = f"{name} must be a string"
            raise ValueError(msg)
    raw_q = obj["quantity"]
    if isinstance(raw_q, bool) or not isinstance(raw_q, (str, int)):
        msg = "quantity must be a decimal string or an integer, not a JSON float"
        raise ValueError(msg)
    try:
        quantity = Decimal(str(raw_q))
    except InvalidOperation as e:
        msg = f"quantity {_shown(raw_q)} is not a decimal number"
        raise ValueError(msg) from e
    exponent = quantity.as_tuple().exponent  # an int for a finite number
    if not isinstance(exponent, int) or exponent < -9 or abs(quantity) >= Decimal(10) ** 29:
        msg = f"quantity {_shown(raw_q)} does not fit decimal(38, 9)"
        raise ValueError(msg)
    raw_t = obj["event_time"]
    if isinstance(raw_t, int) and not isinstance(raw_t, bool):
        event_time = datetime.fromtimestamp(raw_t / 1000, UTC)
    elif isinstance(raw_t, str):
        try:
            event_time = datetime.fromisoformat(raw_t.replace("Z", "+00:00"))
        except ValueError as e:
            msg = f"event_time {_shown(raw_t)} is not ISO-8601"
            raise ValueError(msg) from e
        if event_time.tzinfo is None:
            msg = f"event_time {_shown(raw_t)} has no time zone"
            raise ValueError(msg)
    else:
        msg = "event_time must be an ISO-8601 string or epoch milliseconds"
        raise ValueError(msg)
    dims = obj.get("dimensions") or {}
    if not isinstance(dims, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in dims.items()):
        msg = "dimensions must be an object of string values"
        raise ValueError(msg)
    event = UsageEvent(
        event_id=obj["event_id"],
        tenant_id=obj["tenant_id"],
        customer_id=obj["customer_id"],
        meter=obj["meter"],
        quantity=quantity,
        event_time=event_time.astimezone(UTC),
        dimensions=dims,
    )
    reason = contract_violation(event)
    if reason:
        raise ValueError(reason)
    return event


def read_jsonl(path: Path, rejected: list[RejectedLine]) -> Iterator[UsageEvent]:
    """Events from a JSON-lines file; bad lines are appended to ``rejected`` and skipped."""
    try:
        handle = path.open()
    except OSError as e:
        msg = f"cannot read {path}: {e}"
        raise ProduceError(msg) from e
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield parse_event(json.loads(line))
            except (ValueError, json.JSONDecodeError) as e:
                rejected.append(RejectedLine(number, str(e), line.rstrip("\n")))


def message_key(event: UsageEvent) -> bytes:
    """Partition by customer so one customer's events stay in order."""
    return f"{event['tenant_id']}/{event['customer_id']}".encode()


def send_events(
    bootstrap_servers: str,
    topic: str,
    events: Iterable[UsageEvent],
    *,
    rate: float = 0.0,
    on_sent: Callable[[int], None] = lambda n: None,
    partition_for: Callable[[int, UsageEvent], int | None] = lambda i, e: None,
    timestamp_for: Callable[[int, UsageEvent], int | None] = lambda i, e: None,
) -> int:
    """Send events as plain Avro; block until every one is acknowledged. Returns the count sent.

    Args:
        rate: events per second (0 = as fast as possible).
        on_sent: progress callback, called with the number acknowledged since the last call.
        partition_for: explicit partition for event i (None = by key).
        timestamp_for: Kafka record timestamp in epoch ms for event i (None = the send time).
    """
    from connectors.kafka_writer import send_values

    records = (
        (message_key(e), encode_usage_event(e), partition_for(i, e), timestamp_for(i, e)) for i, e in enumerate(events)
    )
    return send_values(
        bootstrap_servers, topic, records, rate=rate, batch_size=256 * 1024, on_sent=on_sent, noun="events"
    )
