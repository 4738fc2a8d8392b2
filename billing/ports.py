"""What the deliverer drives (billing/delivery.py): the ledger and the provider, as protocols.

Postgres and Stripe implement them (sinks/ledger_async.py, connectors/stripe_provider.py and
connectors/stripe_stream.py); the unit tests implement them in memory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Protocol

from billing.deliveries import Delivery, LedgerEntry, MeterEvent
from billing.retry import RateReservations
from meterflow.errors import ProviderError


class Ledger(Protocol):
    """The delivery ledger (Postgres in production: sinks/ledger_async.py)."""

    async def claim(self, delivery: Delivery, provider: str, event_name: str, *, retry: bool) -> LedgerEntry:
        """Record the delivery unless it exists; claim it for an attempt if it may be attempted.

        ``claimed`` in the answer says whether it was; the entry is the row's state either way.
        """

    async def delivery(self, identifier: str) -> Delivery | None:
        """A recorded delivery with its window (a retry's input), or None."""

    async def mark_sent(self, identifier: str, event: MeterEvent, response_id: str, attempts: int) -> None: ...

    async def mark_failed(self, identifier: str, attempts: int, error: str, delay: float) -> None: ...

    async def mark_dead(self, identifier: str, attempts: int, reason: str) -> None: ...

    async def mark_rejected(self, identifier: str, reason: str) -> None:
        """Dead without a call (nothing reached the provider)."""

    async def defer(self, identifier: str, until: float) -> None: ...

    async def hold(self, identifier: str, until: float) -> None:
        """Lease a recorded delivery to this worker until ``until`` (it waits in this worker's memory for its key's turn)."""
        ...

    async def record_check(self, identifier: str, decision: str, *, resend: bool) -> None: ...

    async def accepted_total(
        self, identifier: str, provider_customer_id: str, event_name: str, start: int, end: int
    ) -> Decimal:
        """The sum of the values the provider accepted for one customer and event over [start, end), one delivery excluded."""

    async def carry_value(self, identifier: str) -> Decimal:
        """Fix a carried meter's delivery's value, in the order of first attempts (billing/whole_values.py); once fixed, the same value."""

    async def claim_windows(
        self, deliveries: Sequence[Delivery], provider: str, event_names: Sequence[str]
    ) -> list[LedgerEntry]:
        """:meth:`claim` of windows' own deliveries read from the stream (not retries), together."""

    async def carry_values(self, identifiers: Sequence[str]) -> list[Decimal]:
        """:meth:`carry_value` of several deliveries, together (the deliveries of one running total take their units in identifier order)."""

    async def mark_all_sent(self, sent: Sequence[tuple[str, MeterEvent, str, int]]) -> None:
        """:meth:`mark_sent` of several deliveries (identifier, event, response id, attempts), together."""


class Provider(Protocol):
    """A billing provider's meter event API (connectors/stripe_provider.py for Stripe)."""

    name: str

    async def send(self, event: MeterEvent) -> str:
        """Send one meter event; return the provider's response id or raise ProviderError."""

    async def send_all(self, events: Sequence[MeterEvent]) -> list[str | ProviderError]:
        """:meth:`send` of several events at once: each one's response id, or its ProviderError."""

    async def total(self, event_name: str, provider_customer_id: str, start: int, end: int) -> Decimal:
        """The provider's aggregated value of one customer's events over [start, end) (unix s, minute-aligned)."""

    one_call_per_key: bool
    """Whether the provider takes one call at a time per (tenant, customer, meter) (Stripe v1)."""

    def pace_requests(self, rate: RateReservations, sleep: Callable[[float], Awaitable[None]]) -> bool:
        """Whether the provider gathers deliveries into requests and paces those with ``rate`` (one
        slot per request) itself; False: each send is one call, and the deliverer takes a slot per delivery."""
