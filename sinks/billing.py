"""Billing deliveries of closed windows (pure core): what to send, and what each answer leads to.

One closed window is one meter event at the provider. Its identifier is derived from the window,
so every retry, replay or failover re-sends the *same* event and the provider deduplicates it.
The provider, the ledger, the clock, the sleep and the randomness are injected: the Flink
operator, the replay command and the tests drive the same code.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Literal, Protocol

from meterflow.config import JobConfig, MeterConfig
from meterflow.errors import DeliveryRejected, ProviderError
from sinks.idempotency import WindowKey, derive_identifier, format_meter_value, outside_provider_window
from sinks.retry import BackoffPolicy, TokenBucket

DeliveryStatus = Literal["pending", "sent", "failed", "dead"]


@dataclass(frozen=True)
class ClosedWindow:
    """A window that can no longer change, with its final value."""

    tenant_id: str
    customer_id: str
    meter: str
    dimensions_key: str
    window_start_ms: int
    window_end_ms: int
    quantity: Decimal
    event_count: int
    revision: int

    @property
    def key(self) -> WindowKey:
        """The window's identity, from which the identifier is derived."""
        return WindowKey(self.tenant_id, self.customer_id, self.meter, self.dimensions_key, self.window_start_ms)

    @property
    def window_start(self) -> datetime:
        """Window start as an aware UTC datetime."""
        return datetime.fromtimestamp(self.window_start_ms / 1000, UTC)

    @property
    def window_end(self) -> datetime:
        """Window end (exclusive) as an aware UTC datetime."""
        return datetime.fromtimestamp(self.window_end_ms / 1000, UTC)

    @classmethod
    def from_fields(cls, fields: tuple) -> ClosedWindow:
        """From the closed-window stream's row: quantity arrives as an exact decimal string."""
        tenant, customer, meter, dims, start, end, quantity, count, revision = fields
        try:
            exact = Decimal(quantity)
        except InvalidOperation as e:
            msg = f"window quantity {quantity!r} is not a decimal"
            raise DeliveryRejected(msg) from e
        return cls(tenant, customer, meter, dims, int(start), int(end), exact, int(count), int(revision))


@dataclass(frozen=True)
class MeterEvent:
    """What the provider receives for one window."""

    identifier: str
    event_name: str
    provider_customer_id: str
    value: str
    timestamp: int  # unix seconds: the window start, so the usage falls in the period the window began in


@dataclass(frozen=True)
class LedgerEntry:
    """A delivery's state as the ledger holds it."""

    identifier: str
    status: DeliveryStatus
    attempts: int


class Ledger(Protocol):
    """The delivery ledger (Postgres in production: sinks/ledger.py)."""

    def begin(self, window: ClosedWindow, identifier: str, provider: str, event_name: str) -> LedgerEntry:
        """Record the delivery as pending unless it exists; return its current state."""

    def provider_customer(self, tenant_id: str, customer_id: str, provider: str) -> str | None:
        """The provider's customer id for this tenant's customer, or None when unmapped."""

    def mark_sent(self, identifier: str, event: MeterEvent, response_id: str, attempts: int) -> None:
        """The provider accepted the event."""

    def mark_failed(self, identifier: str, attempts: int, error: str) -> None:
        """An attempt failed and will be retried."""

    def mark_dead(self, identifier: str, attempts: int, reason: str) -> None:
        """The delivery gave up: the dead-letter state, with the reason, until replayed."""


class Provider(Protocol):
    """A billing provider's meter event API (sinks/stripe_provider.py for Stripe)."""

    name: str

    def send(self, event: MeterEvent) -> str:
        """Send one meter event; return the provider's response id or raise ProviderError."""


@dataclass(frozen=True)
class Sent:
    identifier: str
    response_id: str
    attempts: int


@dataclass(frozen=True)
class Retry:
    identifier: str
    delay: float
    attempts: int
    error: str


@dataclass(frozen=True)
class Dead:
    identifier: str
    reason: str
    attempts: int


@dataclass(frozen=True)
class Skipped:
    """The ledger already holds a final outcome for this window (a replay after a failover)."""

    identifier: str
    status: DeliveryStatus


Outcome = Sent | Retry | Dead | Skipped


def build_meter_event(window: ClosedWindow, identifier: str, meter: MeterConfig | None, provider_customer_id: str | None, now: datetime, max_age: timedelta, max_ahead: timedelta) -> MeterEvent:
    """The provider's meter event for a window, or DeliveryRejected with the reason it must not be sent."""
    if meter is None:
        msg = f"meter {window.meter!r} is not configured for billing"
        raise DeliveryRejected(msg)
    if provider_customer_id is None:
        msg = f"no billing customer mapped for tenant {window.tenant_id!r}, customer {window.customer_id!r}"
        raise DeliveryRejected(msg)
    refused = outside_provider_window(window.window_start, now, max_age, max_ahead)
    if refused:
        raise DeliveryRejected(refused)
    try:
        value = format_meter_value(window.quantity, meter.billing_rounding)
    except ValueError as e:
        raise DeliveryRejected(str(e)) from e
    return MeterEvent(identifier, meter.event_name, provider_customer_id, value, window.window_start_ms // 1000)


class Deliverer:
    """Delivers closed windows through a provider, recording every step in the ledger."""

    def __init__(
        self,
        cfg: JobConfig,
        provider: Provider,
        ledger: Ledger,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        rng: Callable[[], float] = random.random,
        share: int = 1,
    ) -> None:
        """``share``: how many deliverers split the configured rate (the job's parallelism)."""
        self.provider, self.ledger, self.clock, self.sleep, self.rng = provider, ledger, clock, sleep, rng
        self.meters: Mapping[str, MeterConfig] = {m.name: m for m in cfg.meters}
        billing = cfg.billing
        self.prefix = billing.identifier_prefix
        self.max_age, self.max_ahead = billing.max_window_age, billing.max_window_ahead
        self.policy = BackoffPolicy(billing.max_attempts, billing.initial_backoff.total_seconds(), billing.max_backoff.total_seconds())
        rate = billing.calls_per_second / max(share, 1)
        self.bucket = TokenBucket(rate=rate, capacity=max(1.0, rate), clock=clock)

    def identifier(self, window: ClosedWindow) -> str:
        """The window's deterministic identifier (also the idempotency key)."""
        return derive_identifier(window.key, self.prefix)

    def attempt(self, window: ClosedWindow, attempt: int = 1, *, replay: bool = False) -> Outcome:
        """One attempt (numbered from 1 in this round) to deliver a window.

        A window the ledger already has as sent is skipped; one it has as dead is skipped unless
        ``replay`` (the replay command, after the cause was fixed).
        """
        identifier = self.identifier(window)
        meter = self.meters.get(window.meter)
        event_name = meter.event_name if meter else window.meter
        entry = self.ledger.begin(window, identifier, self.provider.name, event_name)
        if entry.status == "sent" or (entry.status == "dead" and not replay):
            return Skipped(identifier, entry.status)
        total_attempts = entry.attempts + 1
        try:
            customer = self.ledger.provider_customer(window.tenant_id, window.customer_id, self.provider.name)
            now = datetime.fromtimestamp(self.clock(), UTC)
            event = build_meter_event(window, identifier, meter, customer, now, self.max_age, self.max_ahead)
        except DeliveryRejected as e:
            self.ledger.mark_dead(identifier, entry.attempts, str(e))
            return Dead(identifier, str(e), entry.attempts)
        self._wait_for_rate_limit()
        try:
            response_id = self.provider.send(event)
        except ProviderError as e:
            return self._failed(identifier, attempt, total_attempts, e)
        self.ledger.mark_sent(identifier, event, response_id, total_attempts)
        return Sent(identifier, response_id, total_attempts)

    def deliver(self, window: ClosedWindow, *, replay: bool = False) -> Outcome:
        """Attempt until sent, dead or skipped, sleeping between attempts (the replay command's loop)."""
        attempt = 1
        while True:
            outcome = self.attempt(window, attempt, replay=replay)
            if not isinstance(outcome, Retry):
                return outcome
            self.sleep(outcome.delay)
            attempt += 1

    def _failed(self, identifier: str, attempt: int, total_attempts: int, error: ProviderError) -> Outcome:
        described = f"{error.status or 'no response'}: {error}"
        delay = self.policy.next_delay(attempt, error.retry_after, self.rng) if error.retryable else None
        if delay is None:
            reason = f"gave up after {attempt} attempts: {described}" if error.retryable else f"provider refused the event: {described}"
            self.ledger.mark_dead(identifier, total_attempts, reason)
            return Dead(identifier, reason, total_attempts)
        self.ledger.mark_failed(identifier, total_attempts, described)
        return Retry(identifier, delay, total_attempts, described)

    def _wait_for_rate_limit(self) -> None:
        wait = self.bucket.wait_time()
        while wait > 0:
            self.sleep(wait)
            wait = self.bucket.wait_time()


@dataclass(frozen=True)
class CustomerMapping:
    """One row of a customer mapping import: a tenant's customer and the provider's customer id."""

    tenant_id: str
    customer_id: str
    provider_customer_id: str


def parse_customer_csv(text: str) -> tuple[list[CustomerMapping], list[str]]:
    """Parse ``tenant_id,customer_id,provider_customer_id`` CSV (header required); bad rows come back as reasons."""
    import csv
    import io

    reader = csv.DictReader(io.StringIO(text))
    wanted = ("tenant_id", "customer_id", "provider_customer_id")
    missing = [c for c in wanted if c not in (reader.fieldnames or [])]
    if missing:
        return [], [f"header must name {', '.join(wanted)}; missing {', '.join(missing)}"]
    mappings, problems, seen = [], [], {}
    for line, row in enumerate(reader, start=2):
        values = [(row.get(c) or "").strip() for c in wanted]
        if not all(values):
            problems.append(f"line {line}: every column needs a value")
            continue
        mapping = CustomerMapping(*values)
        key = (mapping.tenant_id, mapping.customer_id)
        if key in seen and seen[key] != mapping.provider_customer_id:
            problems.append(f"line {line}: {key[0]}/{key[1]} is mapped twice, to {seen[key]} and {mapping.provider_customer_id}")
            continue
        seen[key] = mapping.provider_customer_id
        mappings.append(mapping)
    return mappings, problems
