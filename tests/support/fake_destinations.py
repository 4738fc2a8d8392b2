"""Fault-injecting fakes of Metronome's and Chargebee's usage ingest APIs, owned by this project's tests.

Neither provider has a local server to run, so these stand in for them. Each is a real HTTP server
on loopback that refuses what its provider documents it refuses, independently of the project's
own destination rules (meterflow/destination_presets/), so a test fails when the sender's rules
drift from the provider's:

* every request body is validated against the provider's published OpenAPI document, committed
  under tests/contracts/ (schema, required fields, lengths, batch size);
* the rules a schema cannot state: the timestamp range against the fake's (injectable) clock,
  deduplication of identifiers over the provider's horizon, authentication;
* the same faults as the Stripe fake (tests/support/fake_stripe.py): scheduled 429 with Retry-After,
  5xx, slow answers, dropped connections and held requests, and failing for a while.
"""

from __future__ import annotations

import base64
import json
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema

from tests.support.faults import FAULT_OUTCOMES, FaultInjection

CONTRACTS = Path(__file__).resolve().parent.parent / "contracts"


def request_schema(document: str, path: str, content_type: str = "application/json") -> dict[str, Any]:
    """The request body schema of ``POST path`` in a committed OpenAPI document, its components alongside."""
    spec = json.loads((CONTRACTS / document).read_text())
    schema = spec["paths"][path]["post"]["requestBody"]["content"][content_type]["schema"]
    return {**schema, "components": spec.get("components", {})}


@dataclass
class Accepted:
    """One event the fake took and counts."""

    identifier: str
    customer: str
    event_name: str
    value: Decimal
    timestamp_ms: int
    request_id: str
    accepted_at: float = 0.0  # the fake's clock when it took the event
    value_sent: Any = None  # the value as it came: a decimal string, or a JSON number (parsed exact, never a float)


@dataclass
class Record:
    """One request and what became of it."""

    identifiers: list[str]
    outcome: str  # accepted | invalid | unauthorized | rejected-<status> | slow | dropped | held
    detail: str = ""


@dataclass
class FakeDestination(FaultInjection):
    """The server and the faults; a provider's subclass says what a request must be and how it is answered."""

    api_key: str = "fake-key"
    latency: float = 0.0
    events: list[Accepted] = field(default_factory=list)  # every event counted, in order
    _seen: dict[str, float] = field(default_factory=dict)  # identifier: when it was first counted
    duplicates: int = 0  # events whose identifier was accepted before inside the horizon: ignored
    requests: list[Record] = field(default_factory=list)
    _counter: int = 0

    name = "destination"
    path = "/"
    dedup_horizon_s = 0.0

    # -- control -------------------------------------------------------------------------------
    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.requests:
            counts[r.outcome] = counts.get(r.outcome, 0) + 1
        return counts

    def sent_in_requests(self, identifier: str) -> int:
        """How many requests carried this identifier (accepted, refused or answered with a fault)."""
        return sum(1 for r in self.requests if identifier in r.identifiers)

    def total(self, customer: str, event_name: str) -> Decimal:
        with self._lock:
            return sum(
                (a.value for a in self.events if a.customer == customer and a.event_name == event_name),
                Decimal(0),
            )

    # -- server --------------------------------------------------------------------------------
    def start(self, port: int = 0) -> FakeDestination:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake._handle_in_flight(fake.latency, lambda: fake._handle(self, body))

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024

        self._serve(Handler, port, f"fake-{self.name}", Server)
        return self

    # -- behaviour -----------------------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        if handler.path.split("?")[0] != self.path:
            return self._answer(handler, 404, self.error_body(404, f"no route {handler.path}"))
        if not self.authorized(handler.headers.get("Authorization") or ""):
            self.requests.append(Record([], "unauthorized"))
            return self._answer(handler, 401, self.error_body(401, "invalid credentials"))
        try:
            body = json.loads(raw, parse_float=Decimal)
        except ValueError:
            self.requests.append(Record([], "invalid", "not JSON"))
            return self._answer(handler, 400, self.error_body(400, "request body is not JSON"))
        identifiers = self.identifiers(body)
        fault = self._next_fault()
        if fault is not None and fault.kind == "status":
            self.requests.append(Record(identifiers, f"rejected-{fault.status}"))
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
            return self._answer(handler, fault.status, self.error_body(fault.status, "injected"), headers)
        problem = self.invalid(body)
        if problem:
            self.requests.append(Record(identifiers, "invalid", problem))
            return self._answer(handler, 400, self.error_body(400, problem))
        if self.over_limit(body):
            self.requests.append(Record(identifiers, "rejected-429", "over the provider's rate"))
            return self._answer(handler, 429, self.error_body(429, "request rate exceeded"), {"Retry-After": "60"})
        with self._lock:
            self._counter += 1
            request_id = f"{self.name}-req-{self._counter}"
        status, answer = self.accept(body, request_id)
        self.requests.append(Record(identifiers, "accepted" if fault is None else FAULT_OUTCOMES[fault.kind]))
        return self._finish(handler, fault, status, answer)

    def _answer(
        self, handler: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        handler.send_response(status)
        if data:
            handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)

    def _take(self, event: Accepted) -> bool:
        """Count an event unless its identifier was taken inside the horizon (then it is ignored)."""
        with self._lock:
            now = self.clock()
            seen = self._seen.get(event.identifier)
            if seen is not None and now - seen <= self.dedup_horizon_s:
                self.duplicates += 1
                return False
            event.accepted_at = self._seen[event.identifier] = now
            self.events.append(event)
            return True

    # -- what a provider says ------------------------------------------------------------------
    def authorized(self, header: str) -> bool:
        raise NotImplementedError

    def error_body(self, status: int, message: str) -> Any:
        raise NotImplementedError

    def identifiers(self, body: Any) -> list[str]:
        raise NotImplementedError

    def invalid(self, body: Any) -> str | None:
        raise NotImplementedError

    def accept(self, body: Any, request_id: str) -> tuple[int, Any]:
        raise NotImplementedError

    def over_limit(self, body: Any) -> bool:
        """Whether the provider's own rate limit refuses this valid request (429)."""
        return False


def _schema_problem(schema: dict[str, Any], body: Any) -> str | None:
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(body), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    first = errors[0]
    where = "/".join(str(p) for p in first.absolute_path) or "body"
    # The validator's own message quotes the whole instance: a 100-event body is no reason to read.
    message = first.message if len(first.message) <= 200 else f"breaks {first.validator} {first.validator_value}"
    return f"{where}: {message}"


def _decimal(value: Any) -> Decimal | None:
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


@dataclass
class FakeMetronome(FakeDestination):
    """``POST /v1/ingest`` as Metronome documents it (tests/contracts/metronome_ingest.openapi.json).

    A bare JSON array of 1 to 100 events; ``transaction_id`` deduplicates for 34 days (a repeat is
    ignored, answered 200); timestamps backdated more than 34 days or more than 24 hours ahead are
    refused with 400 and the request takes nothing; 4xx bodies are ``{"message": ...}``.
    """

    name = "metronome"
    path = "/v1/ingest"
    dedup_horizon_s = 34 * 86400.0
    value_property: str = "value"

    def __post_init__(self) -> None:
        self._schema = request_schema("metronome_ingest.openapi.json", self.path)

    def authorized(self, header: str) -> bool:
        return header == f"Bearer {self.api_key}"

    def error_body(self, status: int, message: str) -> Any:
        return {"message": message}

    def identifiers(self, body: Any) -> list[str]:
        return [str(e.get("transaction_id")) for e in body if isinstance(e, dict)] if isinstance(body, list) else []

    def invalid(self, body: Any) -> str | None:
        problem = _schema_problem(self._schema, body)
        if problem:
            return problem
        now = self.clock()
        for event in body:
            try:
                at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
            except ValueError:  # the pattern's shape, but no such moment (2026-02-30)
                return f"{event['transaction_id']}: timestamp {event['timestamp']} is not a valid RFC 3339 time"
            if at < now - 34 * 86400:
                return f"{event['transaction_id']}: timestamp {event['timestamp']} is more than 34 days in the past"
            if at > now + 24 * 3600:
                return f"{event['transaction_id']}: timestamp {event['timestamp']} is more than 24 hours in the future"
        return None

    def accept(self, body: Any, request_id: str) -> tuple[int, Any]:
        for event in body:
            sent = (event.get("properties") or {}).get(self.value_property)
            value = _decimal(sent)
            at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
            self._take(
                Accepted(
                    event["transaction_id"],
                    event["customer_id"],
                    event["event_type"],
                    value if value is not None else Decimal(0),
                    int(at * 1000),
                    request_id,
                    value_sent=sent,
                )
            )
        return 200, None


def basic_user(header: str) -> str | None:
    """The user of an HTTP Basic Authorization header, or None."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, _ = base64.b64decode(encoded).decode().partition(":")
    except ValueError:
        return None
    return user


@dataclass
class FakeChargebee(FakeDestination):
    """``POST /api/v2/batch/usage_events`` on a site's ingest host, as Chargebee documents it
    (tests/contracts/chargebee_batch_usage_events.openapi.json, and the docs it cites).

    The JSON body Chargebee's SDKs send, validated in the published schema's column form; at most
    500 events, each at most 1 KB; timestamps of the last 12 hours only; 10,000 events per minute
    (429 past it); one event recorded per (usage_timestamp, subscription_id, deduplication_id), a
    repeat ignored; HTTP Basic with the API key as the user. Errors are
    ``{"message", "type", "api_error_code", "param"}``.
    """

    name = "chargebee"
    path = "/api/v2/batch/usage_events"
    dedup_horizon_s = float("inf")  # the key holds the timestamp: a repeat is the same event, whenever it comes
    events_per_minute: int = 10_000
    # Events to list in failed_events instead of recording them (by deduplication_id): the entry's fields.
    fail_events: dict[str, dict[str, str]] = field(default_factory=dict)
    unnamed_failures: bool = False  # list fail_events' entries without their deduplication_id
    value_property: str = "value"
    event_name_property: str = "event_name"
    _minute: deque[tuple[float, int]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        # The schema states the form body; the SDKs' JSON body is checked in that shape (columns of the events' fields).
        self._schema = request_schema(
            "chargebee_batch_usage_events.openapi.json", "/batch/usage_events", "application/x-www-form-urlencoded"
        )

    def authorized(self, header: str) -> bool:
        return basic_user(header) == self.api_key

    def error_body(self, status: int, message: str) -> Any:
        kinds = {
            400: ("invalid_request", "param_wrong_value"),
            401: ("untyped", "api_authentication_failed"),
            404: ("invalid_request", "resource_not_found"),
            429: ("operation_failed", "api_request_limit_exceeded"),
            503: ("operation_failed", "internal_temporary_error"),
        }
        kind, code = kinds.get(status, ("operation_failed", "internal_error"))
        return {"message": message, "type": kind, "api_error_code": code}

    def identifiers(self, body: Any) -> list[str]:
        events = body.get("events") if isinstance(body, dict) else None
        return (
            [str(e.get("deduplication_id")) for e in events if isinstance(e, dict)] if isinstance(events, list) else []
        )

    def invalid(self, body: Any) -> str | None:
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            return "events: a list of event objects is required"
        columns = {
            key: [e.get(key) for e in events]
            for key in ("deduplication_id", "subscription_id", "usage_timestamp", "properties")
        }
        problem = _schema_problem(self._schema, {"events": columns})
        if problem:
            return problem
        if any(v is None for column in columns.values() for v in column):
            return "events: every event needs deduplication_id, subscription_id, usage_timestamp and properties"
        if len(events) > 500:
            return f"events: {len(events)} events, at most 500 in a batch"
        now_ms = self.clock() * 1000
        for i, event in enumerate(events):
            # The event as it came: compact UTF-8 JSON (the sender's encoding; an escaping sender would count more).
            size = len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode())
            if size > 1024:
                return f"events[{i}]: {size} bytes, an event is at most 1 KB"
            # "The timestamp must be within the last 12 hours": not before, and not ahead of now.
            if not now_ms - 12 * 3600 * 1000 <= event["usage_timestamp"] <= now_ms:
                return f"events[usage_timestamp][{i}]: the timestamp must be within the last 12 hours"
        return None

    def over_limit(self, body: Any) -> bool:
        """Whether these events would pass the events per minute (they are counted when not)."""
        with self._lock:
            now = self.clock()
            while self._minute and self._minute[0][0] <= now - 60:
                self._minute.popleft()
            if sum(n for _, n in self._minute) + len(body["events"]) > self.events_per_minute:
                return True
            self._minute.append((now, len(body["events"])))
            return False

    def accept(self, body: Any, request_id: str) -> tuple[int, Any]:
        failed = []
        for event in body["events"]:
            if event["deduplication_id"] in self.fail_events:
                entry = {"deduplication_id": event["deduplication_id"], **self.fail_events[event["deduplication_id"]]}
                if self.unnamed_failures:
                    del entry["deduplication_id"]
                failed.append(entry)
                continue
            properties = event["properties"]
            sent = properties.get(self.value_property)
            value = _decimal(sent)
            taken = Accepted(
                f"{event['usage_timestamp']}\x00{event['subscription_id']}\x00{event['deduplication_id']}",
                event["subscription_id"],
                str(properties.get(self.event_name_property, "")),
                value if value is not None else Decimal(0),
                int(event["usage_timestamp"]),
                request_id,
                value_sent=sent,
            )
            self._take(taken)
        return 200, {"batch_id": request_id, "failed_events": failed}
