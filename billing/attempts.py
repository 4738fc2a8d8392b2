"""One attempt of a delivery (the deliverer's core; billing/delivery.py drives it): whether it may
be sent now, its value, the call or the provider check before it, and the outcome recorded.

Rules (billing/delivery.py has the whole list): a failure never waits here, it is scheduled in
the ledger; each call takes a slot of the shared rate; past the provider's dedup window the
provider's totals are read before any resend.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import NamedTuple, TypeVar, cast

from billing.deliveries import (
    ClosedWindow,
    Dead,
    Deferred,
    Delivery,
    DeliveryLimits,
    LedgerEntry,
    MeterEvent,
    Outcome,
    ProviderTotals,
    Retry,
    Sent,
    Skipped,
    beyond_dedup_window,
    build_meter_event,
    delivery_refusal,
    judge_provider_totals,
    summary_range,
)
from billing.key_gate import KeyGate
from billing.ports import Ledger, Provider
from billing.retry import BackoffPolicy, RateReservations
from meterflow.config import JobConfig, MeterConfig
from meterflow.errors import DeliveryRejected, ProviderError

T = TypeVar("T")


class Cleared(NamedTuple):
    """A claimed delivery that may go to the provider now: its meter and the customer's id there."""

    meter: MeterConfig
    customer: str


class Attempts:
    """A deliverer's state and its single attempts; :class:`billing.delivery.Deliverer` adds the entry points, the batched path and parking."""

    def __init__(
        self,
        cfg: JobConfig,
        provider: Provider,
        ledger: Ledger,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        rng: Callable[[], float] = random.random,
        share: int = 1,
        limits: DeliveryLimits | None = None,
        owed: Callable[[Delivery, datetime], str | None] = lambda delivery, at: None,
    ) -> None:
        """``share``: how many deliverers split the configured rate (the billing job's parallelism).
        ``limits``: the destination's (billing/routing.py delivery_limits); Stripe's ``billing.*`` by
        default. ``owed``: why a correction is owed rather than sent (billing/routing.py owed_correction)."""
        self.provider, self.ledger, self.clock, self.sleep, self.rng = provider, ledger, clock, sleep, rng
        self.meters: Mapping[str, MeterConfig] = {m.name: m for m in cfg.meters}
        billing = cfg.billing
        self.prefix = billing.identifier_prefix
        limits = limits or DeliveryLimits(
            billing.max_window_age, billing.max_window_ahead, billing.provider_dedup_window, billing.calls_per_second
        )
        self.max_age, self.max_ahead, self.dedup_window = limits.max_age, limits.max_ahead, limits.dedup_window
        self.owed = owed
        self.policy = BackoffPolicy(
            billing.max_attempts, billing.initial_backoff.total_seconds(), billing.max_backoff.total_seconds()
        )
        rate = limits.calls_per_second / max(share, 1)
        self.rate = RateReservations(rate=rate, capacity=max(1.0, rate / 10), clock=clock)
        # A provider that gathers deliveries into requests (the v2 stream) paces its requests with
        # this subtask's share, since its calls are the requests; otherwise each delivery is a call.
        self.paced_by_provider = provider.pace_requests(self.rate, sleep)
        self.one_call_per_key = provider.one_call_per_key
        self.gate = KeyGate()
        self.max_held_per_key = billing.max_held_per_key
        self.lease_s = billing.retry_lease.total_seconds()
        # Seconds per provider call, a moving average: when a parked delivery's turn should come.
        self.pace = 0.1
        # Parked deliveries wait for their key's turn here, outside the operator's in-flight slots;
        # at most max_in_flight of them call the provider at once.
        self.parked: set[asyncio.Future] = set()
        self.parked_ids: set[str] = set()  # one waiting attempt per delivery, however often it is handed out
        self.parked_calls = asyncio.Semaphore(cfg.billing_max_in_flight)
        self.on_background_outcome: Callable[[Outcome], None] = lambda outcome: None

    @property
    def delivers_together(self) -> bool:
        """Whether :meth:`on_windows` delivers a stream's windows together (else one by one)."""
        return not self.one_call_per_key and self.paced_by_provider

    @staticmethod
    def key(window: ClosedWindow) -> tuple[str, str, str]:
        """The provider's concurrency unit: one customer's meter (the job's key_by)."""
        return (window.tenant_id, window.customer_id, window.meter)

    def turn(self, window: ClosedWindow) -> Hashable:
        """What takes turns (module docstring): the provider's key, or else the window itself."""
        return self.key(window) if self.one_call_per_key else window.key

    def event_name(self, window: ClosedWindow) -> str:
        meter = self.meters.get(window.meter)
        return meter.event_name if meter else window.meter

    @staticmethod
    def _not_claimed(delivery: Delivery, entry: LedgerEntry) -> Outcome:
        return Skipped(delivery.identifier, entry.status if entry.status in ("sent", "dead") else "scheduled")

    # -- one attempt ---------------------------------------------------------------------------
    async def _attempt(self, delivery: Delivery, entry: LedgerEntry, *, replay: bool = False) -> Outcome:
        if entry.status == "dead" and replay:
            entry = await self._revive(delivery, entry)
        now = self.clock()
        verdict = self._cleared(delivery, entry, now)
        if not isinstance(verdict, Cleared):
            return await self._without_call(delivery, entry, verdict)
        try:
            carried = None
            if verdict.meter.billing_rounding == "carry":
                # Fixed once, when first attempted: every retry and replay sends the same value.
                carried = (
                    Decimal(entry.value)
                    if entry.value is not None
                    else await self.ledger.carry_value(delivery.identifier)
                )
            event = build_meter_event(delivery, verdict.meter, verdict.customer, carried)
        except DeliveryRejected as e:
            return await self._rejected(delivery.identifier, entry, str(e))
        return await self._send_or_check(delivery, entry, event, now)

    def _cleared(self, delivery: Delivery, entry: LedgerEntry, now: float) -> Cleared | Outcome | str:
        """Whether a claimed delivery may go to the provider now: its meter and customer if so; else the outcome
        without a call (not claimed: Skipped; its key backing off: Deferred) or why it is refused."""
        if not entry.claimed:
            return self._not_claimed(delivery, entry)
        until = self.gate.backing_off(self.key(delivery.window), now)
        if until is not None:
            return Deferred(delivery.identifier, until)
        meter = self.meters.get(delivery.window.meter)
        at = datetime.fromtimestamp(now, UTC)
        refused = self.owed(delivery, at) or delivery_refusal(
            delivery, meter, entry.provider_customer_id, at, self.max_age, self.max_ahead
        )
        if refused or meter is None or entry.provider_customer_id is None:
            return refused or "no meter or customer"
        return Cleared(meter, entry.provider_customer_id)

    async def _without_call(self, delivery: Delivery, entry: LedgerEntry, verdict: Outcome | str) -> Outcome:
        """Record a verdict of :meth:`_cleared` that is not a call."""
        if isinstance(verdict, str):
            return await self._rejected(delivery.identifier, entry, verdict)
        if isinstance(verdict, Deferred):
            await self.ledger.defer(delivery.identifier, verdict.until)
        return verdict

    async def _rejected(self, identifier: str, entry: LedgerEntry, reason: str) -> Outcome:
        await self.ledger.mark_rejected(identifier, reason)
        return Dead(identifier, reason, entry.attempts)

    async def _send_or_check(self, delivery: Delivery, entry: LedgerEntry, event: MeterEvent, now: float) -> Outcome:
        key = self.key(delivery.window)
        if not beyond_dedup_window(entry.first_attempt_at, now, self.dedup_window):
            return await self._send(key, entry, event)
        if self.one_call_per_key:  # the key's turn is held: nothing of the key is in flight
            return await self._check_then_send(delivery, entry, event)
        # The provider's total covers the key's other calls too: hold them off, and wait for those under way.
        async with self.gate.lock(key):
            await self.gate.drained(key)
            return await self._check_then_send(delivery, entry, event)

    async def _check_then_send(self, delivery: Delivery, entry: LedgerEntry, event: MeterEvent) -> Outcome:
        """With the key held (its turn, or its lock once its calls are drained): ask, then send if absent."""
        checked = await self._check_provider(delivery, entry, event)
        return checked if checked is not None else await self._call(self.key(delivery.window), entry, event)

    async def _send(self, key: tuple, entry: LedgerEntry, event: MeterEvent) -> Outcome:
        """One call, its outcome recorded before a check of the key's totals may read the ledger."""
        if self.one_call_per_key:
            return await self._call(key, entry, event)
        async with self.gate.call(key):
            return await self._call(key, entry, event)

    async def _call(self, key: tuple, entry: LedgerEntry, event: MeterEvent) -> Outcome:
        identifier = event.identifier
        total_attempts = entry.attempts + 1
        wait = 0.0 if self.paced_by_provider else self.rate.reserve()
        if wait > 0:
            await self.sleep(wait)
        started = self.clock()
        try:
            response_id = await self.provider.send(event)
        except ProviderError as e:
            return await self._failed(key, identifier, total_attempts, e)
        self.pace = 0.8 * self.pace + 0.2 * max(self.clock() - started, 0.001)
        self.gate.recovered(key)
        await self.ledger.mark_sent(identifier, event, response_id, total_attempts)
        return Sent(identifier, response_id, total_attempts)

    async def _revive(self, delivery: Delivery, entry: LedgerEntry) -> LedgerEntry:
        """Replay of a dead delivery: make it failed-and-due, then claim it like any retry."""
        await self.ledger.mark_failed(delivery.identifier, entry.attempts, "replayed", 0.0)
        return await self.ledger.claim(delivery, self.provider.name, self.event_name(delivery.window), retry=True)

    async def _check_provider(self, delivery: Delivery, entry: LedgerEntry, event: MeterEvent) -> Outcome | None:
        """Before resending past the dedup window: does the provider hold it already? None = send."""
        start, end = summary_range(delivery.window)
        try:
            provider_total = await self.provider.total(event.event_name, event.provider_customer_id, start, end)
        except ProviderError as e:
            # The check is not an attempt: the delivery keeps its count and waits like any failure.
            return await self._failed(self.key(delivery.window), delivery.identifier, entry.attempts, e)
        accepted = await self.ledger.accepted_total(
            delivery.identifier, event.provider_customer_id, event.event_name, start, end
        )
        verdict, decision = judge_provider_totals(
            ProviderTotals(start, end, provider_total, accepted, Decimal(event.value))
        )
        await self.ledger.record_check(delivery.identifier, decision, resend=verdict == "absent")
        if verdict == "found":
            await self.ledger.mark_sent(delivery.identifier, event, "found-at-provider", entry.attempts)
            return Sent(delivery.identifier, "found-at-provider", entry.attempts)
        if verdict == "ambiguous":
            await self.ledger.mark_dead(delivery.identifier, entry.attempts, decision)
            return Dead(delivery.identifier, decision, entry.attempts)
        return None

    async def _failed(self, key: tuple, identifier: str, total_attempts: int, error: ProviderError) -> Outcome:
        described = f"{error.status or 'no response'}: {error}"
        delay = self.policy.next_delay(max(total_attempts, 1), error.retry_after, self.rng) if error.retryable else None
        if delay is None:
            reason = (
                f"gave up after {total_attempts} attempts: {described}"
                if error.retryable
                else f"provider refused the event: {described}"
            )
            await self.ledger.mark_dead(identifier, total_attempts, reason)
            return Dead(identifier, reason, total_attempts)
        self.gate.back_off(key, self.clock() + delay)
        await self.ledger.mark_failed(identifier, total_attempts, described, delay)
        return Retry(identifier, delay, total_attempts, described)


async def gather_all(work: Sequence[Awaitable[T]]) -> list[T]:
    """Every result; the first error raised only once all are done, so none outlives its caller's turns."""
    results = await asyncio.gather(*work, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast("list[T]", results)
