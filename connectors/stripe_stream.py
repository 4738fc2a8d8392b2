"""Stripe's v2 meter event stream: the Provider of billing/delivery.py with up to 100 deliveries per request.

``POST /v2/billing/meter_event_stream`` takes up to 100 events per request under a meter event
session (a token valid 15 minutes, created with the API key). The deliverer still hands over one
delivery at a time, with its retries; a customer's meter takes any number of events at once
(``one_call_per_key`` is False), so only the deliveries of one window take turns. The deliveries of a subtask that are in
flight together are gathered into one request (at most ``stripe.stream_batch_size``, waiting at
most ``stripe.stream_linger`` for more), and each caller gets the request's outcome: accepted with
the request id, or the request's error. ``billing.calls_per_second`` paces the requests, not the
deliveries (:meth:`StripeMeterEventStream.pace_requests`).

Stripe validates the stream's events after it accepted them: a bad event is dropped and reported
later in a ``v1.billing.meter.error_report_triggered`` event, whose sample errors name the request,
not the event. :meth:`StripeMeterEventStream.error_reports` reads them; the retry scan marks every
delivery of a reported request dead with the report (jobs/billing_job.py), which an operator
replays once the cause is fixed: Stripe deduplicates identifiers for 24 h, so the events of that
request it did count are not counted twice.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import stripe

from billing.deliveries import MeterEvent
from connectors.request_batches import RequestBatches, SendsInBatches
from connectors.stripe_provider import StripeMeterEvents, provider_error
from meterflow.config import JobConfig
from meterflow.errors import ProviderError

STREAM_PATH = "/v2/billing/meter_event_stream"
ERROR_REPORT_EVENT = "v1.billing.meter.error_report_triggered"
# A session is renewed this long before Stripe says it expires, so no request carries a token
# that expires on the way.
SESSION_RENEW_MARGIN_S = 60.0
# Pages of events read per meter and poll: the newest reports come first.
MAX_REPORT_PAGES = 20


@functools.lru_cache(maxsize=4096)
def rfc3339(timestamp: int) -> str:
    """Epoch seconds as v2 takes them; cached, since a request's windows share a few window starts."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def stream_event(event: MeterEvent) -> dict[str, Any]:
    """A delivery as one event of a stream request: v2 takes the timestamp as RFC 3339 and the payload as strings."""
    return {
        "event_name": event.event_name,
        "identifier": event.identifier,
        "timestamp": rfc3339(event.timestamp),
        "payload": {"stripe_customer_id": event.provider_customer_id, "value": event.value},
    }


@dataclass(frozen=True)
class Session:
    """A meter event session: its token and when Stripe stops taking it (epoch seconds)."""

    token: str
    expires_at: float

    def usable(self, now: float) -> bool:
        return now < self.expires_at - SESSION_RENEW_MARGIN_S


@dataclass(frozen=True)
class ErrorReport:
    """One sample error of an error report: the request it names, the error code and message."""

    report_id: str
    created: str
    request_id: str
    code: str
    message: str
    error_count: int  # events of this code in the report, of which this is a sample

    def age_s(self, now: float) -> float:
        """Seconds since Stripe created the report (0 when its time can't be read)."""
        try:
            return now - datetime.fromisoformat(self.created).timestamp()
        except ValueError:
            return 0.0

    @property
    def reason(self) -> str:
        return f"Stripe reported {self.code} for events of request {self.request_id} ({self.error_count} in report {self.report_id}): {self.message}"


def error_reports_of(events: list[Any]) -> list[ErrorReport]:
    """The sample errors of error-report events (v2 core events, as dicts or Stripe objects)."""
    reports = []
    for e in events:
        if e.get("type") != ERROR_REPORT_EVENT:
            continue
        reason = (e.get("data") or {}).get("reason") or {}
        for error_type in reason.get("error_types") or []:
            for sample in error_type.get("sample_errors") or []:
                request_id = (sample.get("request") or {}).get("id")
                if request_id:
                    reports.append(
                        ErrorReport(
                            e["id"],
                            str(e.get("created")),
                            request_id,
                            error_type.get("code", ""),
                            sample.get("error_message", ""),
                            int(error_type.get("error_count", 0)),
                        )
                    )
    return reports


class StripeMeterEventStream(SendsInBatches, StripeMeterEvents):
    """Meter events through ``POST /v2/billing/meter_event_stream``; summaries and meters as in v1."""

    # The stream takes events of one customer and meter in any number of requests at once.
    one_call_per_key = False

    def __init__(
        self,
        cfg: JobConfig,
        client: stripe.StripeClient | None = None,
        clock: Callable[[], float] = time.time,
        meter_ids: dict[str, str] | None = None,
    ) -> None:
        super().__init__(cfg, client, meter_ids)
        self._clock = clock
        self._batches: RequestBatches[MeterEvent] = RequestBatches(
            self._post_events, cfg.stripe.stream_batch_size, cfg.stripe.stream_linger.total_seconds()
        )
        self._session: Session | None = None
        self._session_lock = asyncio.Lock()
        self.sessions_created = 0
        self.requests_sent = 0

    async def _post_events(self, events: list[MeterEvent]) -> list[str | ProviderError]:
        """One request: the stream answers for all its events at once (errors come later, in reports)."""
        request_id = await self._post([stream_event(e) for e in events])
        return [request_id] * len(events)

    async def _post(self, events: list[dict[str, Any]]) -> str:
        """One stream request; a session Stripe says expired is renewed and the request sent once more."""
        renewed = False
        while True:
            session = await self._session_for()
            try:
                response = await self.client.raw_request_async(
                    "post", STREAM_PATH, base="meter_events", api_key=session.token, events=events
                )
            except stripe.TemporarySessionExpiredError as e:
                self._drop_session(session)
                if renewed:
                    raise provider_error(e) from e
                renewed = True
            except stripe.StripeError as e:
                raise provider_error(e) from e
            else:
                self.requests_sent += 1
                return response.request_id or f"stream-{self.requests_sent}"

    async def _session_for(self) -> Session:
        async with self._session_lock:
            if self._session is None or not self._session.usable(self._clock()):
                try:
                    created = await self.client.v2.billing.meter_event_session.create_async()
                except stripe.StripeError as e:
                    raise provider_error(e) from e
                expires = datetime.fromisoformat(str(created.expires_at)).timestamp()
                self._session = Session(created.authentication_token, expires)
                self.sessions_created += 1
            return self._session

    def _drop_session(self, session: Session) -> None:
        if self._session is session:
            self._session = None

    async def error_reports(self, event_names: list[str]) -> list[ErrorReport]:
        """Sample errors of the error reports Stripe holds for the meters of ``event_names``."""
        found: list[ErrorReport] = []
        for name in event_names:
            meter = await self.meter_id(name)
            url: str | None = f"/v2/core/events?object_id={meter}"
            for _ in range(MAX_REPORT_PAGES):
                if url is None:
                    break
                try:
                    response = await self.client.raw_request_async("get", url)
                except stripe.StripeError as e:
                    raise provider_error(e) from e
                page = _json(response)
                found += error_reports_of(list(page.get("data") or []))
                url = page.get("next_page_url")
        return found

    async def close(self) -> None:
        await self._batches.close()
        await super().close()


def _json(response: Any) -> dict[str, Any]:
    return json.loads(response.body) if hasattr(response, "body") else dict(response)


def meter_events_provider(cfg: JobConfig) -> StripeMeterEvents:
    """The provider ``stripe.meter_events_api`` names; create it inside the event loop that uses it."""
    return StripeMeterEventStream(cfg) if cfg.stripe.meter_events_api == "v2_stream" else StripeMeterEvents(cfg)
