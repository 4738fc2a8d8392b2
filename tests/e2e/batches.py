"""Batches of events sent with a known watermark, and their oracle: which events are late (the
lateness rule, ``meterflow.windowing.is_late_after``) and which are counted."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

import fastavro

from connectors.avro_codec import UsageEvent
from connectors.avro_types import load_schema
from jobs.plan import CLOSED_WINDOW_SCHEMA, DEAD_LETTER_SCHEMA, LATE_EVENT_SCHEMA
from meterflow.windowing import is_late_after
from tests.e2e.scenario import CLOCK_TENANT, WINDOW, usage_event

LATE_SCHEMA = fastavro.parse_schema(load_schema(LATE_EVENT_SCHEMA))
DEAD_SCHEMA = fastavro.parse_schema(load_schema(DEAD_LETTER_SCHEMA))
CLOSED_SCHEMA = fastavro.parse_schema(load_schema(CLOSED_WINDOW_SCHEMA))


def to_ms(d: timedelta) -> int:
    """A duration in whole milliseconds."""
    return int(d / timedelta(milliseconds=1))


def avro_decoder(schema):
    """Decode a record of one of the project's Avro schemas."""
    return lambda value: fastavro.schemaless_reader(io.BytesIO(value), schema)


@dataclass
class Batch:
    """Events sent with a known watermark (epoch ms, the held one) under a known history of lateness."""

    name: str
    events: list[UsageEvent]
    history: list[
        tuple[int, int | None]
    ]  # (allowed lateness ms, watermark ms) steps, as meterflow.windowing.is_late_after takes them
    duplicates: list[UsageEvent] = field(default_factory=list)
    bad: list[bytes] = field(default_factory=list)

    @property
    def watermark_ms(self) -> int | None:
        return max((w for _, w in self.history if w is not None), default=None)

    def late(self) -> list[UsageEvent]:
        return [e for e in self.events if is_late_after(self.history, end_ms(e))]

    def counted(self) -> list[UsageEvent]:
        return [e for e in self.events if not is_late_after(self.history, end_ms(e))]


def end_ms(e: UsageEvent) -> int:
    """The end (epoch ms) of the window an event falls in."""
    ms = int(e["event_time"].timestamp() * 1000)
    size = to_ms(WINDOW)
    return ms - ms % size + size


def in_windows(
    rng: random.Random, start: datetime, tag: str, windows: list[int], n: int, span: timedelta = WINDOW
) -> list[UsageEvent]:
    """``n`` events in each window index of ``windows``, spread over the window's first ``span``, its last millisecond included."""
    events = []
    for w in windows:
        for i in range(n):
            offset = (
                span - timedelta(milliseconds=1) if i == 0 else timedelta(milliseconds=rng.randint(0, to_ms(span) - 1))
            )
            meter = ("api_calls", "tokens")[i % 2]
            qty = Decimal(3) if meter == "api_calls" else Decimal("0.25")
            events.append(
                usage_event(f"{tag}-w{w}-{i}", f"t{i % 4}", f"c{i % 25}", meter, qty, start + w * WINDOW + offset)
            )
    return events


def clock_events(start: datetime, tag: str, at: datetime, partitions: int) -> list[UsageEvent]:
    """One clock event per partition, dated ``at``: sent one to a partition, they move each partition's watermark."""
    return [usage_event(f"{tag}-{p}", CLOCK_TENANT, f"p{p}", "api_calls", Decimal(1), at) for p in range(partitions)]


def totals_of(rows: dict) -> dict:
    """(quantity, event count) per window of Postgres rows."""
    return {k: (r.quantity, r.event_count) for k, r in rows.items()}
