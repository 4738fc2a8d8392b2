"""A declared destination's rules (pure): its requests from meter events, what it refuses, how a change is corrected.

The declarations are meterflow/destinations.py's; the sender that makes the requests is
connectors/http_destination.py. Everything a provider would refuse is found here before a request
is made, so a refused delivery is recorded with its reason instead of costing a call, and a
correction the provider can no longer take is recorded as owed, never dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from billing.deliveries import MeterEvent
from billing.whole_values import ValueRules, value_refusal
from meterflow.config_values import format_duration
from meterflow.destinations import PLACEHOLDER, Destination
from meterflow.windowing import outside_provider_window


def fit_identifier(identifier: str, max_length: int) -> str:
    """The identifier as the destination takes it: itself when it fits, else the first ``max_length``
    hex digits of its SHA-256 (deterministic, so every retry and replay sends the same one).

    Two identifiers collide only if their hashes agree on that prefix: at 36 digits (144 bits), about
    2^-144 per pair, so about 2 x 10^-20 over the 5 x 10^23 pairs of 10^12 deliveries.
    """
    if len(identifier) <= max_length:
        return identifier
    return hashlib.sha256(identifier.encode()).hexdigest()[:max_length]


def _rfc3339(timestamp_s: int) -> str:
    return datetime.fromtimestamp(timestamp_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_fields(destination: Destination, event: MeterEvent) -> dict[str, Any]:
    """The values of the event template's placeholders (meterflow/destinations.py ``EVENT_FIELDS``)."""
    return {
        "identifier": fit_identifier(event.identifier, destination.limits.identifier_max_length),
        "event_name": event.event_name,
        "customer": event.provider_customer_id,
        "value": event.value,
        "timestamp_s": event.timestamp,
        "timestamp_ms": event.timestamp * 1000,
        "timestamp_rfc3339": _rfc3339(event.timestamp),
    }


def render(template: Any, fields: dict[str, Any]) -> Any:
    """A JSON template filled in: ``"{name}"`` alone takes the field as it is, a longer string has it formatted in."""
    if isinstance(template, str):
        whole = PLACEHOLDER.fullmatch(template)
        if whole:
            return fields[whole.group(1)]
        return PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]), template)
    if isinstance(template, dict):
        return {key: render(value, fields) for key, value in template.items()}
    if isinstance(template, list):
        return [render(value, fields) for value in template]
    return template


def render_event(destination: Destination, event: MeterEvent) -> dict[str, Any]:
    """One event of a request, as the destination's template makes it."""
    return render(destination.request.event, event_fields(destination, event))


def render_body(destination: Destination, events: list[dict[str, Any]]) -> Any:
    """The request body around rendered events: its lone ``"{events}"`` (the one placeholder a body may hold) takes the list."""
    return render(destination.request.body, {"events": events})


def encode(rendered: Any) -> bytes:
    """JSON as the sender sends it: compact, UTF-8."""
    return json.dumps(rendered, separators=(",", ":"), ensure_ascii=False).encode()


def compact_size(rendered: Any) -> int:
    """Bytes of the rendered JSON as it is sent (:func:`encode`)."""
    return len(encode(rendered))


def identifier_field(destination: Destination) -> str | None:
    """The event's field that carries the identifier as it is (how an answer names an event), if one does."""
    return next((key for key, value in destination.request.event.items() if value == "{identifier}"), None)


def event_refusal(destination: Destination, event: MeterEvent, now: datetime) -> str | None:
    """Why the destination would refuse this event, or None: its value, customer id, size or time."""
    limits = destination.limits
    rules = ValueRules(limits.values.whole_numbers, limits.values.max_significant_digits, limits.values.negative)
    refused = value_refusal(event.value, rules)
    if refused:
        return f"{destination.name}: {refused}"
    if limits.customer_max_length is not None and len(event.provider_customer_id) > limits.customer_max_length:
        return f"{destination.name}: customer id {event.provider_customer_id!r} is longer than {limits.customer_max_length} characters"
    if limits.max_event_bytes is not None:
        size = compact_size(render_event(destination, event))
        if size > limits.max_event_bytes:
            return f"{destination.name}: the event is {size} bytes, the provider takes at most {limits.max_event_bytes}"
    return time_refusal(destination, datetime.fromtimestamp(event.timestamp, UTC), now)


def time_refusal(destination: Destination, window_start: datetime, now: datetime) -> str | None:
    """Why the destination no longer (or not yet) takes an event timestamped ``window_start``, or None."""
    limits = destination.limits
    reason = outside_provider_window(window_start, now, limits.max_age, limits.max_ahead)
    if reason is None:
        return None
    return f"{destination.name}: {reason} (it takes {format_duration(limits.max_age)} back to {format_duration(limits.max_ahead)} ahead)"


@dataclass(frozen=True)
class CorrectionPlan:
    """What becomes of a correction at a destination: sent as a new event of the difference, or owed."""

    action: Literal["send", "owed"]
    reason: str | None = None


def plan_correction(
    destination: Destination, window_start: datetime, quantity: Decimal, now: datetime
) -> CorrectionPlan:
    """The cheapest legal correction of a window at its destination, inside the destination's horizon:
    usage added late is one more event of the difference; usage taken away needs a destination that
    takes a negative difference. Past the horizon, or where the destination takes no such event, the
    correction is owed: recorded and reported, not sent."""
    limits = destination.limits
    if quantity < 0 and (limits.correction == "none" or not limits.values.negative):
        return CorrectionPlan("owed", f"{destination.name} takes no correction that lowers usage it accepted")
    refused = time_refusal(destination, window_start, now)
    if refused:
        return CorrectionPlan("owed", refused)
    return CorrectionPlan("send")


def refused_in_answer(destination: Destination, answer: Any) -> dict[str, str] | None:
    """The events a 2xx answer says it refused: their identifier (as sent) and why; None when it lists
    one it does not name (then which events arrived is unknown)."""
    failed = destination.request.failed_events
    if failed is None or not isinstance(answer, dict):
        return {}
    refused = {}
    for entry in answer.get(failed.list) or []:
        if not isinstance(entry, dict) or entry.get(failed.identifier) is None:
            return None
        why = "; ".join(str(entry[k]) for k in failed.reason if entry.get(k) is not None)
        refused[str(entry[failed.identifier])] = why or "refused without a reason"
    return refused


def request_id_in_answer(destination: Destination, answer: Any, header: str | None) -> str | None:
    """The id the destination gives the request: the declared answer field, else the Request-Id header."""
    field = destination.request.request_id
    if field and isinstance(answer, dict) and answer.get(field) is not None:
        return str(answer[field])
    return header
