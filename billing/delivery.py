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
from collections.abc import Coroutine, Hashable, Sequence
from decimal import Decimal
from typing import Any, cast

from billing.attempts import Attempts, Cleared, gather_all
from billing.deliveries import (
    ClosedWindow,
    Deferred,
    Delivery,
    LedgerEntry,
    MeterEvent,
    Outcome,
    Retry,
    Sent,
    Skipped,
    as_recorded,
    beyond_dedup_window,
    build_meter_event,
    correction_needed,
    window_delivery,
)
from meterflow.errors import DeliveryRejected, ProviderError

log = logging.getLogger(__name__)


class Deliverer(Attempts):
    """Delivers closed windows and their corrections through a provider, recording every step in the ledger."""

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
                outcomes.append(await self._correct(correction, window))
            return outcomes

    async def on_windows(self, windows: Sequence[ClosedWindow]) -> list[Outcome]:
        """Closed windows from the stream, each delivered as :meth:`on_window` delivers it, but
        together: the claims, the carried values, the requests and the sent outcomes of the windows
        that go the common way (claimed, cleared, within the dedup window, no check holding their
        key) are one ledger statement and one provider call each for all of them, with no coroutine
        per window. Only where the deliverer needs no turns per key nor paces the calls (the v2
        stream); otherwise, and for a window whose turn is taken, :meth:`on_window` one by one."""
        if not self.delivers_together:
            return _flat(await asyncio.gather(*(self.on_window(w) for w in windows)))
        together: list[ClosedWindow] = []
        alone: list[ClosedWindow] = []
        turns: set[Hashable] = set()
        for w in windows:
            turn = self.turn(w)
            (alone if turn in turns or self.gate.busy(turn) else together).append(w)
            turns.add(turn)
        return _flat(await gather_all([self._together(together), *(self.on_window(w) for w in alone)]))

    async def _together(self, windows: list[ClosedWindow]) -> list[Outcome]:
        if not windows:
            return []
        async with contextlib.AsyncExitStack() as turns:
            # In one order for every batch: two batches each waiting for a turn the other holds would wait forever.
            for w in sorted(windows, key=_turn_order):
                await turns.enter_async_context(self.gate.lock(self.turn(w)))
            deliveries = [window_delivery(w, self.prefix) for w in windows]
            names = [self.event_name(w) for w in windows]
            entries = await self.ledger.claim_windows(deliveries, self.provider.name, names)
            recorded = [as_recorded(d, e) for d, e in zip(deliveries, entries, strict=True)]
            now = self.clock()
            cleared: dict[int, Cleared] = {}
            alone: dict[int, Coroutine[Any, Any, Outcome]] = {}
            for i, (d, e) in enumerate(zip(recorded, entries, strict=True)):
                verdict = self._cleared(d, e, now)
                if not isinstance(verdict, Cleared):
                    alone[i] = self._without_call(d, e, verdict)
                elif beyond_dedup_window(e.first_attempt_at, now, self.dedup_window):
                    alone[i] = self._attempt(d, e)  # the provider is asked first: one by one
                else:
                    cleared[i] = verdict
            try:
                events = await self._events_of(recorded, entries, cleared, alone)
            except BaseException:
                for waiting in alone.values():
                    waiting.close()  # never started: nothing to undo
                raise
            calls = self._start_calls(recorded, entries, events, alone)
            outcomes: dict[int, Outcome] = {}
            try:
                _, *results = await gather_all(
                    [self._send_together(recorded, entries, events, calls, outcomes), *alone.values()]
                )
            finally:
                self._end_calls(recorded, calls)  # those the call itself did not end (cancelled before it began)
            outcomes.update(zip(alone, cast("list[Outcome]", results), strict=True))
            corrections = [
                (c, w) for w, e in zip(windows, entries, strict=True) if (c := correction_needed(w, e)) is not None
            ]
            corrected = await gather_all([self._correct(c, w) for c, w in corrections])
            return [outcomes[i] for i in range(len(windows))] + list(corrected)

    async def _events_of(
        self,
        recorded: list[Delivery],
        entries: list[LedgerEntry],
        cleared: dict[int, Cleared],
        alone: dict[int, Coroutine[Any, Any, Outcome]],
    ) -> dict[int, MeterEvent]:
        """The events of cleared deliveries, the carried values fixed together; a refused one goes to ``alone``."""
        to_fix = [
            recorded[i].identifier
            for i, c in cleared.items()
            if c.meter.billing_rounding == "carry" and entries[i].value is None
        ]
        fixed = dict(zip(to_fix, await self.ledger.carry_values(to_fix), strict=True)) if to_fix else {}
        events: dict[int, MeterEvent] = {}
        for i, c in cleared.items():
            d, e = recorded[i], entries[i]
            carried = None
            if c.meter.billing_rounding == "carry":
                carried = Decimal(e.value) if e.value is not None else fixed[d.identifier]
            try:
                events[i] = build_meter_event(d, c.meter, c.customer, carried)
            except DeliveryRejected as x:
                alone[i] = self._rejected(d.identifier, e, str(x))
        return events

    def _start_calls(
        self,
        recorded: list[Delivery],
        entries: list[LedgerEntry],
        events: dict[int, MeterEvent],
        alone: dict[int, Coroutine[Any, Any, Outcome]],
    ) -> list[int]:
        """The events that go in one call, their keys' calls started; one whose key a check holds waits in ``alone``."""
        calls = []
        for i, event in events.items():
            key = self.key(recorded[i].window)
            if self.gate.start_call(key):
                calls.append(i)
            else:
                alone[i] = self._send(key, entries[i], event)
        return calls

    async def _send_together(
        self,
        recorded: list[Delivery],
        entries: list[LedgerEntry],
        events: dict[int, MeterEvent],
        calls: list[int],
        outcomes: dict[int, Outcome],
    ) -> None:
        """One provider call for the started events, their outcomes recorded, then their keys' calls ended."""
        if not calls:
            return
        try:
            started = self.clock()
            answers = await self.provider.send_all([events[i] for i in calls])
            sent = [(i, a) for i, a in zip(calls, answers, strict=True) if not isinstance(a, ProviderError)]
            if sent:
                self.pace = 0.8 * self.pace + 0.2 * max(self.clock() - started, 0.001)
                for i, _ in sent:
                    self.gate.recovered(self.key(recorded[i].window))
                await self.ledger.mark_all_sent(
                    [(recorded[i].identifier, events[i], a, entries[i].attempts + 1) for i, a in sent]
                )
                outcomes.update((i, Sent(recorded[i].identifier, a, entries[i].attempts + 1)) for i, a in sent)
            failed = [(i, a) for i, a in zip(calls, answers, strict=True) if isinstance(a, ProviderError)]
            results = await gather_all(
                [
                    self._failed(self.key(recorded[i].window), recorded[i].identifier, entries[i].attempts + 1, a)
                    for i, a in failed
                ]
            )
            outcomes.update(zip((i for i, _ in failed), results, strict=True))
        finally:
            self._end_calls(recorded, calls)

    def _end_calls(self, recorded: list[Delivery], calls: list[int]) -> None:
        """End the calls :meth:`_start_calls` started, once: ``calls`` is emptied."""
        for i in calls:
            self.gate.end_call(self.key(recorded[i].window))
        calls.clear()

    async def _correct(self, correction: Delivery, window: ClosedWindow) -> Outcome:
        claimed = await self.ledger.claim(correction, self.provider.name, self.event_name(window), retry=False)
        return await self._attempt(correction, claimed)

    async def refuse_windows(self, windows: Sequence[ClosedWindow], provider: str, reason: str) -> list[Outcome]:
        """Record windows' deliveries under ``provider`` and mark them dead with ``reason``, without a call
        (a destination that is mapped but not declared: billing/routing.py); a replay sends them later."""
        deliveries = [window_delivery(w, self.prefix) for w in windows]
        entries = await self.ledger.claim_windows(deliveries, provider, [self.event_name(w) for w in windows])
        return [
            await self._rejected(e.identifier, e, reason) if e.claimed else self._not_claimed(d, e)
            for d, e in zip(deliveries, entries, strict=True)
        ]

    async def refuse_recorded(self, identifier: str, reason: str) -> Outcome:
        """A recorded delivery handed out again whose destination is not declared: dead with ``reason``."""
        delivery = await self.ledger.delivery(identifier)
        if delivery is None:
            return Skipped(identifier, "unknown")
        entry = await self.ledger.claim(delivery, self.provider.name, self.event_name(delivery.window), retry=True)
        return await self._rejected(identifier, entry, reason) if entry.claimed else self._not_claimed(delivery, entry)

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


def _flat(outcomes: Sequence[list[Outcome]]) -> list[Outcome]:
    return [o for some in outcomes for o in some]


def _turn_order(window: ClosedWindow) -> tuple:
    return (
        window.tenant_id,
        window.customer_id,
        window.meter,
        window.dimensions_key,
        window.window_start,
        window.window_end,
    )
