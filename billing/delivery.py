"""The delivery driver (async, pure apart from what is injected): one attempt per delivery visit.

Driven by the billing job's async operator (jobs/billing_job.py), by the replay command and by
the tests, with the provider, the ledger, the clock and the sleep injected. Rules:

* **Turns**: for a provider that takes one call at a time per (tenant, customer, meter) (Stripe v1),
  every delivery of that key runs under the key's lock; the job keys its stream by the same triple,
  so one subtask owns each key. For any other provider only the deliveries of one window take
  turns: a changed final's correction is computed against what the window's earlier deliveries
  recorded, so two of them must not compute it at once (where turns are per key, a final parked
  for its key computes its correction under the window's own lock for the same reason).
* **A failure never waits in the operator**: the delivery is marked ``failed`` with its next
  attempt time (backoff with jitter, at least ``Retry-After``) and the ledger's retry scan hands it
  out again then. The key backs off too: deliveries of a key that is backing off are deferred to
  that time without a call, other keys go on.
* **A shared rate**: each subtask reserves slots at ``calls_per_second / share``, one per call: per
  delivery, or per request for a provider that gathers deliveries into requests (``Provider.pace_requests``).
* **Past the provider's dedup window** a delivery is checked against the provider's totals before
  any resend (billing/deliveries.py, judge_provider_totals); the decision is recorded in the ledger.
  The check holds its key: where a key's calls run at once, those under way are recorded first and
  new ones wait (``KeyGate.call``), so the provider and the ledger are compared with nothing between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol

from billing.deliveries import (
    ClosedWindow,
    Dead,
    Deferred,
    Delivery,
    LedgerEntry,
    MeterEvent,
    Outcome,
    ProviderTotals,
    Retry,
    Sent,
    Skipped,
    as_recorded,
    beyond_dedup_window,
    build_meter_event,
    correction_needed,
    delivery_refusal,
    judge_provider_totals,
    summary_range,
    window_delivery,
)
from billing.retry import BackoffPolicy, RateReservations
from meterflow.config import JobConfig, MeterConfig
from meterflow.errors import DeliveryRejected, ProviderError

log = logging.getLogger(__name__)


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


class Provider(Protocol):
    """A billing provider's meter event API (connectors/stripe_provider.py for Stripe)."""

    name: str

    async def send(self, event: MeterEvent) -> str:
        """Send one meter event; return the provider's response id or raise ProviderError."""

    async def total(self, event_name: str, provider_customer_id: str, start: int, end: int) -> Decimal:
        """The provider's aggregated value of one customer's events over [start, end) (unix s, minute-aligned)."""

    one_call_per_key: bool
    """Whether the provider takes one call at a time per (tenant, customer, meter) (Stripe v1)."""

    def pace_requests(self, rate: RateReservations, sleep: Callable[[float], Awaitable[None]]) -> bool:
        """Whether the provider gathers deliveries into requests and paces those with ``rate`` (one
        slot per request) itself; False: each send is one call, and the deliverer takes a slot per delivery."""


@dataclass
class KeyGate:
    """Per-key serialisation and backoff: at most one delivery of a key runs, and a failing key waits."""

    locks: dict[Hashable, asyncio.Lock] = field(default_factory=dict)
    users: dict[Hashable, int] = field(default_factory=dict)
    not_before: dict[Hashable, float] = field(default_factory=dict)
    slots: dict[Hashable, float] = field(default_factory=dict)  # per key: the last turn handed to a parked delivery
    # Where a key's calls run at once (not one_call_per_key): its calls between send and outcome, and
    # who waits for none to be left (a check of the provider's totals, which holds the key's lock).
    calling: dict[Hashable, int] = field(default_factory=dict)
    drain_waiters: dict[Hashable, list[asyncio.Future]] = field(default_factory=dict)

    def lock(self, key: Hashable) -> _KeyLock:
        return _KeyLock(self, key)

    @contextlib.asynccontextmanager
    async def call(self, key: Hashable) -> AsyncIterator[None]:
        """One of a key's concurrent calls, from send to recorded outcome. It starts only while no
        check holds the key's lock, so the check reads the provider and the ledger with nothing of
        the key in between."""
        while (held := self.locks.get(key)) is not None and held.locked():
            async with self.lock(key):
                pass
        self.calling[key] = self.calling.get(key, 0) + 1
        try:
            yield
        finally:
            self.calling[key] -= 1
            if not self.calling[key]:
                del self.calling[key]
                for waiter in self.drain_waiters.pop(key, []):
                    if not waiter.done():
                        waiter.set_result(None)

    async def drained(self, key: Hashable) -> None:
        """Wait until none of the key's calls is between send and outcome (hold the key's lock first)."""
        while self.calling.get(key):
            waiter = asyncio.get_running_loop().create_future()
            self.drain_waiters.setdefault(key, []).append(waiter)
            await waiter

    def crowded(self, key: Hashable, limit: int) -> bool:
        """Whether the key already holds ``limit`` deliveries (calling or waiting for its lock)."""
        return self.users.get(key, 0) >= limit

    def next_turn(self, key: Hashable, now: float, pace: float) -> float:
        """When a delivery parked now should come back: after those holding the key and those parked
        before it, one call's time (``pace``) each, so a burst returns spread out, not all at once."""
        start = max(self.slots.get(key, 0.0), now + self.users.get(key, 0) * pace)
        self.slots[key] = start + pace
        for stale in [k for k, t in self.slots.items() if t < now]:
            del self.slots[stale]
        return self.slots[key]

    def backing_off(self, key: Hashable, now: float) -> float | None:
        """Until when the key backs off, or None."""
        until = self.not_before.get(key)
        if until is not None and until <= now:
            del self.not_before[key]
            return None
        return until

    def back_off(self, key: Hashable, until: float) -> None:
        self.not_before[key] = max(until, self.not_before.get(key, 0.0))

    def recovered(self, key: Hashable) -> None:
        self.not_before.pop(key, None)


class _KeyLock:
    """``async with gate.lock(key)``: the key's lock, forgotten when nobody holds or waits for it."""

    def __init__(self, gate: KeyGate, key: Hashable) -> None:
        self.gate, self.key = gate, key

    async def __aenter__(self) -> None:
        gate = self.gate
        gate.users[self.key] = gate.users.get(self.key, 0) + 1
        await gate.locks.setdefault(self.key, asyncio.Lock()).acquire()

    async def __aexit__(self, *exc: object) -> None:
        gate = self.gate
        gate.locks[self.key].release()
        gate.users[self.key] -= 1
        if not gate.users[self.key]:
            del gate.users[self.key], gate.locks[self.key]


class Deliverer:
    """Delivers closed windows and their corrections through a provider, recording every step in the ledger."""

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
    ) -> None:
        """``share``: how many deliverers split the configured rate (the billing job's parallelism)."""
        self.provider, self.ledger, self.clock, self.sleep, self.rng = provider, ledger, clock, sleep, rng
        self.meters: Mapping[str, MeterConfig] = {m.name: m for m in cfg.meters}
        billing = cfg.billing
        self.prefix = billing.identifier_prefix
        self.max_age, self.max_ahead, self.dedup_window = (
            billing.max_window_age,
            billing.max_window_ahead,
            billing.provider_dedup_window,
        )
        self.policy = BackoffPolicy(
            billing.max_attempts, billing.initial_backoff.total_seconds(), billing.max_backoff.total_seconds()
        )
        rate = billing.calls_per_second / max(share, 1)
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

    # -- entry points --------------------------------------------------------------------------
    async def on_window(self, window: ClosedWindow) -> list[Outcome]:
        """A closed window from the stream: its own delivery, then a correction if its final value changed.

        Where turns are per key (v1) and its key already holds ``billing.max_held_per_key``
        deliveries, the window is recorded and parked instead of waiting here, where it would take
        an in-flight slot from every other customer. Where turns are per window, only the window's
        own deliveries are ahead of it, and it waits for them: its correction must count theirs.
        """
        if self.one_call_per_key and self.gate.crowded(self.turn(window), self.max_held_per_key):
            return await self._park_window(window)
        async with self.gate.lock(self.turn(window)), self._finals_of(window):
            delivery = window_delivery(window, self.prefix)
            entry = await self.ledger.claim(delivery, self.provider.name, self.event_name(window), retry=False)
            outcomes = [await self._attempt(as_recorded(delivery, entry), entry)]
            correction = correction_needed(window, entry)
            if correction is not None:
                claimed = await self.ledger.claim(correction, self.provider.name, self.event_name(window), retry=False)
                outcomes.append(await self._attempt(correction, claimed))
            return outcomes

    async def on_retry(self, identifier: str, *, replay: bool = False) -> Outcome:
        """A recorded delivery handed out again (the retry scan, or the replay command with ``replay``)."""
        delivery = await self.ledger.delivery(identifier)
        if delivery is None:
            return Skipped(identifier, "unknown")
        if not replay and self.gate.crowded(self.turn(delivery.window), self.max_held_per_key):
            return await self._park(delivery)
        return await self._claim_and_attempt(delivery, replay=replay)

    async def _claim_and_attempt(self, delivery: Delivery, *, replay: bool = False, parked: bool = False) -> Outcome:
        """A recorded delivery's attempt, in its key's turn; a parked one also takes one of the parked calls."""
        async with (
            self.gate.lock(self.turn(delivery.window)),
            self.parked_calls if parked else contextlib.nullcontext(),
        ):
            entry = await self.ledger.claim(delivery, self.provider.name, self.event_name(delivery.window), retry=True)
            return await self._attempt(delivery, entry, replay=replay)

    async def deliver(self, identifier: str, *, replay: bool = False) -> Outcome:
        """Attempt until sent, dead or skipped, sleeping between attempts (the replay command's loop)."""
        while True:
            outcome = await self.on_retry(identifier, replay=replay)
            if isinstance(outcome, Retry | Deferred):
                delay = outcome.delay if isinstance(outcome, Retry) else max(0.0, outcome.until - self.clock())
                await self.sleep(delay)
                continue
            return outcome

    def _finals_of(self, window: ClosedWindow) -> contextlib.AbstractAsyncContextManager:
        """One final of a window at a time is compared with what the window recorded (its correction
        counts the corrections before it). Where the window is the turn, its turn is that already."""
        return self.gate.lock(("finals", window.key)) if self.one_call_per_key else contextlib.nullcontext()

    # -- parking a crowded key's deliveries ------------------------------------------------------
    async def _park_window(self, window: ClosedWindow) -> list[Outcome]:
        """Record the window (and the correction its new final needs) and park both for the key's turn."""
        async with self._finals_of(window):
            return await self._record_and_park(window)

    async def _record_and_park(self, window: ClosedWindow) -> list[Outcome]:
        delivery = window_delivery(window, self.prefix)
        entry = await self.ledger.claim(delivery, self.provider.name, self.event_name(window), retry=False)
        recorded = as_recorded(delivery, entry)
        outcomes = [await self._park(recorded) if entry.claimed else self._not_claimed(recorded, entry)]
        correction = correction_needed(window, entry)
        if correction is not None:
            claimed = await self.ledger.claim(correction, self.provider.name, self.event_name(window), retry=False)
            outcomes.append(await self._park(correction) if claimed.claimed else self._not_claimed(correction, claimed))
        return outcomes

    async def _park(self, delivery: Delivery) -> Outcome:
        """Leave the operator's slot at once; the delivery waits for its key's turn in this worker.

        Leased in the ledger until a lease after its expected turn: should this worker die, a
        restarted one releases the lease at once (release_leases); should the wait outlast the
        lease, the retry scan hands it out again and this only extends the lease of the one waiting.
        """
        until = self.gate.next_turn(self.turn(delivery.window), self.clock(), self.pace) + self.lease_s
        await self.ledger.hold(delivery.identifier, until)
        if delivery.identifier in self.parked_ids:
            return Deferred(delivery.identifier, until)
        self.parked_ids.add(delivery.identifier)
        task = asyncio.ensure_future(self._claim_and_attempt(delivery, parked=True))
        self.parked.add(task)
        task.add_done_callback(lambda done: self._parked_done(done, delivery.identifier))
        return Deferred(delivery.identifier, until)

    def _parked_done(self, task: asyncio.Future, identifier: str) -> None:
        self.parked.discard(task)
        self.parked_ids.discard(identifier)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            # Its lease brings it back (the retry scan, or the next run at once): logged, not lost.
            log.error("a parked delivery's attempt failed; the retry scan hands it out again: %r", error)
            return
        self.on_background_outcome(task.result())

    async def drain(self) -> None:
        """Wait until every parked delivery has had its attempt."""
        while self.parked:
            await asyncio.gather(*list(self.parked), return_exceptions=True)

    @staticmethod
    def _not_claimed(delivery: Delivery, entry: LedgerEntry) -> Outcome:
        return Skipped(delivery.identifier, entry.status if entry.status in ("sent", "dead") else "scheduled")

    # -- one attempt ---------------------------------------------------------------------------
    async def _attempt(self, delivery: Delivery, entry: LedgerEntry, *, replay: bool = False) -> Outcome:
        identifier = delivery.identifier
        if entry.status == "dead" and replay:
            entry = await self._revive(delivery, entry)
        if not entry.claimed:
            return self._not_claimed(delivery, entry)
        key, now = self.key(delivery.window), self.clock()
        until = self.gate.backing_off(key, now)
        if until is not None:
            await self.ledger.defer(identifier, until)
            return Deferred(identifier, until)
        meter = self.meters.get(delivery.window.meter)
        at = datetime.fromtimestamp(now, UTC)
        try:
            refused = delivery_refusal(delivery, meter, entry.provider_customer_id, at, self.max_age, self.max_ahead)
            if refused or meter is None or entry.provider_customer_id is None:
                raise DeliveryRejected(refused or "no meter or customer")
            carried = None
            if meter.billing_rounding == "carry":
                # Fixed once, when first attempted: every retry and replay sends the same value.
                carried = Decimal(entry.value) if entry.value is not None else await self.ledger.carry_value(identifier)
            event = build_meter_event(delivery, meter, entry.provider_customer_id, carried)
        except DeliveryRejected as e:
            await self.ledger.mark_rejected(identifier, str(e))
            return Dead(identifier, str(e), entry.attempts)
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
