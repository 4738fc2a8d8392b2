"""Plain Avro binary encoding of usage events (no framing, no registry id), with fastavro.

The schema is parsed once per process. Producers of any language can write the same bytes from
avro/usage_event.avsc.
"""

from __future__ import annotations

import io
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any, TypedDict

import fastavro

from connectors.avro_types import USAGE_EVENT_SCHEMA, load_schema


class UsageEvent(TypedDict):
    """A usage event as Python values (quantity exact, event_time aware UTC)."""

    event_id: str
    tenant_id: str
    customer_id: str
    meter: str
    quantity: Decimal
    event_time: datetime
    dimensions: dict[str, str]


@lru_cache(maxsize=1)
def usage_event_schema() -> Any:
    """The parsed usage event schema (parsed once)."""
    return fastavro.parse_schema(load_schema(USAGE_EVENT_SCHEMA))


def encode_usage_event(event: UsageEvent) -> bytes:
    """Serialize one event to plain Avro binary."""
    out = io.BytesIO()
    fastavro.schemaless_writer(out, usage_event_schema(), event)
    return out.getvalue()


def decode_usage_event(data: bytes) -> UsageEvent:
    """Deserialize plain Avro binary into an event (raises on malformed bytes)."""
    return fastavro.schemaless_reader(io.BytesIO(data), usage_event_schema())  # type: ignore[return-value]
