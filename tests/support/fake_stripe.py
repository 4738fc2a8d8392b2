"""A fault-injecting fake of Stripe's meter events endpoint, owned by this project's tests.

stripe-mock validates requests against Stripe's API specification but is stateless: it neither
deduplicates identifiers nor rate-limits. This fake is a real HTTP server on loopback that keeps
state the way the billing tests need it:

* identifiers are deduplicated over 24 h; a repeated Idempotency-Key replays the first answer
  (``Idempotent-Replayed: true``) for 24 h, as Stripe does; the clock is injectable, so a test can
  move the fake a day ahead instead of waiting;
* meters (``GET /v1/billing/meters``, one per event name seen or configured) and their event
  summaries (``GET /v1/billing/meters/{id}/event_summaries``) answered from the accepted events;
* ``latency``: every answer waits this long (a slow but healthy endpoint, for benchmarks);
* scheduled faults: 429 with Retry-After, 5xx, slow answers (accepted, answered after the
  client gave up), dropped connections (accepted, no answer) and held requests (accepted, no
  answer until released: "between the API call and the checkpoint");
* timestamps outside the past 35 days / next 5 minutes are refused with 400, like Stripe;
* values that are not whole numbers are refused with 400, like Stripe's default account
  (``decimals=True``: an account with decimals enabled, which refuses more than 15 significant digits);
* the v2 meter event stream and its sessions, validated after acceptance with error reports
  (tests/support/fake_stripe_stream.py).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

from tests.support.fake_stripe_stream import StreamEndpoints
from tests.support.faults import DROP, FAULT_OUTCOMES, HOLD, PASS, SLOW, Fault, FaultInjection, reject

__all__ = ["DROP", "FAULT_OUTCOMES", "HOLD", "PASS", "SLOW", "Fault", "FakeStripe", "reject"]

DEDUP_WINDOW_S = 24 * 3600


@dataclass
class AcceptedEvent:
    identifier: str
    idempotency_key: str | None
    event_name: str
    customer: str
    value: Decimal
    timestamp: int
    accepted_at: float
    request_id: str


@dataclass
class RequestRecord:
    identifier: str | None
    idempotency_key: str | None
    outcome: str  # accepted | replayed | duplicate | rejected-<status> | invalid | slow | dropped | held


@dataclass
class FakeStripe(FaultInjection):
    """The fake server; ``start()`` binds a free loopback port, ``url`` is its base address."""

    latency: float = 0.0
    event_names: tuple[str, ...] = ("api_calls", "tokens")
    decimals: bool = False  # an account with decimal meter values enabled (Stripe: on request)
    session_ttl: float = 900.0  # seconds a v2 meter event session lives (Stripe: 15 minutes)
    known_customers: set[str] | None = None  # the account's customers, when the v2 stream should check them
    accepted: dict[str, AcceptedEvent] = field(default_factory=dict)
    events: list[AcceptedEvent] = field(
        default_factory=list
    )  # every accepted event, a second one under a forgotten identifier too
    requests: list[RequestRecord] = field(default_factory=list)
    _by_key: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    _key_seen: dict[str, float] = field(default_factory=dict)
    client_disconnects: int = 0
    meter_lists: int = 0  # GET /v1/billing/meters answered
    arrivals: list[str] = field(default_factory=list)  # identifiers of meter event requests as they arrive
    _counter: int = 0
    _stream: StreamEndpoints | None = None

    @property
    def stream(self) -> StreamEndpoints:
        """The v2 routes: sessions, the meter event stream, error reports."""
        if self._stream is None:
            self._stream = StreamEndpoints(self)
        return self._stream

    # -- control -------------------------------------------------------------------------------
    def unanswered(self) -> set[str]:
        """Identifiers of requests that arrived and have no outcome yet (in flight)."""
        with self._lock:
            arrived = set(self.arrivals)
        return arrived - {r.identifier for r in self.requests}

    def attempts_for(self, identifier: str) -> int:
        return sum(1 for r in self.requests if r.identifier == identifier)

    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.requests:
            counts[r.outcome] = counts.get(r.outcome, 0) + 1
        return counts

    # -- server --------------------------------------------------------------------------------
    def start(self, port: int = 0) -> FakeStripe:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/v2/"):
                    arrived = fake.stream.identifiers(self.path, body)
                else:
                    arrived = [parse_qs(body.decode()).get("identifier", [""])[0]]
                with fake._lock:
                    fake.arrivals.extend(arrived)
                fake._handle_in_flight(fake.latency, lambda: fake._handle(self, body))

            def do_GET(self) -> None:
                if fake.latency:
                    time.sleep(fake.latency)
                fake._handle_get(self)

        class Server(ThreadingHTTPServer):
            # Clients open many connections at once (2 x 64 calls in flight in the benchmark); the
            # default accept backlog of 5 drops their SYNs, which the kernel retries after 1 s, 3 s, ...
            request_queue_size = 1024

            def handle_error(self, request: object, client_address: object) -> None:
                # A client that gave up on a slow answer closes its end: expected, counted, not noise.
                import sys

                if isinstance(sys.exc_info()[1], ConnectionError):
                    fake.client_disconnects += 1
                else:
                    super().handle_error(request, client_address)

        self._serve(Handler, port, "fake-stripe", Server)
        return self

    # -- behaviour -----------------------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        if handler.path.startswith("/v2/"):
            return self.stream.handle_post(handler, body)
        if handler.path.split("?")[0] != "/v1/billing/meter_events":
            return self._answer(
                handler,
                404,
                {"error": {"type": "invalid_request_error", "message": f"Unrecognized request URL ({handler.path})"}},
            )
        form = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        identifier, key = form.get("identifier"), handler.headers.get("Idempotency-Key")
        fault = self._next_fault()
        if fault is not None and fault.kind == "status":
            self.requests.append(RequestRecord(identifier, key, f"rejected-{fault.status}"))
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
            return self._answer(
                handler, fault.status, {"error": {"type": "api_error", "message": f"injected {fault.status}"}}, headers
            )
        problem = self._invalid(form)
        if problem:
            self.requests.append(RequestRecord(identifier, key, "invalid"))
            return self._answer(handler, 400, {"error": {"type": "invalid_request_error", "message": problem}})
        status, response, outcome = self._accept(form, key)
        self.requests.append(RequestRecord(identifier, key, outcome if fault is None else FAULT_OUTCOMES[fault.kind]))
        return self._finish(
            handler, fault, status, response, {"Idempotent-Replayed": "true"} if outcome == "replayed" else {}
        )

    def _handle_get(self, handler: BaseHTTPRequestHandler) -> None:
        path, _, query = handler.path.partition("?")
        params = {k: v[0] for k, v in parse_qs(query).items()}
        if path.startswith("/v2/"):
            return self.stream.handle_get(handler, path, params)
        if path == "/v1/billing/meters":
            with self._lock:
                self.meter_lists += 1
                names = sorted(set(self.event_names) | {e.event_name for e in self.events})
            meters = [
                {"object": "billing.meter", "id": f"mtr_{n}", "event_name": n, "status": "active", "livemode": False}
                for n in names
            ]
            return self._answer(handler, 200, {"object": "list", "url": path, "has_more": False, "data": meters})
        parts = path.strip("/").split("/")
        if len(parts) == 5 and parts[:3] == ["v1", "billing", "meters"] and parts[4] == "event_summaries":
            missing = [p for p in ("customer", "start_time", "end_time") if p not in params]
            if missing:
                return self._answer(
                    handler,
                    400,
                    {"error": {"type": "invalid_request_error", "message": f"Missing required param: {missing[0]}."}},
                )
            start, end = int(params["start_time"]), int(params["end_time"])
            if start % 60 or end % 60:
                return self._answer(
                    handler,
                    400,
                    {
                        "error": {
                            "type": "invalid_request_error",
                            "message": "start_time and end_time must be aligned with minute boundaries",
                        }
                    },
                )
            total = self.total(parts[3].removeprefix("mtr_"), params["customer"], start, end)
            summary = {
                "object": "billing.meter_event_summary",
                "id": f"mtrusg_{start}",
                "aggregated_value": float(total),
                "start_time": start,
                "end_time": end,
                "meter": parts[3],
                "livemode": False,
            }
            return self._answer(handler, 200, {"object": "list", "url": path, "has_more": False, "data": [summary]})
        return self._answer(
            handler,
            404,
            {"error": {"type": "invalid_request_error", "message": f"Unrecognized request URL ({handler.path})"}},
        )

    def total(self, event_name: str, customer: str, start: int, end: int) -> Decimal:
        """Sum of the accepted events' values of one customer and event name with a timestamp in [start, end)."""
        with self._lock:
            return sum(
                (
                    e.value
                    for e in self.events
                    if e.event_name == event_name and e.customer == customer and start <= e.timestamp < end
                ),
                Decimal(0),
            )

    def _invalid(self, form: dict[str, str]) -> str | None:
        for required in ("event_name", "payload[stripe_customer_id]", "payload[value]"):
            if not form.get(required):
                return f"Missing required param: {required}."
        if len(form.get("identifier", "")) > 100:
            return "identifier: must be at most 100 characters"
        try:
            value = Decimal(form["payload[value]"])
        except InvalidOperation:
            return "payload[value]: must be a number"
        if not value.is_finite():
            return "payload[value]: must be a number"
        # Stripe: whole numbers only, unless the account has decimals enabled; then at most 15
        # significant digits (API version 2026-04-22).
        if not self.decimals and value != value.to_integral_value():
            return "payload[value]: must be a whole number"
        if self.decimals and value and len(value.normalize().as_tuple().digits) > 15:
            return "payload[value]: meter_event_value_too_many_digits"
        if "timestamp" in form:
            try:
                ts = int(form["timestamp"])
            except ValueError:
                return "timestamp: must be an integer"
            now = self.clock()
            if ts < now - 35 * 86400 or ts > now + 300:
                return "timestamp: must be within the past 35 calendar days or up to 5 minutes in the future"
        return None

    def _accept(self, form: dict[str, str], key: str | None) -> tuple[int, dict, str]:
        """Store or replay; returns (status, body, outcome)."""
        canonical = json.dumps(form, sort_keys=True).encode()
        with self._lock:
            now = self.clock()
            if key is not None and key in self._by_key and now - self._key_seen[key] < DEDUP_WINDOW_S:
                first_form, first_response = self._by_key[key]
                if first_form != canonical:
                    return (
                        400,
                        {
                            "error": {
                                "type": "idempotency_error",
                                "message": "Keys for idempotent requests can only be used with the same parameters they were first used with.",
                            }
                        },
                        "idempotency-error",
                    )
                return 200, json.loads(first_response), "replayed"
            identifier = form.get("identifier") or f"gen-{self._counter}"
            self._counter += 1
            request_id = f"req_fake_{self._counter}"
            previous = self.accepted.get(identifier)
            outcome = (
                "duplicate" if previous is not None and now - previous.accepted_at < DEDUP_WINDOW_S else "accepted"
            )
            ts = int(form.get("timestamp") or now)
            if outcome == "accepted":
                event = AcceptedEvent(
                    identifier,
                    key,
                    form["event_name"],
                    form["payload[stripe_customer_id]"],
                    Decimal(form["payload[value]"]),
                    ts,
                    now,
                    request_id,
                )
                if previous is not None:
                    outcome = "accepted-again"  # the identifier was forgotten: billed twice
                self.accepted[identifier] = event
                self.events.append(event)
            response = {
                "object": "billing.meter_event",
                "created": int(now),
                "event_name": form["event_name"],
                "identifier": identifier,
                "livemode": False,
                "payload": {"stripe_customer_id": form["payload[stripe_customer_id]"], "value": form["payload[value]"]},
                "timestamp": ts,
            }
            if key is not None:
                self._by_key[key] = (canonical, json.dumps(response).encode())
                self._key_seen[key] = now
            return 200, response, outcome

    def _answer(
        self, handler: BaseHTTPRequestHandler, status: int, body: dict, headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        with self._lock:
            self._counter += 1
            request_id = f"req_fake_{self._counter}"
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        if "Request-Id" not in (headers or {}):
            handler.send_header("Request-Id", request_id)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)


def main() -> None:
    """Run the fake on its own (benchmarks): ``python -m tests.support.fake_stripe --port P --latency 0.05``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds every answer waits")
    parser.add_argument(
        "--fail-status", type=int, default=None, help="answer every meter event with this status (e.g. 503)"
    )
    parser.add_argument("--retry-after", type=float, default=None, help="Retry-After of those failures, seconds")
    args = parser.parse_args()
    fake = FakeStripe(latency=args.latency)
    fake.start(port=args.port)
    if args.fail_status:
        fake.fail_for(10**9, status=args.fail_status, retry_after=args.retry_after)
    print(fake.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
