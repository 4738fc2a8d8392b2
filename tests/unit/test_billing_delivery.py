"""The deliverer's decisions: send once, skip what the ledger has, schedule retries, back off per key,
dead-letter, rate-limit, correct changed finals, and check the provider past its dedup window.

The ledger here is an in-memory implementation of the Ledger protocol with the claim rules of the
Postgres one (which the e2e tests exercise); the provider is scripted. Clock and sleep are a fake
pair: no real waiting.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from billing.deliveries import (
    ClosedWindow,
    Dead,
    Deferred,
    Delivery,
    LedgerEntry,
    MeterEvent,
    ProviderTotals,
    Retry,
    Sent,
    Skipped,
    build_meter_event,
    judge_provider_totals,
    replay_refusal,
    summary_range,
    window_delivery,
)
from billing.delivery import Deliverer
from billing.identifiers import derive_correction_identifier
from billing.whole_values import billing_period_start, carried_value
from meterflow.config import JobConfig
from meterflow.errors import ProviderError
from meterflow.window_row import epoch_ms, from_epoch_ms

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
START_MS = int((NOW - timedelta(hours=1)).timestamp() * 1000)
DAY = 86400.0


def window(
    customer: str = "cust-1",
    meter: str = "tokens",
    quantity: str = "12.500",
    start_ms: int = START_MS,
    revision: int = 3,
) -> ClosedWindow:
    return ClosedWindow.from_fields(
        ("tenant-1", customer, meter, "{}", start_ms, start_ms + 60_000, Decimal(quantity), revision, revision)
    )


class FakeTime:
    def __init__(self) -> None:
        self.now, self.slept = NOW.timestamp(), []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _span(w: ClosedWindow) -> tuple:
    return (w.tenant_id, w.customer_id, w.meter, w.dimensions_key, w.window_start, w.window_end)


@dataclass
class MemoryLedger:
    """The claim rules of sinks/ledger_schema.py, in memory."""

    t: FakeTime
    worker: str = "w1"
    lease: float = 120.0
    rows: dict[str, dict] = field(default_factory=dict)
    customers: dict[tuple[str, str], str] = field(default_factory=lambda: {("tenant-1", "cust-1"): "cus_1"})
    checks: list[str] = field(default_factory=list)
    carried: dict[tuple, Decimal] = field(default_factory=dict)  # (tenant, customer, meter, month) -> total
    together: list[str] = field(default_factory=list)  # the calls that served many deliveries at once

    def _entry(self, r: dict, claimed: bool) -> LedgerEntry:
        corrections = [
            c for c in self.rows.values() if c["window_identifier"] == r["identifier"] and c["kind"] == "correction"
        ]
        w = r["delivery"].window
        return LedgerEntry(
            r["identifier"],
            r["kind"],
            r["status"],
            r["attempts"],
            r["quantity"],
            r["revision"],
            r["first_attempt_at"],
            self.customers.get((w.tenant_id, w.customer_id)),
            sum((c["quantity"] for c in corrections), Decimal(0)),
            max((c["revision"] for c in corrections), default=0),
            claimed,
            r["value"],
        )

    async def claim(self, delivery: Delivery, provider: str, event_name: str, *, retry: bool) -> LedgerEntry:
        now = self.t.now
        r = self.rows.get(delivery.identifier)
        if (
            r is None and delivery.kind == "window"
        ):  # a window's row is found by its key and span, whatever its identifier
            span = _span(delivery.window)
            r = next(
                (x for x in self.rows.values() if x["kind"] == "window" and _span(x["delivery"].window) == span), None
            )
        if r is None:
            r = self.rows[delivery.identifier] = {
                "identifier": delivery.identifier,
                "provider": provider,
                "kind": delivery.kind,
                "window_identifier": delivery.window_identifier,
                "delivery": delivery,
                "quantity": delivery.quantity,
                "revision": delivery.revision,
                "status": "pending",
                "attempts": 0,
                "first_attempt_at": None,
                "next_attempt_at": None,
                "claimed_by": None,
                "leased": False,
                "event_name": event_name,
                "value": None,
                "customer": None,
            }
        claimable = r["status"] in ("pending", "failed") and (
            retry or r["next_attempt_at"] is None or r["next_attempt_at"] <= now or r["claimed_by"] != self.worker
        )
        if not claimable:
            return self._entry(r, claimed=False)
        r.update(
            first_attempt_at=r["first_attempt_at"] or now,
            next_attempt_at=now + self.lease,
            claimed_by=self.worker,
            leased=True,
        )
        return self._entry(r, claimed=True)

    async def delivery(self, identifier: str) -> Delivery | None:
        r = self.rows.get(identifier)
        return None if r is None else r["delivery"]

    async def mark_sent(self, identifier: str, event: MeterEvent, response_id: str, attempts: int) -> None:
        self.rows[identifier].update(
            status="sent",
            attempts=attempts,
            value=event.value,
            customer=event.provider_customer_id,
            event_name=event.event_name,
            response=response_id,
            next_attempt_at=None,
            leased=False,
        )

    async def mark_failed(self, identifier: str, attempts: int, error: str, delay: float) -> None:
        r = self.rows[identifier]
        if r["status"] != "sent":
            r.update(status="failed", attempts=attempts, error=error, next_attempt_at=self.t.now + delay, leased=False)

    async def mark_dead(self, identifier: str, attempts: int, reason: str) -> None:
        r = self.rows[identifier]
        if r["status"] != "sent":
            r.update(status="dead", attempts=attempts, error=reason, next_attempt_at=None)

    async def mark_rejected(self, identifier: str, reason: str) -> None:
        r = self.rows[identifier]
        r.update(
            status="dead",
            error=reason,
            next_attempt_at=None,
            first_attempt_at=None if r["attempts"] == 0 else r["first_attempt_at"],
        )

    async def defer(self, identifier: str, until: float) -> None:
        r = self.rows[identifier]
        r.update(
            next_attempt_at=until if r["leased"] else max(until, r["next_attempt_at"] or 0),
            claimed_by=self.worker,
            leased=False,
        )

    async def hold(self, identifier: str, until: float) -> None:
        r = self.rows[identifier]
        if r["status"] in ("pending", "failed"):
            r.update(next_attempt_at=until, claimed_by=self.worker, leased=True)

    async def record_check(self, identifier: str, decision: str, *, resend: bool) -> None:
        self.checks.append(decision)
        if resend:
            self.rows[identifier]["first_attempt_at"] = self.t.now

    async def accepted_total(
        self, identifier: str, provider_customer_id: str, event_name: str, start: int, end: int
    ) -> Decimal:
        rows = [
            r
            for r in self.rows.values()
            if r["status"] == "sent"
            and r["identifier"] != identifier
            and r["customer"] == provider_customer_id
            and r["event_name"] == event_name
        ]
        return sum(
            (Decimal(r["value"]) for r in rows if start <= epoch_ms(r["delivery"].window.window_start) // 1000 < end),
            Decimal(0),
        )

    async def carry_value(self, identifier: str) -> Decimal:
        r = self.rows[identifier]
        if r["value"] is None:
            w = r["delivery"].window
            key = (w.tenant_id, w.customer_id, w.meter, billing_period_start(w.window_start))
            before = self.carried.get(key, Decimal(0))
            self.carried[key] = before + r["quantity"]
            r["value"] = str(carried_value(before, r["quantity"]))
        return Decimal(r["value"])

    # Together (Deliverer.on_windows): the same rules, one call for many, as the Postgres ledger's set-based statements.
    async def claim_windows(self, deliveries, provider: str, event_names) -> list[LedgerEntry]:
        self.together.append("claim")
        return [await self.claim(d, provider, n, retry=False) for d, n in zip(deliveries, event_names, strict=True)]

    async def carry_values(self, identifiers) -> list[Decimal]:
        self.together.append("carry")
        return [await self.carry_value(i) for i in identifiers]

    async def mark_all_sent(self, sent) -> None:
        self.together.append("sent")
        for identifier, event, response_id, attempts in sent:
            await self.mark_sent(identifier, event, response_id, attempts)


@dataclass
class ScriptedProvider:
    """Answers from a script: an exception to raise, or None for success; ``held`` is what it already has."""

    script: list[ProviderError | None] = field(default_factory=list)
    sent: list[MeterEvent] = field(default_factory=list)
    held: Decimal = Decimal(0)
    name: str = "stripe"
    one_call_per_key: bool = True
    requests: list[int] = field(default_factory=list)  # events per send_all

    async def send(self, event: MeterEvent) -> str:
        self.sent.append(event)
        answer = self.script.pop(0) if self.script else None
        if answer is not None:
            raise answer
        return f"req_{len(self.sent)}"

    async def send_all(self, events) -> list:
        self.requests.append(len(events))
        answers = []
        for event in events:
            try:
                answers.append(await self.send(event))
            except ProviderError as e:
                answers.append(e)
        return answers

    async def total(self, event_name: str, provider_customer_id: str, start: int, end: int) -> Decimal:
        return self.held

    def pace_requests(self, rate, sleep) -> bool:
        return False


@dataclass
class OverlapCountingProvider(ScriptedProvider):
    """Answers after a real sleep of ``delay`` s, counting the most sends in flight at once."""

    delay: float = 0.01
    running: int = 0
    most: int = 0

    async def send(self, event: MeterEvent) -> str:
        self.running += 1
        self.most = max(self.most, self.running)
        await asyncio.sleep(self.delay)
        self.running -= 1
        return await super().send(event)


def deliverer(provider: ScriptedProvider, ledger: MemoryLedger, t: FakeTime, share: int = 1, **billing) -> Deliverer:
    cfg = JobConfig.model_validate(
        {
            "billing": {"enabled": True, **billing},
            "meters": [
                {"name": "tokens"},
                {"name": "api_calls", "billing_event_name": "api_requests", "billing_rounding": "ceil"},
            ],
        }
    )
    return Deliverer(cfg, provider, ledger, clock=t.clock, sleep=t.sleep, rng=lambda: 1.0, share=share)


def concurrent_deliverer(provider: ScriptedProvider, ledger: MemoryLedger, t: FakeTime, **billing) -> Deliverer:
    """A deliverer whose sleeps are real, so that deliveries overlap the way they do in a worker; its
    clock is the test's."""
    return Deliverer(
        JobConfig.model_validate({"billing": {"enabled": True, **billing}}),
        provider,
        ledger,
        clock=t.clock,
        sleep=asyncio.sleep,
        rng=lambda: 1.0,
    )


def setup(**billing) -> tuple[ScriptedProvider, MemoryLedger, FakeTime, Deliverer]:
    t = FakeTime()
    provider, ledger = ScriptedProvider(), MemoryLedger(t)
    return provider, ledger, t, deliverer(provider, ledger, t, **billing)


def run(coro):
    return asyncio.run(coro)


def test_sends_once_and_a_replayed_window_is_skipped():
    """A window is sent once; re-emitted after a failover, the ledger says sent and the provider is not called."""
    provider, ledger, _, d = setup()
    [first] = run(d.on_window(window()))
    assert isinstance(first, Sent) and first.attempts == 1
    assert provider.sent == [MeterEvent(first.identifier, "tokens", "cus_1", "12", START_MS // 1000)], (
        "whole units; 0.5 carried"
    )
    assert run(d.on_window(window())) == [Skipped(first.identifier, "sent")]
    assert len(provider.sent) == 1 and ledger.rows[first.identifier]["status"] == "sent"


def test_a_delivery_claimed_by_a_dead_worker_is_resent_with_the_same_identifier():
    """Crash between the call and the ledger update: the next worker re-sends the same identifier (the provider dedups)."""
    provider, ledger, t, d = setup()
    delivery = window_delivery(window(), "mf")
    run(ledger.claim(delivery, "stripe", "tokens", retry=False))  # claimed, as a crash leaves it
    ledger.worker = "w2"  # the restarted worker reads the window again from Kafka
    [outcome] = run(d.on_window(window()))
    assert isinstance(outcome, Sent) and provider.sent[0].identifier == delivery.identifier


def test_a_failure_is_scheduled_not_waited_for_and_the_key_backs_off():
    """429 with Retry-After: failed with the next attempt time; the key's next window is deferred without a call; other keys go on."""
    provider, ledger, t, d = setup(initial_backoff="1s", max_backoff="30s")
    provider.script = [ProviderError("slow down", status=429, retryable=True, retry_after=7)]
    [retry] = run(d.on_window(window()))
    assert isinstance(retry, Retry) and retry.delay >= 7 and t.slept == []
    assert (
        ledger.rows[retry.identifier]["status"] == "failed"
        and ledger.rows[retry.identifier]["next_attempt_at"] >= t.now + 7
    )
    [deferred] = run(d.on_window(window(start_ms=START_MS + 60_000)))
    assert isinstance(deferred, Deferred) and deferred.until >= t.now + 7 and len(provider.sent) == 1
    [other] = run(d.on_window(window(customer="cust-2")))
    assert isinstance(other, Dead) and "no billing customer mapped" in other.reason  # another key is not held back
    t.now += 8
    assert isinstance(run(d.on_retry(retry.identifier)), Sent)
    assert isinstance(run(d.on_retry(deferred.identifier)), Sent)
    assert ledger.rows[retry.identifier]["attempts"] == 2


def test_a_window_read_again_while_its_retry_is_scheduled_leaves_it_to_the_retry_scan():
    """The retry scan owns a scheduled delivery: the stream does not attempt it early."""
    provider, ledger, t, d = setup()
    provider.script = [ProviderError("oops", status=500, retryable=True)]
    [retry] = run(d.on_window(window()))
    assert run(d.on_window(window())) == [Skipped(retry.identifier, "scheduled")] and len(provider.sent) == 1


def test_gives_up_after_max_attempts_into_the_dead_letter_state():
    """Bounded attempts: the last failure makes the delivery dead, with the reason."""
    provider, ledger, t, d = setup(max_attempts=3)
    provider.script = [ProviderError("unavailable", status=503, retryable=True)] * 3
    [first] = run(d.on_window(window()))
    outcome = run(d.deliver(first.identifier))
    assert isinstance(outcome, Dead) and "gave up after 3 attempts" in outcome.reason and "503" in outcome.reason
    assert ledger.rows[outcome.identifier]["status"] == "dead" and len(provider.sent) == 3


def test_a_refusal_is_dead_at_once():
    """A 4xx other than 408/409/425/429 will not succeed by retrying."""
    provider, ledger, _, d = setup()
    provider.script = [ProviderError("No such customer", status=400, retryable=False)]
    [outcome] = run(d.on_window(window()))
    assert isinstance(outcome, Dead) and "provider refused the event: 400" in outcome.reason and len(provider.sent) == 1


def test_unmapped_customer_is_dead_without_a_call_and_replays_after_mapping():
    """No billing customer: dead letter with the reason and no first-attempt time; after mapping, replay sends it once."""
    provider, ledger, _, d = setup()
    [dead] = run(d.on_window(window(customer="cust-9")))
    assert isinstance(dead, Dead) and "no billing customer mapped" in dead.reason and provider.sent == []
    assert ledger.rows[dead.identifier]["first_attempt_at"] is None
    assert run(d.on_window(window(customer="cust-9"))) == [Skipped(dead.identifier, "dead")], (
        "the job does not retry dead letters by itself"
    )
    ledger.customers[("tenant-1", "cust-9")] = "cus_9"
    assert isinstance(run(d.deliver(dead.identifier, replay=True)), Sent) and len(provider.sent) == 1


@pytest.mark.parametrize(
    ("age", "reason"), [(timedelta(days=36), "more than 35d ago"), (-timedelta(hours=1), "future")]
)
def test_windows_outside_the_provider_range_never_reach_the_api(age, reason):
    """Older than 35 days or in the future: dead with that reason, no call."""
    provider, _, _, d = setup()
    [outcome] = run(d.on_window(window(start_ms=int((NOW - age).timestamp() * 1000))))
    assert isinstance(outcome, Dead) and reason in outcome.reason and provider.sent == []


def test_meter_mapping_event_name_and_rounding():
    """meter -> event name from config; a whole-number meter rounds as configured; unknown meters are dead."""
    meter = JobConfig.model_validate(
        {"meters": [{"name": "api_calls", "billing_event_name": "api_requests", "billing_rounding": "ceil"}]}
    ).meter("api_calls")
    event = build_meter_event(window_delivery(window(meter="api_calls", quantity="2.100"), "mf"), meter, "cus_1")
    assert (event.event_name, event.value) == ("api_requests", "3")
    _, _, _, d = setup()
    [outcome] = run(d.on_window(window(meter="gpu_seconds")))
    assert isinstance(outcome, Dead) and "not configured for billing" in outcome.reason


def test_rate_limit_is_shared_by_subtasks():
    """calls_per_second is for the whole job: each of two subtasks gets half, enforced by sleeping."""
    provider, ledger, t, d = setup(share=2, calls_per_second=40)
    for i in range(10):
        run(d.on_window(window(start_ms=START_MS + i * 60_000)))
    # 20 calls/s per subtask with a burst of 2: eight of the ten calls wait 1/20 s each.
    assert sum(t.slept) == pytest.approx(8 / 20)
    assert len(provider.sent) == 10


def test_a_provider_that_gathers_deliveries_into_requests_paces_the_requests():
    """The v2 stream's calls are requests of many deliveries: the deliverer hands it the subtask's
    share of calls_per_second and reserves nothing per delivery."""

    @dataclass
    class BatchingProvider(ScriptedProvider):
        paced: list = field(default_factory=list)

        def pace_requests(self, rate, sleep) -> bool:
            self.paced.append((rate, sleep))
            return True

    t = FakeTime()
    provider, ledger = BatchingProvider(), MemoryLedger(t)
    d = deliverer(provider, ledger, t, share=2, calls_per_second=40)
    for i in range(10):
        run(d.on_window(window(start_ms=START_MS + i * 60_000)))
    [(rate, sleep)] = provider.paced
    assert (rate.rate, sleep) == (20, t.sleep)
    assert len(provider.sent) == 10 and sum(t.slept) == 0, "no delivery waits for a call slot of its own"


def test_one_call_at_a_time_per_key_while_other_keys_run_together():
    """Concurrent deliveries of one key are serialised; deliveries of different keys overlap."""

    class SlowProvider(ScriptedProvider):
        running: dict[str, int] = {}
        overlap: dict[str, int] = {}

        async def send(self, event: MeterEvent) -> str:
            key = event.provider_customer_id
            self.running[key] = self.running.get(key, 0) + 1
            self.overlap[key] = max(self.overlap.get(key, 0), self.running[key])
            self.overlap["all"] = max(self.overlap.get("all", 0), sum(self.running.values()))
            await asyncio.sleep(0.01)
            self.running[key] -= 1
            return await super().send(event)

    t = FakeTime()
    ledger, provider = MemoryLedger(t), SlowProvider()
    ledger.customers[("tenant-1", "cust-2")] = "cus_2"
    d = concurrent_deliverer(provider, ledger, t, max_held_per_key=4)

    async def many() -> list:
        windows = [window(customer=c, start_ms=START_MS + i * 60_000) for c in ("cust-1", "cust-2") for i in range(4)]
        return await asyncio.gather(*(d.on_window(w) for w in windows))

    results = run(many())
    assert all(isinstance(o, Sent) for [o] in results)
    assert provider.overlap["cus_1"] == 1 and provider.overlap["cus_2"] == 1 and provider.overlap["all"] == 2
    assert d.gate.locks == {} and d.gate.users == {}, "a key's lock is forgotten once nobody uses it"


def test_without_one_call_per_key_a_keys_windows_overlap_and_only_one_windows_deliveries_take_turns():
    """A provider that takes a key's events at once (the v2 stream): four windows of one customer and
    meter are in flight together; three finals of one window arriving together still take turns, so
    each correction counts the one before it and the provider's total is the last final. The third
    finds its window holding max_held_per_key (2) deliveries and waits for them instead of parking:
    a parked final would compute its correction beside the others."""

    class SlowLedger(MemoryLedger):
        async def claim(self, delivery, provider, event_name, *, retry):
            await asyncio.sleep(0.001)  # as a real ledger's round trip: others run meanwhile
            return await super().claim(delivery, provider, event_name, retry=retry)

    t = FakeTime()
    ledger, provider = SlowLedger(t), OverlapCountingProvider(one_call_per_key=False, delay=0.01)
    d = concurrent_deliverer(provider, ledger, t)

    async def many() -> list:
        windows = [window(start_ms=START_MS + i * 60_000, quantity="2") for i in range(4)]
        return await asyncio.gather(*(d.on_window(w) for w in windows))

    assert all(isinstance(o, Sent) for [o] in run(many()))
    assert provider.most == 4, "one key's windows were sent together"

    async def finals() -> list:
        versions = [
            window(quantity=q, revision=r, start_ms=START_MS - 60_000) for q, r in (("3", 1), ("5", 2), ("8", 3))
        ]
        return await asyncio.gather(*(d.on_window(w) for w in versions))

    run(finals())
    sent = [e for e in provider.sent if e.timestamp == (START_MS - 60_000) // 1000]
    assert sum(Decimal(e.value) for e in sent) == 8 and len({e.identifier for e in sent}) == len(sent)
    assert d.gate.locks == {} and d.gate.users == {}


def test_with_one_call_per_key_a_parked_final_computes_its_correction_after_the_final_before_it():
    """Stripe v1: a window is sent with 3; then its final 5 takes the key's turn, another window of
    the key waits behind it, and the final 8 arrives: the key holds two (max_held_per_key), so 8 is
    recorded and parked. Its correction is computed only once 5 has recorded its own (+2), so it is
    +3 and the provider's total for the window is 8, not 10."""

    class SlowLedger(MemoryLedger):
        async def claim(self, delivery, provider, event_name, *, retry):
            await asyncio.sleep(0.001)  # as a real ledger's round trip: others run meanwhile
            return await super().claim(delivery, provider, event_name, retry=retry)

    t = FakeTime()
    ledger, provider = SlowLedger(t), OverlapCountingProvider(delay=0.005)
    d = concurrent_deliverer(provider, ledger, t)
    run(d.on_window(window(quantity="3", revision=1)))

    async def finals() -> None:
        other = window(quantity="1", start_ms=START_MS + 60_000)
        await asyncio.gather(
            d.on_window(window(quantity="5", revision=2)),
            d.on_window(other),
            d.on_window(window(quantity="8", revision=3)),
        )
        await d.drain()

    run(finals())
    own = [e for e in provider.sent if e.timestamp == START_MS // 1000]
    assert [e.value for e in own] == ["3", "2", "3"], "+2 for 5, then +3 for 8"
    assert provider.most == 1 and d.gate.locks == {} and d.parked == set()


def test_a_changed_final_after_sending_becomes_a_correction_with_its_own_identifier():
    """Sent with 12.5 at revision 3; re-finalised as 15 at revision 5: a correction of +2.5 identified by window and revision.

    Carried: the window sent 12 (0.5 carried), the correction completes 15 and sends 3."""
    provider, ledger, _, d = setup()
    [sent] = run(d.on_window(window(quantity="12.5", revision=3)))
    outcomes = run(d.on_window(window(quantity="15", revision=5)))
    assert outcomes[0] == Skipped(sent.identifier, "sent") and isinstance(outcomes[1], Sent)
    correction = derive_correction_identifier(sent.identifier, 5)
    assert outcomes[1].identifier == correction and provider.sent[-1] == MeterEvent(
        correction, "tokens", "cus_1", "3", START_MS // 1000
    )
    assert ledger.rows[correction]["kind"] == "correction" and ledger.rows[correction]["quantity"] == Decimal("2.5")
    assert run(d.on_window(window(quantity="15", revision=5)))[1:] == [], "the same final again adds nothing"
    assert run(d.on_window(window(quantity="9", revision=4)))[1:] == [], (
        "an older revision is a replay, never a correction"
    )
    [_, down] = run(d.on_window(window(quantity="14", revision=6)))
    assert isinstance(down, Sent) and provider.sent[-1].value == "-1", "a lower final is a negative correction"


def test_a_changed_final_while_the_window_waits_for_a_retry_is_a_correction_too():
    """The window's own event keeps its value (its identifier must carry the same parameters); the difference follows."""
    provider, ledger, t, d = setup()
    provider.script = [ProviderError("unavailable", status=503, retryable=True)]
    [retry] = run(d.on_window(window(quantity="1", revision=1)))
    assert isinstance(retry, Retry)
    t.now += 0.1  # the retry is not due yet, and the key backs off
    [skipped, correction] = run(d.on_window(window(quantity="4", revision=2)))
    assert skipped == Skipped(retry.identifier, "scheduled") and isinstance(correction, Deferred)
    t.now += 60
    assert isinstance(run(d.on_retry(retry.identifier)), Sent) and isinstance(
        run(d.on_retry(correction.identifier)), Sent
    )
    assert [e.value for e in provider.sent[1:]] == ["1", "3"], "1 for the window, then +3: the final 4 in total"


def test_a_window_published_again_when_its_retry_is_due_resends_the_recorded_value_and_corrects_the_rest():
    """First delivery of 3 failed; the window comes again (republished) with final 4 once the retry is due:
    the retry sends 3 under the window's identifier, a correction sends +1, the provider holds 4."""
    provider, ledger, t, d = setup()
    provider.script = [ProviderError("unavailable", status=503, retryable=True)]
    [retry] = run(d.on_window(window(quantity="3", revision=1)))
    assert isinstance(retry, Retry)
    t.now += 60  # the retry is due: the republished window claims it
    [resent, correction] = run(d.on_window(window(quantity="4", revision=2)))
    assert isinstance(resent, Sent) and resent.identifier == retry.identifier and isinstance(correction, Sent)
    assert [(e.identifier, e.value) for e in provider.sent[1:]] == [
        (retry.identifier, "3"),
        (correction.identifier, "1"),
    ]
    assert sum(Decimal(e.value) for e in provider.sent[1:]) == Decimal(4), "the provider total is the final"
    assert ledger.rows[retry.identifier]["quantity"] == Decimal(3)


def test_past_the_dedup_window_the_provider_is_asked_first():
    """First sent more than 24 h ago: found at the provider -> sent without a call; absent -> re-sent; both recorded."""
    provider, ledger, t, d = setup(max_attempts=2)
    provider.script = [ProviderError("no answer", status=None, retryable=True)] * 2
    [_] = run(d.on_window(window()))
    dead = run(d.deliver(window_delivery(window(), "mf").identifier))
    assert isinstance(dead, Dead)
    t.now += DAY + 60
    provider.held = Decimal("12")  # the first, unanswered call had in fact arrived (12.5 carried: 12)
    found = run(d.deliver(dead.identifier, replay=True))
    assert isinstance(found, Sent) and found.response_id == "found-at-provider" and len(provider.sent) == 2
    assert ledger.checks[-1].startswith("found at the provider")

    provider2, ledger2, t2, d2 = setup(max_attempts=1)
    provider2.script = [ProviderError("unavailable", status=503, retryable=True)]
    [dead2] = run(d2.on_window(window()))
    t2.now += DAY + 60
    resent = run(d2.deliver(dead2.identifier, replay=True))
    assert (
        isinstance(resent, Sent) and len(provider2.sent) == 2 and ledger2.checks[-1].startswith("not at the provider")
    )
    assert ledger2.rows[dead2.identifier]["first_attempt_at"] == t2.now, "the resend restarts the dedup window"


def test_where_a_keys_calls_run_at_once_a_check_of_its_totals_sees_none_of_them_half_recorded():
    """Past the dedup window the provider's total for the minute is compared with the ledger. On the
    v2 stream a customer's calls run at once: a check must not read the provider while another call
    of the key was accepted but not yet recorded (equal values would read as "found" and never be
    sent). The check holds the key: calls under way finish first, new ones wait for it."""

    @dataclass
    class SummingProvider(OverlapCountingProvider):
        accepted: list = field(default_factory=list)
        in_flight_at_checks: list = field(default_factory=list)

        async def send(self, event: MeterEvent) -> str:
            answer = await super().send(event)  # raises what the script says
            self.accepted.append(event)
            return answer

        async def total(self, event_name: str, provider_customer_id: str, start: int, end: int) -> Decimal:
            await asyncio.sleep(0.02)  # the summary's round trip
            self.in_flight_at_checks.append(self.running)
            return sum(
                (
                    Decimal(e.value)
                    for e in self.accepted
                    if e.provider_customer_id == provider_customer_id and start <= e.timestamp < end
                ),
                Decimal(0),
            )

    class SlowToRecord(MemoryLedger):
        async def mark_sent(self, identifier, event, response_id, attempts):
            await asyncio.sleep(0.05)  # the outcome's batch
            await super().mark_sent(identifier, event, response_id, attempts)

    def of(dims: str) -> ClosedWindow:
        return replace(window(quantity="2"), dimensions_key=dims)  # one minute, equal values

    async def later(delay: float, coro):
        await asyncio.sleep(delay)
        return await coro

    t = FakeTime()
    ledger, provider = SlowToRecord(t), SummingProvider(one_call_per_key=False, delay=0.05)
    d = concurrent_deliverer(provider, ledger, t)
    provider.script = [ProviderError("unavailable", status=503, retryable=True)] * 2
    [a] = run(d.on_window(of('{"d":"a"}')))
    t.now += 1  # past the key's back-off
    [b] = run(d.on_window(of('{"d":"b"}')))
    assert isinstance(a, Retry) and isinstance(b, Retry)
    t.now += DAY + 60  # both first tried more than a day ago

    async def both() -> list:
        # a fresh call of the key under way while a's check starts; b's check while a's call is
        # accepted but not yet recorded
        return await asyncio.gather(
            d.on_window(of('{"d":"c"}')), later(0.06, d.on_retry(a.identifier)), later(0.2, d.on_retry(b.identifier))
        )

    [[fresh], resent_a, resent_b] = run(both())
    assert provider.in_flight_at_checks == [0, 0], (fresh, resent_a, resent_b, ledger.checks)
    assert all(isinstance(o, Sent) and o.response_id != "found-at-provider" for o in (fresh, resent_a, resent_b)), (
        fresh,
        resent_a,
        resent_b,
        ledger.checks,
    )
    assert sorted(e.identifier for e in provider.accepted) == sorted([fresh.identifier, a.identifier, b.identifier])
    assert d.gate.locks == {} and d.gate.calling == {}


def test_provider_totals_verdicts_and_the_summary_range():
    """found / absent / ambiguous from the provider's total, with a tolerance for its float; ranges on minute boundaries."""

    def verdict(total: str, ledger: str = "10", value: str = "2.5") -> str:
        return judge_provider_totals(ProviderTotals(0, 60, Decimal(total), Decimal(ledger), Decimal(value)))[0]

    assert verdict("12.5") == "found" and verdict("12.5000000001") == "found"
    assert verdict("10") == "absent" and verdict("11") == "ambiguous"
    assert summary_range(window(start_ms=1_767_225_610_000)) == (1_767_225_600, 1_767_225_660)


def test_replay_refusal_names_the_dedup_window():
    """Within the dedup window a replay is safe; past it, the refusal says why and what --force does."""
    assert replay_refusal(None, NOW, timedelta(hours=24)) is None
    assert replay_refusal(NOW - timedelta(hours=23), NOW, timedelta(hours=24)) is None
    reason = replay_refusal(NOW - timedelta(hours=25), NOW, timedelta(hours=24))
    assert "more than 1d ago" in reason and "--force" in reason and "bill it twice" in reason


def test_customer_csv_import_parses_and_reports_every_problem():
    """Valid rows become mappings; empty cells, conflicting duplicates and a bad header are reasons, not crashes."""
    from billing.deliveries import CustomerMapping, parse_customer_csv

    ok, problems = parse_customer_csv(
        "tenant_id,customer_id,provider_customer_id\nt1,c1,cus_1\nt1,c2, cus_2 \nt1,c1,cus_1\n"
    )
    assert (
        ok
        == [
            CustomerMapping("t1", "c1", "cus_1"),
            CustomerMapping("t1", "c2", "cus_2"),
            CustomerMapping("t1", "c1", "cus_1"),
        ]
        and problems == []
    )
    _, problems = parse_customer_csv(
        "tenant_id,customer_id,provider_customer_id\nt1,,cus_1\nt1,c1,cus_1\nt1,c1,cus_9\n"
    )
    assert problems == ["line 2: every column needs a value", "line 4: t1/c1 is mapped twice, to cus_1 and cus_9"]
    _, problems = parse_customer_csv("tenant,customer\nt1,c1\n")
    assert problems == [
        "header must name tenant_id, customer_id, provider_customer_id; missing tenant_id, customer_id, provider_customer_id"
    ]


def test_carried_meter_bills_whole_units_and_a_retry_resends_its_fixed_value():
    """Windows of 0.4: whole values 0, 0, 1, ... adding up to floor(total); a delivery whose first call
    failed is retried with the value fixed at that first attempt, though others were fixed since."""
    provider, ledger, t, d = setup()
    provider.script = [None, ProviderError("unavailable", status=503, retryable=True)]
    starts = [START_MS - i * 60_000 for i in range(10)]
    first, second = (run(d.on_window(window(quantity="0.4", start_ms=s)))[0] for s in starts[:2])
    assert isinstance(first, Sent) and isinstance(second, Retry)
    assert [e.value for e in provider.sent] == ["0", "0"], "0.4, then 0.8: no whole unit yet"
    t.now += 60  # the key's backoff is over; the failed delivery still waits for the retry scan
    later = [run(d.on_window(window(quantity="0.4", start_ms=s)))[0] for s in starts[2:]]
    assert all(isinstance(o, Sent) for o in later)
    retried = run(d.on_retry(second.identifier))
    assert isinstance(retried, Sent) and provider.sent[-1].value == "0", "the value fixed at its first attempt"
    accepted = {e.identifier: Decimal(e.value) for e in provider.sent[:1] + provider.sent[2:]}
    assert sum(accepted.values()) == Decimal(4) == (Decimal("0.4") * 10).to_integral_value()
    assert all(v == v.to_integral_value() for v in accepted.values())


def test_carry_runs_per_customer_meter_and_month():
    """The fraction carries within one customer's meter in one month, never into another customer or month."""
    provider, ledger, _, d = setup()
    ledger.customers[("tenant-1", "cust-2")] = "cus_2"
    for customer in ("cust-1", "cust-2"):
        for i in range(2):
            run(d.on_window(window(customer=customer, quantity="0.5", start_ms=START_MS - i * 60_000)))
    assert [(e.provider_customer_id, e.value) for e in provider.sent] == [
        ("cus_1", "0"),
        ("cus_1", "1"),
        ("cus_2", "0"),
        ("cus_2", "1"),
    ]
    assert len({k[3] for k in ledger.carried}) == 1
    december = int(datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp() * 1000)
    assert billing_period_start(window(start_ms=december).window_start) != billing_period_start(
        window(start_ms=december + 60_000).window_start
    )


def test_a_window_recorded_under_an_identifier_of_an_earlier_form_keeps_it():
    """Identifiers now hash the window's end; a window the ledger recorded before that (an earlier
    release) is found by its key and span, so its retry, its replay and its corrections go out under
    the identifier the provider already has, never under a second one."""
    provider, ledger, t, d = setup()
    earlier = window(quantity="12", revision=1)
    legacy = "mf-" + str(START_MS) + "-" + "0" * 64  # any identifier the ledger holds for the window
    run(
        ledger.claim(
            replace(window_delivery(earlier, "mf"), identifier=legacy, window_identifier=legacy),
            "stripe",
            "tokens",
            retry=False,
        )
    )
    ledger.worker = "w2"  # the upgraded job's worker reads the window again
    [resent] = run(d.on_window(earlier))
    assert isinstance(resent, Sent) and provider.sent[-1].identifier == legacy
    [skipped, correction] = run(d.on_window(window(quantity="15", revision=2)))
    assert skipped == Skipped(legacy, "sent") and correction.identifier == derive_correction_identifier(legacy, 2)
    assert ledger.rows[correction.identifier]["window_identifier"] == legacy
    assert sum(Decimal(e.value) for e in provider.sent) == Decimal(15) and len(ledger.rows) == 2


def test_windows_of_two_sizes_that_start_together_are_two_deliveries():
    """After a change of event_time.window_size, the 5-minute window of 10:00 is not the 1-minute window of 10:00."""
    provider, ledger, t, d = setup()
    [one] = run(d.on_window(window(quantity="2")))
    five = replace(window(quantity="7"), window_end=from_epoch_ms(START_MS + 300_000))
    [other] = run(d.on_window(five))
    assert isinstance(one, Sent) and isinstance(other, Sent) and one.identifier != other.identifier
    assert [e.value for e in provider.sent] == ["2", "7"]


def test_a_crowded_key_parks_its_burst_and_the_other_keys_keep_flowing():
    """One customer's burst of 10 windows: its key holds 2 of the operator's slots (one calling, one
    waiting); the other 8 are recorded, leased past their expected turn and leave their slots at
    once, then wait for the key in the worker, one call at a time. Another customer's window is sent
    meanwhile; every window of the burst is sent once, each reported."""
    t = FakeTime()
    ledger = MemoryLedger(t)
    ledger.customers[("tenant-1", "cust-2")] = "cus_2"

    provider = OverlapCountingProvider(delay=0.005)
    d = concurrent_deliverer(provider, ledger, t, max_held_per_key=2)
    reported: list = []
    d.on_background_outcome = reported.append
    burst = [window(customer="cust-1", quantity="1", start_ms=START_MS + i * 60_000) for i in range(10)]

    async def together() -> tuple[list, list]:
        first = await asyncio.gather(*(d.on_window(w) for w in [*burst, window(customer="cust-2", quantity="1")]))
        leases = {
            o.identifier: ledger.rows[o.identifier]["next_attempt_at"] for [o] in first if isinstance(o, Deferred)
        }
        await d.drain()
        return [o for [o] in first], leases

    results, leases = run(together())
    sent, parked = (
        [o for o in results[:10] if isinstance(o, Sent)],
        [o for o in results[:10] if isinstance(o, Deferred)],
    )
    assert (len(sent), len(parked)) == (2, 8) and isinstance(results[10], Sent), "the other customer is not held back"
    assert all(leases[o.identifier] >= t.now + d.lease_s for o in parked), (
        "leased past the expected turn, so the retry scan leaves them be"
    )
    assert sorted(o.identifier for o in reported) == sorted(o.identifier for o in parked) and all(
        isinstance(o, Sent) for o in reported
    )
    assert sorted(e.identifier for e in provider.sent if e.provider_customer_id == "cus_1") == sorted(
        o.identifier for o in results[:10]
    ), "each once"
    assert provider.most <= 2 and d.gate.locks == {} and d.gate.users == {} and d.parked == set()


def test_a_parked_delivery_handed_out_again_waits_once():
    """The retry scan hands a parked delivery out again when its wait outlasts the lease: the
    worker extends the lease of the attempt already waiting instead of starting a second one."""
    t = FakeTime()
    ledger, provider = MemoryLedger(t), ScriptedProvider()
    d = concurrent_deliverer(provider, ledger, t, max_held_per_key=1)

    async def scenario() -> list:
        first, parked = window(quantity="1"), window(quantity="1", start_ms=START_MS + 60_000)
        async with d.gate.lock(d.key(first)):  # the key is busy
            [deferred] = await d.on_window(parked)
            again = await d.on_retry(deferred.identifier)  # handed out by the scan meanwhile
            assert isinstance(again, Deferred) and len(d.parked) == 1, "one waiting attempt"
        await d.drain()
        return [e.identifier for e in provider.sent]

    sent = run(scenario())
    assert len(sent) == 1 and d.parked_ids == set()


# -- windows delivered together (Deliverer.on_windows, the v2 stream's path) -------------------------
@dataclass
class StreamLikeProvider(ScriptedProvider):
    """Takes a key's calls at once and paces its own requests (as the v2 stream); refuses by customer."""

    one_call_per_key: bool = False
    refuse: dict[str, ProviderError] = field(default_factory=dict)

    async def send(self, event: MeterEvent) -> str:
        self.sent.append(event)
        if event.provider_customer_id in self.refuse:
            raise self.refuse[event.provider_customer_id]
        return f"req_{event.identifier}"

    def pace_requests(self, rate, sleep) -> bool:
        return True


def _stream_setup() -> tuple[StreamLikeProvider, MemoryLedger, FakeTime, Deliverer]:
    t = FakeTime()
    provider, ledger = StreamLikeProvider(), MemoryLedger(t)
    ledger.customers.update({("tenant-1", f"cust-{i}"): f"cus_{i}" for i in range(1, 8)})
    provider.refuse = {
        "cus_3": ProviderError("unavailable", status=503, retryable=True),
        "cus_4": ProviderError("bad value", status=400, retryable=False),
    }
    return provider, ledger, t, deliverer(provider, ledger, t)


def _mixed_windows(t: FakeTime, d: Deliverer) -> list[ClosedWindow]:
    """Recorded first, a day and more ago: a sent window, a sent one published again with another final,
    and one whose first call failed (so it is past the dedup window now); then the windows of every fate."""
    t.now -= DAY + 3600
    earlier = START_MS - int(DAY + 3600) * 1000
    sent_before = window("cust-2", "api_calls", "3", earlier)
    outcomes = [run(d.on_window(w)) for w in (sent_before, window("cust-2", "api_calls", "4", earlier - 60_000))]
    assert [type(o) for [o] in outcomes] == [Sent, Sent]
    d.provider.refuse["cus_6"] = ProviderError("unavailable", status=503, retryable=True)
    [failed] = run(d.on_window(window("cust-6", "api_calls", "6", earlier - 120_000)))
    assert isinstance(failed, Retry)
    del d.provider.refuse["cus_6"]
    t.now += DAY + 3600
    return [
        window("cust-1", "tokens", "2.5"),  # carried
        window("cust-2", "api_calls", "1.2"),  # rounded up
        window("cust-3", "api_calls", "5"),  # the provider answers 503
        window("cust-4", "api_calls", "5"),  # the provider refuses it
        window("cust-9", "api_calls", "5"),  # no customer mapped
        window("cust-1", "api_calls", "5", START_MS - 60 * 86_400_000),  # older than the provider takes
        sent_before,  # sent already
        window("cust-2", "api_calls", "9", earlier - 60_000, revision=4),  # sent with 4: a correction of 5
        window("cust-5", "api_calls", "1"),
        window("cust-5", "api_calls", "2", revision=4),  # the same window again with another final, in the same batch
        window("cust-6", "api_calls", "6", earlier - 120_000),  # first tried over a day ago: the provider is asked
    ]


def _state(provider: StreamLikeProvider, ledger: MemoryLedger, outcomes: list) -> tuple:
    rows = {i: (r["status"], r["attempts"], r["value"], r.get("error")) for i, r in ledger.rows.items()}
    sent = sorted((e.identifier, e.value) for e in provider.sent)
    return rows, sent, sorted(repr(o) for o in outcomes)


def test_windows_delivered_together_end_as_they_do_one_by_one():
    """Every fate of a window (sent, carried, rounded, failed, refused, unmapped, too old, sent already,
    corrected, twice in one batch, checked past the dedup window) ends the same in the ledger, at the
    provider and in the outcomes, whether the windows come together or one at a time."""
    one_provider, one_ledger, one_t, one = _stream_setup()
    windows = _mixed_windows(one_t, one)
    one_by_one = [o for w in windows for o in run(one.on_window(w))]
    provider, ledger, t, together = _stream_setup()
    assert _mixed_windows(t, together) == windows
    together_outcomes = run(together.on_windows(windows))
    assert _state(provider, ledger, together_outcomes) == _state(one_provider, one_ledger, one_by_one)
    kinds = sorted(type(o).__name__ for o in together_outcomes)
    assert kinds == ["Dead"] * 3 + ["Retry"] + ["Sent"] * 6 + ["Skipped"] * 3
    assert one_ledger.checks and one_ledger.checks == ledger.checks, "the window past the dedup window was checked"


def test_windows_delivered_together_share_one_claim_one_carry_one_request_and_one_outcome():
    provider, ledger, t, d = _stream_setup()
    windows = [window(f"cust-{c}", "tokens", "0.7", START_MS - i * 60_000) for c in (1, 2, 5) for i in range(3)]
    outcomes = run(d.on_windows(windows))
    assert all(isinstance(o, Sent) for o in outcomes) and len(outcomes) == 9
    assert provider.requests == [9] and ledger.together == ["claim", "carry", "sent"]
    assert [e.value for e in provider.sent if e.provider_customer_id == "cus_1"] == ["0", "1", "1"], "0.7, 1.4, 2.1"


def test_a_window_whose_turn_is_taken_waits_for_it_and_a_provider_taking_turns_per_key_goes_one_by_one():
    provider, ledger, t, d = _stream_setup()

    async def overlapping() -> list:
        held = d.gate.lock(window("cust-1", "api_calls", "1").key)
        await held.__aenter__()
        together = asyncio.ensure_future(
            d.on_windows([window("cust-1", "api_calls", "1"), window("cust-2", "api_calls", "1")])
        )
        await asyncio.sleep(0.01)
        assert [e.provider_customer_id for e in provider.sent] == ["cus_2"], "the free window went; the other waits"
        await held.__aexit__(None, None, None)
        return await together

    assert all(isinstance(o, Sent) for o in run(overlapping()))
    v1, v1_ledger = ScriptedProvider(), MemoryLedger(FakeTime())
    d1 = deliverer(v1, v1_ledger, v1_ledger.t)
    assert not d1.delivers_together
    run(d1.on_windows([window(start_ms=START_MS - i * 60_000) for i in range(3)]))
    assert v1.requests == [] and len(v1.sent) == 3 and v1_ledger.together == []


@dataclass
class PausingLedger(MemoryLedger):
    """Pauses (a real sleep) in every claim of windows together, and may fail the outcome statement."""

    pause: float = 0.01
    fail_sent: bool = False

    async def claim_windows(self, deliveries, provider: str, event_names) -> list[LedgerEntry]:
        await asyncio.sleep(self.pause)
        return await super().claim_windows(deliveries, provider, event_names)

    async def mark_all_sent(self, sent) -> None:
        await asyncio.sleep(self.pause)
        if self.fail_sent:
            raise RuntimeError("the ledger's Postgres is away")
        await super().mark_all_sent(sent)


def _stream_deliverer(ledger: MemoryLedger) -> tuple[StreamLikeProvider, Deliverer]:
    provider = StreamLikeProvider()
    ledger.customers.update({("tenant-1", f"cust-{i}"): f"cus_{i}" for i in range(1, 8)})
    return provider, concurrent_deliverer(provider, ledger, ledger.t)


def test_batches_taking_each_others_turns_in_any_order_all_finish():
    """Three batches started together, [A], [A, B] and [B, A]: each takes its turns in one order, so
    none waits for a turn another holds while it holds one that one waits for."""
    ledger = PausingLedger(FakeTime())
    provider, d = _stream_deliverer(ledger)
    a, b = window("cust-1", "api_calls", "1"), window("cust-2", "api_calls", "1")

    async def three() -> list:
        return await asyncio.wait_for(
            asyncio.gather(d.on_windows([a]), d.on_windows([a, b]), d.on_windows([b, a])), timeout=5
        )

    results = run(three())
    assert sorted(type(o).__name__ for outs in results for o in outs) == ["Sent"] * 2 + ["Skipped"] * 3
    assert len(provider.sent) == 2 and d.gate.users == {} and d.gate.calling == {}


def test_a_window_whose_key_a_check_holds_waits_for_the_check_not_the_batch():
    """Where a dedup-window check holds a key, a window of that key waits for it (KeyGate.call) while
    the rest of its batch goes at once."""
    ledger = MemoryLedger(FakeTime())
    provider, d = _stream_deliverer(ledger)
    held, free = window("cust-1", "api_calls", "1"), window("cust-2", "api_calls", "1")

    async def scenario() -> list:
        check = d.gate.lock(d.key(held))
        await check.__aenter__()  # a check of cust-1's totals is under way
        batch = asyncio.ensure_future(d.on_windows([held, free]))
        await asyncio.sleep(0.01)
        assert [e.provider_customer_id for e in provider.sent] == ["cus_2"], "only the free key's window went"
        await check.__aexit__(None, None, None)
        return await batch

    assert all(isinstance(o, Sent) for o in run(scenario()))
    assert [e.provider_customer_id for e in provider.sent] == ["cus_2", "cus_1"] and provider.requests == [1]


def test_a_batch_failing_after_its_request_leaves_no_turn_call_or_task_behind():
    """The outcomes cannot be recorded: the error reaches the caller only once every part of the
    batch is done, and the turns and the keys' calls are given back (a later check is not held up)."""
    ledger = PausingLedger(FakeTime(), fail_sent=True)
    provider, d = _stream_deliverer(ledger)
    windows = [window("cust-1", "api_calls", "1"), window("cust-9", "api_calls", "1")]  # cust-9: rejected alone

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="away"):
            await d.on_windows(windows)
        assert d.gate.users == {} and d.gate.calling == {}
        await asyncio.wait_for(d.gate.drained(("tenant-1", "cust-1", "api_calls")), timeout=1)
        assert asyncio.all_tasks() == {asyncio.current_task()}, "nothing of the batch still running"

    run(scenario())
    assert ledger.rows[window_delivery(windows[1], "mf").identifier]["status"] == "dead"
