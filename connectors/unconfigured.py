"""A destination the billing job cannot reach as configured (its API key missing): the Provider of
billing/delivery.py that refuses every event with the reason.

What is routed there is recorded dead with that reason, replayable (``meterflow billing replay``)
once the destination is configured; the other destinations go on. It makes no request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal

from billing.deliveries import MeterEvent
from billing.retry import RateReservations
from meterflow.errors import ProviderError


class UnconfiguredDestination:
    """Refuses every event of destination ``name`` with ``reason``."""

    one_call_per_key = False

    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason

    def _refusal(self) -> ProviderError:
        return ProviderError(self.reason, status=None, retryable=False)

    def pace_requests(self, rate: RateReservations, sleep: Callable[[float], Awaitable[None]]) -> bool:
        """Nothing to pace (no request is made), and its refusals go together."""
        return True

    async def send(self, event: MeterEvent) -> str:
        raise self._refusal()

    async def send_all(self, events: Sequence[MeterEvent]) -> list[str | ProviderError]:
        return [self._refusal() for _ in events]

    async def total(self, event_name: str, provider_customer_id: str, start: int, end: int) -> Decimal:
        raise self._refusal()

    async def close(self) -> None:
        return None
