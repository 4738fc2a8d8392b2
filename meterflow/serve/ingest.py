"""HTTP ingest's rules (pure): a request's events checked one by one, and the tenants' API keys.

A request carries one event (a JSON object) or a batch (``{"events": [...]}``, at most
``serve.max_batch``). Each event is checked as ``meterflow produce`` checks a JSON line
(connectors/producer.py parse_event: the input contract the job enforces), and must belong to the
tenant whose key made the request. The answer lists every event's result in the request's order:
``accepted`` once Kafka acknowledged it, ``rejected`` with the reason (nothing written), or
``duplicate`` when an earlier event of the same request has its id (written once; the usage job
deduplicates across requests by event id, so a client retries a whole request safely).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from connectors.avro_codec import UsageEvent
from connectors.producer import parse_event

KEY_PREFIX = "mf_"

Status = Literal["accepted", "rejected", "duplicate"]


class RequestRefusedError(Exception):
    """The request as a whole is refused: its status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class EventResult:
    """What became of one event of a request."""

    index: int
    event_id: str | None
    status: Status
    reason: str | None = None


@dataclass(frozen=True)
class CheckedBatch:
    """The events to write (with their place in the request), and the results of the others."""

    to_send: list[tuple[int, UsageEvent]]
    results: list[EventResult]


def _items(body: Any, max_batch: int) -> list[Any]:
    if isinstance(body, dict) and "events" in body:
        events = body["events"]
        if not isinstance(events, list) or not events:
            raise RequestRefusedError(400, "events must be a non-empty list of event objects")
        if len(events) > max_batch:
            raise RequestRefusedError(413, f"{len(events)} events; a request takes at most {max_batch}")
        return events
    if isinstance(body, dict):
        return [body]
    raise RequestRefusedError(400, 'the body must be one event (a JSON object) or {"events": [...]}')


def check_batch(body: Any, tenant_id: str, max_batch: int) -> CheckedBatch:
    """Check a decoded request body for the tenant whose key made it; RequestRefusedError for the request as a whole."""
    to_send: list[tuple[int, UsageEvent]] = []
    results: list[EventResult] = []
    seen: set[str] = set()
    for index, item in enumerate(_items(body, max_batch)):
        raw_id = item.get("event_id") if isinstance(item, dict) else None
        event_id = raw_id if isinstance(raw_id, str) else None
        try:
            event = parse_event(item)
        except ValueError as e:
            results.append(EventResult(index, event_id, "rejected", str(e)))
            continue
        if event["tenant_id"] != tenant_id:
            # The same answer whether or not that tenant exists: a key tells nothing of other tenants.
            results.append(EventResult(index, event_id, "rejected", "tenant_id is not the tenant of this API key"))
            continue
        if event["event_id"] in seen:
            results.append(EventResult(index, event_id, "duplicate", "an earlier event of this request has this id"))
            continue
        seen.add(event["event_id"])
        to_send.append((index, event))
    return CheckedBatch(to_send, results)


def new_api_key() -> str:
    """A new tenant API key: 256 random bits, shown once and stored only as its hash."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """What the key table holds: SHA-256 of the key (a random 256-bit key needs no slow hash)."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, or None."""
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key.startswith(KEY_PREFIX) else None
