"""The v2 meter event stream of the fake Stripe (tests/support/fake_stripe.py), with Stripe's rules.

* ``POST /v2/billing/meter_event_session`` (API key) creates a session whose token expires after
  ``session_ttl`` seconds of the fake's clock; ``POST /v2/billing/meter_event_stream`` takes a live
  token only (401 ``temporary_session_expired`` after that) and 1 to 100 events (400 otherwise);
* the fake's scheduled faults apply to stream requests too (a dropped request may have been accepted);
* events are accepted first and validated after: an event with a value that is not a whole number
  (more than 15 significant digits with ``decimals``), a timestamp outside the past 35 days / next 5
  minutes, no customer, or a customer the account does not have (``known_customers``) is not counted and is reported in a ``v1.billing.meter.error_report_triggered``
  event whose sample errors name the request, as Stripe's do; ``GET /v2/core/events?object_id=<meter id>``
  lists them;
* identifiers are deduplicated over 24 h, shared with the v1 endpoint.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.support.fake_stripe import FakeStripe

MAX_EVENTS = 100


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class StreamEndpoints:
    """The fake's ``/v2/`` routes; state lives on the fake (accepted events, dedup, faults, clock)."""

    def __init__(self, fake: FakeStripe) -> None:
        self.fake = fake
        self.sessions: dict[str, float] = {}  # token -> expires at
        self.reports: list[dict[str, Any]] = []
        self.page_size = 20  # events per page of the events list
        self.stream_requests = 0

    # -- POST ------------------------------------------------------------------------------------
    @staticmethod
    def identifiers(path: str, body: bytes) -> list[str]:
        """The identifiers of a stream request's events, as it arrives (none for other requests)."""
        if path.split("?")[0] != "/v2/billing/meter_event_stream":
            return []
        try:
            events = json.loads(body or b"{}").get("events") or []
        except (json.JSONDecodeError, AttributeError):
            return []
        return [str(e.get("identifier", "")) for e in events if isinstance(e, dict)] if isinstance(events, list) else []

    def handle_post(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        path = handler.path.split("?")[0]
        if path == "/v2/billing/meter_event_session":
            return self._create_session(handler)
        if path == "/v2/billing/meter_event_stream":
            return self._stream(handler, body)
        return self._error(handler, 404, "invalid_request_error", f"Unrecognized request URL ({handler.path})")

    def _create_session(self, handler: BaseHTTPRequestHandler) -> None:
        fake = self.fake
        with fake._lock:
            fake._counter += 1
            token = f"mes_tok_fake_{fake._counter}"
            now = fake.clock()
            self.sessions[token] = now + fake.session_ttl
        body = {
            "object": "v2.billing.meter_event_session",
            "id": f"mes_fake_{token[-6:]}",
            "authentication_token": token,
            "created": _iso(now),
            "expires_at": _iso(now + fake.session_ttl),
            "livemode": False,
        }
        fake._answer(handler, 200, body)

    def _stream(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        fake = self.fake
        token = (handler.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        expires = self.sessions.get(token)
        if expires is None:
            return self._error(handler, 401, "authentication_error", "Invalid meter event session token.")
        if fake.clock() >= expires:
            return self._error(
                handler,
                401,
                "temporary_session_expired",
                "The meter event session has expired; create a new one.",
                code="billing_meter_event_session_expired",
            )
        try:
            events = json.loads(body or b"{}").get("events")
        except (json.JSONDecodeError, AttributeError):
            events = None
        if not isinstance(events, list) or not 1 <= len(events) <= MAX_EVENTS:
            return self._error(
                handler, 400, "invalid_request_error", f"events: between 1 and {MAX_EVENTS} events per request"
            )
        identifiers = [str(e.get("identifier", "")) if isinstance(e, dict) else "" for e in events]
        with fake._lock:
            fake._counter += 1
            request_id = f"req_fake_stream_{fake._counter}"
            self.stream_requests += 1
        from tests.support.fake_stripe import FAULT_OUTCOMES, RequestRecord

        fault = fake._next_fault()
        if fault is not None and fault.kind == "status":
            fake.requests.extend(RequestRecord(i, None, f"rejected-{fault.status}") for i in identifiers)
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
            return self._error(handler, fault.status, "api_error", f"injected {fault.status}", headers=headers)
        outcomes = [self._take(e, request_id) for e in events]
        label = FAULT_OUTCOMES[fault.kind] if fault is not None else None
        fake.requests.extend(RequestRecord(i, None, label or o) for i, o in zip(identifiers, outcomes, strict=True))
        return fake._finish(handler, fault, 200, {}, {"Request-Id": request_id})

    def _take(self, event: Any, request_id: str) -> str:
        """Accept one event of a request, then validate it as Stripe does, later: its outcome."""
        fake = self.fake
        problem = self._invalid(event)
        if problem is not None:
            code, message = problem
            name = event.get("event_name", "") if isinstance(event, dict) else ""
            self._report(name, request_id, code, message)
            return f"reported-{code}"
        payload = event["payload"]
        ts = int(datetime.fromisoformat(event["timestamp"]).timestamp())
        form = {
            "identifier": event["identifier"],
            "event_name": event["event_name"],
            "payload[stripe_customer_id]": payload["stripe_customer_id"],
            "payload[value]": payload["value"],
            "timestamp": str(ts),
        }
        _, _, outcome = fake._accept(form, None)
        if outcome != "duplicate":
            with fake._lock:
                fake.accepted[event["identifier"]].request_id = request_id
        return outcome

    def _invalid(self, event: Any) -> tuple[str, str] | None:
        if not isinstance(event, dict) or not event.get("event_name") or not event.get("identifier"):
            return "meter_event_invalid", "event_name and identifier are required"
        payload = event.get("payload") or {}
        if not payload.get("stripe_customer_id"):
            return "meter_event_no_customer_defined", "payload.stripe_customer_id is required"
        if self.fake.known_customers is not None and payload["stripe_customer_id"] not in self.fake.known_customers:
            return "meter_event_customer_not_found", f"no customer {payload['stripe_customer_id']}"
        try:
            value = Decimal(str(payload.get("value")))
        except InvalidOperation:
            return "meter_event_invalid_value", "payload.value must be a number"
        if not value.is_finite():
            return "meter_event_invalid_value", "payload.value must be a number"
        if not self.fake.decimals and value != value.to_integral_value():
            return "meter_event_invalid_value", "payload.value must be a whole number"
        if self.fake.decimals and value and len(value.normalize().as_tuple().digits) > 15:
            return "meter_event_value_too_many_digits", "payload.value has more than 15 significant digits"
        try:
            ts = datetime.fromisoformat(str(event.get("timestamp"))).timestamp()
        except ValueError:
            return "meter_event_invalid_timestamp", "timestamp must be RFC 3339"
        now = self.fake.clock()
        if ts < now - 35 * 86400:
            return "timestamp_too_far_in_past", "timestamp is more than 35 days in the past"
        if ts > now + 300:
            return "timestamp_in_future", "timestamp is more than 5 minutes in the future"
        return None

    def _report(self, event_name: str, request_id: str, code: str, message: str) -> None:
        fake = self.fake
        with fake._lock:
            fake._counter += 1
            now = fake.clock()
            self.reports.append(
                {
                    "id": f"evt_fake_{fake._counter}",
                    "object": "v2.core.event",
                    "type": "v1.billing.meter.error_report_triggered",
                    "created": _iso(now),
                    "related_object": {
                        "id": f"mtr_{event_name}",
                        "type": "billing.meter",
                        "url": f"/v1/billing/meters/mtr_{event_name}",
                    },
                    "data": {
                        "developer_message_summary": f"There is 1 invalid event: {message}",
                        "reason": {
                            "error_count": 1,
                            "error_types": [
                                {
                                    "code": code,
                                    "error_count": 1,
                                    "sample_errors": [
                                        {"error_message": message, "request": {"id": request_id, "idempotency_key": ""}}
                                    ],
                                }
                            ],
                        },
                        "validation_start": _iso(now),
                        "validation_end": _iso(now),
                    },
                }
            )

    # -- GET -------------------------------------------------------------------------------------
    def handle_get(self, handler: BaseHTTPRequestHandler, path: str, params: dict[str, str]) -> None:
        if path != "/v2/core/events":
            return self._error(handler, 404, "invalid_request_error", f"Unrecognized request URL ({handler.path})")
        with self.fake._lock:
            data = [
                r
                for r in reversed(self.reports)
                if "object_id" not in params or r["related_object"]["id"] == params["object_id"]
            ]
        # Newest first, a page at a time, as Stripe lists events.
        page = int(params.get("page", "0"))
        size = self.page_size
        more = (
            f"/v2/core/events?object_id={params.get('object_id', '')}&page={page + 1}"
            if len(data) > (page + 1) * size
            else None
        )
        return self.fake._answer(
            handler,
            200,
            {"data": data[page * size : (page + 1) * size], "next_page_url": more, "previous_page_url": None},
        )

    def _error(
        self,
        handler: BaseHTTPRequestHandler,
        status: int,
        kind: str,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        error = {"type": kind, "message": message, **({"code": code} if code else {})}
        self.fake._answer(handler, status, {"error": error}, headers)
