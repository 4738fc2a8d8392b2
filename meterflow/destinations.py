"""Billing destinations, declared: what a provider takes and how a delivery becomes its request.

A destination is data, not code: ``billing.destinations`` in the config names each one, and a
``preset`` (meterflow/destination_presets/<preset>.yaml) gives a known provider's request mapping
and limits, which the config may override key by key. A provider of the same kind (a JSON API
taking batches of events) is a new preset or a ``preset: http`` declaration with its own mapping;
the sender, ledger, retries, rate limits and reconcile are the same for all (connectors/http_destination.py).

The mapping is a JSON template: a string that is exactly one ``{placeholder}`` takes the field's
own type (an integer stays an integer), other strings have their placeholders formatted in. The
request body holds ``"{events}"`` once: the list of the request's events, each rendered from the
``event`` template. Placeholders: see :data:`EVENT_FIELDS`.

Sizes, values, identifiers and time rules are checked before a request is made
(billing/destination_rules.py): an event the provider would refuse is refused with its reason,
without a call. The rate is for the billing job to pace requests by.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from meterflow.config_values import Duration

PRESETS_DIR = Path(__file__).resolve().parent / "destination_presets"
# The destination the Stripe sender (connectors/stripe_provider.py, connectors/stripe_stream.py) serves.
STRIPE = "stripe"

# What an event template may name: the delivery's meter event (billing/deliveries.py MeterEvent).
EVENT_FIELDS = {
    "identifier": "the delivery's identifier, fitted to limits.identifier_max_length (billing/destination_rules.py)",
    "event_name": "the meter's event name at the provider",
    "customer": "the provider's customer (or subscription) id, from billing customers",
    "value": "the value, a decimal string that follows limits.values",
    "timestamp_s": "the window start, epoch seconds (an integer)",
    "timestamp_ms": "the window start, epoch milliseconds (an integer)",
    "timestamp_rfc3339": "the window start, RFC 3339 in UTC (2026-01-31T12:00:00Z)",
}
EVENTS = "{events}"
PLACEHOLDER = re.compile(r"\{([a-z_0-9]+)\}")

Correction = Literal["negative_delta", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class ValueLimits(_Strict):
    """What the provider takes as a value."""

    whole_numbers: bool = Field(description="Only whole numbers (billing_rounding carry or a rounding is needed then).")
    max_significant_digits: int | None = Field(None, ge=1, le=100)
    negative: bool = Field(description="Whether a negative value is taken (a correction of a lower final).")


class DestinationLimits(_Strict):
    """A provider's documented limits: the sizes, values, identifiers and time rules are checked before a request is made."""

    max_batch: int = Field(ge=1, le=10_000, description="Events per request.")
    max_event_bytes: int | None = Field(None, ge=64, description="One event's JSON, compact, in bytes.")
    requests_per_second: float = Field(gt=0, description="Requests per second for the whole billing job.")
    events_per_minute: int | None = Field(
        None, ge=1, description="Events per minute the provider takes, if it counts events."
    )
    dedup_horizon: Duration = Field(description="How long the provider deduplicates an identifier.")
    max_age: Duration = Field(description="The oldest event timestamp the provider takes, before now.")
    max_ahead: Duration = Field(description="The furthest event timestamp the provider takes, after now.")
    identifier_max_length: int = Field(ge=16, le=255)
    customer_max_length: int | None = Field(None, ge=1)
    values: ValueLimits
    correction: Correction = Field(
        description="negative_delta: a changed window is corrected by a new event of the difference, negative when its final is lower (values.negative must allow it); none: usage added late is still one more event, but a lower final is recorded as owed."
    )

    @model_validator(mode="after")
    def _pace_within_events_per_minute(self) -> DestinationLimits:
        """Full requests at the declared pace must stay within the events a minute the provider takes."""
        if self.events_per_minute is None:
            return self
        most = self.requests_per_second * 60 * self.max_batch
        if most > self.events_per_minute:
            fits = self.events_per_minute / (60 * self.max_batch)
            msg = (
                f"requests_per_second {self.requests_per_second:g} with max_batch {self.max_batch} sends up to"
                f" {most:,.0f} events a minute; the provider takes {self.events_per_minute:,}: at most {fits:.4g} requests a second"
            )
            raise ValueError(msg)
        return self


class FailedEvents(_Strict):
    """Where a 2xx answer lists the events of the request it refused."""

    list: str = Field(description="The answer's field with the list of refused events.")
    identifier: str = Field(description="The field of an entry naming the event (as the request's identifier field).")
    reason: tuple[str, ...] = Field(description="Fields of an entry that say why, joined.")


class RequestMapping(_Strict):
    """How a request is made from events, and how its answer is read."""

    path: str = Field(pattern=r"^/[A-Za-z0-9/_.~-]*$")
    auth: Literal["bearer", "basic_user"] = Field(
        description="bearer: Authorization: Bearer <key>; basic_user: HTTP Basic with the key as the user, no password."
    )
    body: Any = Field(description=f'The request body, a JSON template holding "{EVENTS}" once.')
    event: dict[str, Any] = Field(description="One event, a JSON template of the fields in EVENT_FIELDS.")
    request_id: str | None = Field(
        None, description="The answer's field that names the request (else its Request-Id header, else none)."
    )
    failed_events: FailedEvents | None = None

    @model_validator(mode="after")
    def _check(self) -> RequestMapping:
        if _count_events_marker(self.body) != 1:
            msg = f'request body must hold "{EVENTS}" exactly once, got {self.body!r}'
            raise ValueError(msg)
        unknown = sorted(_placeholders(self.event) - EVENT_FIELDS.keys())
        if unknown:
            msg = f"event template names {', '.join(unknown)}; it may name {', '.join(EVENT_FIELDS)}"
            raise ValueError(msg)
        if "identifier" not in _placeholders(self.event):
            msg = "event template must carry {identifier}: the provider deduplicates on it"
            raise ValueError(msg)
        if _placeholders(self.body) - {"events"}:
            msg = f"request body may hold no placeholder but {EVENTS}, got {self.body!r}"
            raise ValueError(msg)
        if self.failed_events is not None and self.event.get(self.failed_events.identifier) != "{identifier}":
            msg = (
                f"failed_events names events by {self.failed_events.identifier!r}: the event template's field of that"
                ' name must be exactly "{identifier}", so a failed event is matched to the one sent'
            )
            raise ValueError(msg)
        return self


class Destination(_Strict):
    """One declared destination, its preset applied (:func:`declare`)."""

    name: str
    preset: str
    api_base: str = Field(
        pattern=r"^https?://[^/\s@]+(/\S*)?$",
        description="The provider's base address (https; http only to loopback); the request path follows it.",
    )
    request: RequestMapping
    limits: DestinationLimits

    @model_validator(mode="after")
    def _key_over_tls(self) -> Destination:
        host = self.api_base.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
        if self.api_base.startswith("http://") and host not in {"127.0.0.1", "localhost", "[::1]"}:
            msg = f"destination {self.name}: api_base {self.api_base} is plain http to another host: the API key would travel in clear; use https"
            raise ValueError(msg)
        return self


def _placeholders(template: Any) -> set[str]:
    if isinstance(template, str):
        return set(PLACEHOLDER.findall(template))
    if isinstance(template, dict):
        return set().union(*(_placeholders(v) for v in template.values())) if template else set()
    if isinstance(template, list):
        return set().union(*(_placeholders(v) for v in template)) if template else set()
    return set()


def _count_events_marker(template: Any) -> int:
    if template == EVENTS:
        return 1
    if isinstance(template, dict):
        return sum(_count_events_marker(v) for v in template.values())
    if isinstance(template, list):
        return sum(_count_events_marker(v) for v in template)
    return 0


@cache
def presets() -> dict[str, dict[str, Any]]:
    """The presets shipped with meterflow, by name."""
    found = {}
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            msg = f"{path}: a preset is a mapping"
            raise ValueError(msg)
        found[path.stem] = data
    return found


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, mapping by mapping; any other value replaces (a template's list or string is whole)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def declare(name: str, declaration: dict[str, Any]) -> Destination:
    """A destination from its config entry: ``preset`` (a shipped preset, or ``http`` for none), then the entry's own keys.

    Raises ValueError naming what is wrong (an unknown preset, a key the preset lacks, a template
    naming an unknown field).
    """
    entry = dict(declaration)
    if entry.pop("name", name) != name:
        msg = f"destination {name}: its entry names it {declaration['name']!r}; a destination is named by its key"
        raise ValueError(msg)
    preset = entry.pop("preset", name)
    if preset == "http":
        base: dict[str, Any] = {}
    elif preset in presets():
        base = presets()[preset]
    else:
        msg = f"destination {name}: preset {preset!r} is not one of {', '.join(['http', *presets()])}"
        raise ValueError(msg)
    return Destination.model_validate({"name": name, "preset": preset, **_merged(base, entry)})
