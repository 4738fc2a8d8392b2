"""Avro binary encoding of usage events, with fastavro, in the three framings the job reads.

* Plain: Avro binary of avro/usage_event.avsc (the job's reader schema), no header.
* Single-object (Avro spec): ``C3 01``, the 8-byte CRC-64-AVRO fingerprint of the writer schema's
  Parsing Canonical Form (little-endian), the body. The writer schema must be one of avro/history.
* Schema registry (Confluent wire format): ``00``, the 4-byte big-endian schema id, the body; the job
  needs ``kafka.schema_registry_url``.

Schemas are parsed once per process. Producers of any language can write the same bytes from the .avsc files.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, TypedDict, cast

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from connectors.avro_types import AVRO_DIR, USAGE_EVENT_SCHEMA, load_schema

# Every writer schema a single-object message may name, usage_event-v1.avsc, -v2, ... (v1 is the reader schema).
HISTORY_DIR = AVRO_DIR / "history"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
_HISTORY_NAME = re.compile(r"usage_event-v([1-9][0-9]*)\.avsc")


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


def read_record(buf: io.BytesIO, schema: Any) -> dict[str, Any]:
    """One record of a parsed record schema, plain Avro binary read from ``buf`` (raises on malformed bytes)."""
    record = fastavro.schemaless_reader(buf, schema)
    if not isinstance(record, dict):  # fastavro reads a record schema as a dict
        msg = f"not an Avro record: {type(record).__name__}"
        raise TypeError(msg)
    return record


def decode_usage_event(data: bytes) -> UsageEvent:
    """Deserialize plain Avro binary into an event (raises on malformed bytes)."""
    return cast("UsageEvent", read_record(io.BytesIO(data), usage_event_schema()))


def schema_fingerprint(schema: Any) -> str:
    """CRC-64-AVRO of the schema's Parsing Canonical Form, as the 8 header bytes in hex (the job's reasons print the same)."""
    return str(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


@dataclass(frozen=True)
class HistorySchema:
    """One writer schema of avro/history."""

    version: int
    path: Path
    fingerprint: str


def schema_history(history_dir: Path = HISTORY_DIR) -> list[HistorySchema]:
    """avro/history in version order, each with its fingerprint; the job finds v1, v2, ... up to the first gap."""
    found = []
    for path in history_dir.glob("*.avsc"):
        match = _HISTORY_NAME.fullmatch(path.name)
        if match:
            found.append(HistorySchema(int(match.group(1)), path, schema_fingerprint(load_schema(path))))
    return sorted(found, key=lambda h: h.version)


@lru_cache(maxsize=16)
def _parsed(path: Path) -> tuple[Any, bytes]:
    schema = load_schema(path)
    return fastavro.parse_schema(schema), SINGLE_OBJECT_MAGIC + bytes.fromhex(schema_fingerprint(schema))


def encode_single_object(event: Mapping[str, Any], schema_path: Path = USAGE_EVENT_SCHEMA) -> bytes:
    """``event`` written with the schema at ``schema_path`` (one of avro/history for the job to read it), single-object framed."""
    parsed, header = _parsed(Path(schema_path).resolve())
    out = io.BytesIO(header)
    out.seek(len(header))
    fastavro.schemaless_writer(out, parsed, event)
    return out.getvalue()


def encode_registry_framed(event: Mapping[str, Any], schema_id: int, schema: Any) -> bytes:
    """``event`` written with ``schema`` (the .avsc as JSON, as registered under ``schema_id``), in the registry's wire format."""
    from connectors.schema_registry import frame

    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), event)
    return frame(schema_id, out.getvalue())


@lru_cache(maxsize=1)
def _closed_window_schema() -> Any:
    return fastavro.parse_schema(load_schema(AVRO_DIR / "closed_window.avsc"))


def encode_closed_window(window: Mapping[str, Any]) -> bytes:
    """A closed-window record (avro/closed_window.avsc) as the usage job writes it: plain Avro binary, no framing."""
    out = io.BytesIO()
    fastavro.schemaless_writer(out, _closed_window_schema(), dict(window))
    return out.getvalue()
