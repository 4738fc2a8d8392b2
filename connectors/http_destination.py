"""A declared destination's sender (meterflow/destinations.py): the Provider of billing/delivery.py over aiohttp.

One request carries the deliveries in flight together (connectors/request_batches.py), rendered
from the destination's templates (billing/destination_rules.py). Its outcome per delivery:

* 2xx: accepted with the request's id, except the events the answer lists as refused
  (``request.failed_events``), each refused with its own reason, not retried;
* 429, 408, 409 and 5xx, and a connection lost: the whole request may be retried (Retry-After
  kept); the identifiers make a repeat of what did arrive a duplicate the provider drops;
* 400 or 422 to a request of several events: sent again in halves, down to the event refused;
* any other status (3xx included: redirects are not followed, the key stays with the address
  configured): refused, with the answer's message, not retried.

Create it inside the event loop that uses it (the HTTP session belongs to that loop).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp

from billing.deliveries import MeterEvent
from billing.destination_rules import (
    encode,
    event_refusal,
    identifier_field,
    refused_in_answer,
    render_body,
    render_event,
    request_id_in_answer,
)
from billing.retry import RETRYABLE_STATUS
from connectors.request_batches import RequestBatches, SendsInBatches
from meterflow.destinations import Destination
from meterflow.errors import ProviderError

# How much of an error answer a refusal quotes.
MAX_REASON_CHARS = 500
# A request of several events refused as a whole with these is sent again in halves.
SPLIT_ON_STATUS = frozenset({400, 422})


def _retry_after(headers: Any) -> float | None:
    try:
        value = headers.get("Retry-After")
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _message(body: bytes) -> str:
    """An error answer's message: its ``message`` field where it is JSON with one, else its text."""
    text = body.decode(errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text[:MAX_REASON_CHARS]
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])[:MAX_REASON_CHARS]
    return text[:MAX_REASON_CHARS]


class HttpDestination(SendsInBatches):
    """Meter events to a declared destination, many per request."""

    one_call_per_key = False  # a batch API takes events of one customer and meter in any number of requests

    def __init__(
        self,
        destination: Destination,
        api_key: str,
        *,
        linger_s: float = 0.02,
        timeout_s: float = 10.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.destination = destination
        self.name = destination.name
        self._headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {api_key}"
            if destination.request.auth == "bearer"
            else aiohttp.encode_basic_auth(api_key),
        }
        self._url = destination.api_base.rstrip("/") + destination.request.path
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._batches: RequestBatches[MeterEvent] = RequestBatches(self._post, destination.limits.max_batch, linger_s)
        self.requests_sent = 0

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _post(self, events: list[MeterEvent]) -> list[str | ProviderError]:
        """One request with every event the destination takes; the others refused without a call."""
        answers: list[str | ProviderError | None] = [None] * len(events)
        rendered: list[tuple[int, dict[str, Any]]] = []
        now = self._clock()
        for i, event in enumerate(events):
            refused = event_refusal(self.destination, event, now)
            if refused:
                answers[i] = ProviderError(refused, status=None, retryable=False)
            else:
                rendered.append((i, render_event(self.destination, event)))
        if rendered:
            outcome = await self._request([r for _, r in rendered])
            for (i, _), answer in zip(rendered, outcome, strict=True):
                answers[i] = answer
        return [a if a is not None else ProviderError("no answer", status=None, retryable=True) for a in answers]

    async def _request(self, rendered: list[dict[str, Any]]) -> list[str | ProviderError]:
        """One request, or, when the provider refuses a request of several events as a whole (400,
        422: one bad event refuses them all), the same events again in halves, down to the event it
        refuses: nothing of a refused request was recorded, so the resend counts nothing twice."""
        answers = await self._request_once(rendered)
        refused_whole = isinstance(answers[0], ProviderError) and answers[0].status in SPLIT_ON_STATUS
        if len(rendered) > 1 and refused_whole and all(a is answers[0] for a in answers):
            half = len(rendered) // 2
            return [*await self._request(rendered[:half]), *await self._request(rendered[half:])]
        return answers

    async def _request_once(self, rendered: list[dict[str, Any]]) -> list[str | ProviderError]:
        body = encode(render_body(self.destination, rendered))
        try:
            async with self._http().post(
                self._url, data=body, headers=self._headers, allow_redirects=False, timeout=self._timeout
            ) as response:
                payload = await response.read()
                status = response.status
                headers = response.headers
        except (TimeoutError, aiohttp.ClientError) as e:
            # The request may or may not have arrived: a retry repeats the same identifiers. The error's
            # type only: aiohttp's messages can quote the request, and with it the Authorization header.
            error = ProviderError(f"{self.name}: connection failed ({type(e).__name__})", status=None, retryable=True)
            return [error] * len(rendered)
        if status >= 300:
            error = ProviderError(
                f"{self.name} answered {status}: {_message(payload)}",
                status=status,
                retryable=status >= 500 or status in RETRYABLE_STATUS,
                retry_after=_retry_after(headers),
            )
            return [error] * len(rendered)
        try:
            answer = json.loads(payload) if payload.strip() else None
        except ValueError:
            answer = None
        # Without an id from the provider, one of our own: never a counter another worker repeats.
        request_id = request_id_in_answer(self.destination, answer, headers.get("Request-Id")) or (
            f"{self.name}-{uuid.uuid4().hex}"
        )
        refused = refused_in_answer(self.destination, answer)
        if refused is None:
            # The answer lists failed events it does not name: which of these arrived is unknown, and
            # a resend of the same identifiers counts none twice.
            error = ProviderError(
                f"{self.name} listed failed events without naming them", status=status, retryable=True
            )
            return [error] * len(rendered)
        field = identifier_field(self.destination)
        if not refused or field is None:  # a declaration with failed_events has the field (meterflow/destinations.py)
            return [request_id] * len(rendered)
        return [
            ProviderError(
                f"{self.name} refused the event: {refused[str(r.get(field))]}", status=status, retryable=False
            )
            if str(r.get(field)) in refused
            else request_id
            for r in rendered
        ]

    async def total(self, event_name: str, provider_customer_id: str, start: int, end: int) -> Decimal:
        msg = f"{self.name}: reading the provider's totals is not declared for this destination"
        raise ProviderError(msg, status=None, retryable=False)

    async def close(self) -> None:
        await self._batches.close()
        if self._own_session and self._session is not None:
            await self._session.close()
