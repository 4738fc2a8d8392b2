"""Stripe meter events through the official SDK (asyncio, aiohttp): the Provider of billing/delivery.py.

The SDK's own retries are off: retry, backoff and dead-lettering are the deliverer's policy, which
counts attempts in the ledger. The identifier doubles as the Idempotency-Key, so a resend of the
same delivery replays Stripe's first answer instead of creating a second event. Create the
provider inside the event loop that uses it (the HTTP session belongs to that loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING

import stripe
from stripe.params.billing import MeterEventCreateParams, MeterEventSummaryListParams

from billing.deliveries import MeterEvent
from billing.retry import RETRYABLE_STATUS, RateReservations
from meterflow.config import JobConfig
from meterflow.errors import ConfigError, ProviderError

if TYPE_CHECKING:
    from stripe._base_address import BaseAddresses  # the type StripeClient takes; not exported


NO_KEY = "billing is enabled but there is no Stripe API key: set METERFLOW_STRIPE_API_KEY or put it in the secrets file"


def _retry_after(headers: object) -> float | None:
    """Seconds from a Retry-After header (any mapping of headers), or None."""
    if not hasattr(headers, "items"):
        return None
    value = next((v for k, v in headers.items() if str(k).lower() == "retry-after"), None)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def provider_error(e: stripe.StripeError) -> ProviderError:
    """The deliverer's view of an SDK error: its status, and whether another attempt may succeed."""
    if isinstance(
        e, stripe.APIConnectionError
    ):  # timeouts and dropped connections: the event may or may not have arrived
        return ProviderError(f"connection failed: {e.user_message or e}", status=None, retryable=True)
    status = e.http_status
    retryable = status is None or status in RETRYABLE_STATUS
    return ProviderError(
        e.user_message or str(e), status=status, retryable=retryable, retry_after=_retry_after(e.headers)
    )


class StripeMeterEvents:
    """``POST /v1/billing/meter_events`` and the meter event summaries, with the official ``stripe`` SDK."""

    name = "stripe"
    one_call_per_key = True  # Stripe v1: one concurrent call per customer and meter

    def __init__(
        self, cfg: JobConfig, client: stripe.StripeClient | None = None, meter_ids: dict[str, str] | None = None
    ) -> None:
        """``meter_ids``: a cache of meter ids by event name to share with other instances (filled on first use)."""
        self._http: stripe.HTTPClient | None = None
        if client is None:
            if cfg.stripe.api_key is None:
                raise ConfigError(NO_KEY)
            self._http = stripe.AIOHTTPClient(timeout=cfg.billing.request_timeout.total_seconds())
            bases: BaseAddresses = {}
            if cfg.stripe.api_base:
                bases["api"] = cfg.stripe.api_base
            if cfg.stripe.meter_events_base:
                bases["meter_events"] = cfg.stripe.meter_events_base
            client = stripe.StripeClient(
                cfg.stripe.api_key.get_secret_value(),
                base_addresses=bases or None,
                max_network_retries=0,
                http_client=self._http,
            )
        self.client = client
        self._meter_ids: dict[str, str] = meter_ids if meter_ids is not None else {}

    def pace_requests(self, rate: RateReservations, sleep: Callable[[float], Awaitable[None]]) -> bool:
        """One call per delivery (v1): the deliverer paces each."""
        return False

    async def send(self, event: MeterEvent) -> str:
        params: MeterEventCreateParams = {
            "event_name": event.event_name,
            "identifier": event.identifier,
            "timestamp": event.timestamp,
            "payload": {"stripe_customer_id": event.provider_customer_id, "value": event.value},
        }
        try:
            created = await self.client.v1.billing.meter_events.create_async(
                params, options={"idempotency_key": event.identifier}
            )
        except stripe.StripeError as e:
            raise provider_error(e) from e
        response = created.last_response
        return (response.request_id if response is not None else None) or created.identifier

    async def send_all(self, events: Sequence[MeterEvent]) -> list[str | ProviderError]:
        """Each event in its own call, all at once."""
        return await asyncio.gather(*(self._answer_of(e) for e in events))

    async def _answer_of(self, event: MeterEvent) -> str | ProviderError:
        try:
            return await self.send(event)
        except ProviderError as e:
            return e

    async def meter_id(self, event_name: str) -> str:
        """The id of the Stripe meter that aggregates ``event_name`` (listed once, then cached)."""
        if event_name not in self._meter_ids:
            try:
                meters = await self.client.v1.billing.meters.list_async({"limit": 100})
                async for meter in meters.auto_paging_iter():
                    self._meter_ids[meter.event_name] = meter.id
            except stripe.StripeError as e:
                raise provider_error(e) from e
        if event_name not in self._meter_ids:
            msg = f"no Stripe meter has event_name {event_name!r}: create it in the dashboard"
            raise ProviderError(msg, status=None, retryable=False)
        return self._meter_ids[event_name]

    async def total(self, event_name: str, provider_customer_id: str, start: int, end: int) -> Decimal:
        """The meter's aggregated value for one customer over [start, end) (unix s on minute boundaries)."""
        meter = await self.meter_id(event_name)
        params: MeterEventSummaryListParams = {"customer": provider_customer_id, "start_time": start, "end_time": end}
        try:
            summaries = await self.client.v1.billing.meters.event_summaries.list_async(meter, params)
        except stripe.StripeError as e:
            raise provider_error(e) from e
        # The API reports a JSON number; its shortest repr is the decimal it was written as.
        return sum((Decimal(repr(s.aggregated_value)) for s in summaries.data), Decimal(0))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close_async()
