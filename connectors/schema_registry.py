"""A Confluent-compatible schema registry, for producers and tests: register a writer schema, get its id,
frame a message in the registry's wire format.

The wire format: magic byte 0, the schema id as a 4-byte big-endian signed int, then the Avro binary
body written with that schema. Subjects follow Confluent's default TopicNameStrategy
(``<topic>-value``). The framing and request helpers are pure; the three HTTP calls use the standard
library (as the local stack's Flink REST client does), so producers need no extra package.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

MAGIC_BYTE = 0
HEADER = struct.Struct(">Bi")  # magic byte, schema id
MAX_SCHEMA_ID = 2**31 - 1
CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
COMPATIBILITY_LEVELS = frozenset(
    {"NONE", "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE"}
)


class SchemaRegistryError(Exception):
    """The registry refused a request (``status`` is the HTTP status, 0 when it was not reached)."""

    def __init__(self, status: int, message: str, error_code: int | None = None) -> None:
        super().__init__(
            f"schema registry: HTTP {status}: {message}" if status else f"schema registry unreachable: {message}"
        )
        self.status = status
        self.error_code = error_code
        self.message = message


def value_subject(topic: str) -> str:
    """The subject of a topic's value schemas (TopicNameStrategy)."""
    return f"{topic}-value"


def schema_text(schema: Mapping[str, Any] | str) -> str:
    """A schema as the JSON text the registry stores: a parsed schema is dumped compactly, text is kept as is."""
    return schema if isinstance(schema, str) else json.dumps(schema, separators=(",", ":"))


def frame(schema_id: int, body: bytes) -> bytes:
    """``body`` (Avro binary) in the wire format of schema ``schema_id``."""
    if not 0 <= schema_id <= MAX_SCHEMA_ID:
        msg = f"schema id {schema_id} is outside 0..{MAX_SCHEMA_ID}"
        raise ValueError(msg)
    return HEADER.pack(MAGIC_BYTE, schema_id) + body


def unframe(message: bytes) -> tuple[int, bytes] | None:
    """(schema id, Avro body) of a wire-format message; None when it is shorter than the header or its magic byte is not 0."""
    if len(message) < HEADER.size or message[0] != MAGIC_BYTE:
        return None
    return HEADER.unpack_from(message)[1], message[HEADER.size :]


def subject_versions_url(base_url: str, subject: str) -> str:
    """``POST`` here registers a schema under ``subject`` (the subject is URL-encoded whole)."""
    return f"{base_url.rstrip('/')}/subjects/{quote(subject, safe='')}/versions"


def schema_by_id_url(base_url: str, schema_id: int) -> str:
    """``GET`` here returns the schema with that id, as the job fetches it."""
    return f"{base_url.rstrip('/')}/schemas/ids/{int(schema_id)}"


def register_schema(base_url: str, subject: str, schema: Mapping[str, Any] | str, timeout: float = 10.0) -> int:
    """Register ``schema`` under ``subject`` and return its id; the same schema again returns the same id.

    Raises SchemaRegistryError, e.g. status 409 when the subject's compatibility rule refuses it, 422 for an invalid schema.
    """
    answer = _call("POST", subject_versions_url(base_url, subject), {"schema": schema_text(schema)}, timeout)
    return int(answer["id"])


def fetch_schema(base_url: str, schema_id: int, timeout: float = 10.0) -> Any:
    """The schema with that id, parsed from its JSON text. SchemaRegistryError with status 404 when there is none."""
    answer = _call("GET", schema_by_id_url(base_url, schema_id), None, timeout)
    return json.loads(answer["schema"])


def set_compatibility(base_url: str, subject: str, level: str, timeout: float = 10.0) -> None:
    """Set the compatibility rule new versions of ``subject`` must meet (e.g. BACKWARD: readers of the new schema read old data)."""
    if level not in COMPATIBILITY_LEVELS:
        msg = f"unknown compatibility level {level!r}; one of {sorted(COMPATIBILITY_LEVELS)}"
        raise ValueError(msg)
    _call("PUT", f"{base_url.rstrip('/')}/config/{quote(subject, safe='')}", {"compatibility": level}, timeout)


def error_of(status: int, body: bytes) -> SchemaRegistryError:
    """The error a refusal carries: Confluent's ``{"error_code": .., "message": ..}`` when the body is that, else the body's text."""
    try:
        data = json.loads(body)
        return SchemaRegistryError(status, str(data["message"]), int(data["error_code"]))
    except (ValueError, KeyError, TypeError):
        return SchemaRegistryError(status, body.decode("utf-8", "replace")[:500])


def _call(method: str, url: str, payload: Mapping[str, Any] | None, timeout: float) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise error_of(e.code, e.read()) from None
    except (urllib.error.URLError, OSError) as e:
        raise SchemaRegistryError(0, f"{url}: {e}") from None
