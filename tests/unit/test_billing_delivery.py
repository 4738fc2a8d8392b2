"""The billing core's decisions: send once, skip what the ledger has, retry, dead-letter, rate-limit.

The ledger here is an in-memory implementation of the Ledger protocol (the Postgres one is
exercised end to end); the provider is scripted. Clock and sleep are a fake pair: no real waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from meterflow.config import JobConfig
from meterflow.errors import ProviderError
from sinks.billing import ClosedWindow, Dead, Deliverer, LedgerEntry, MeterEvent, Retry, Sent, Skipped, build_meter_event

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
START_MS = int((NOW - timedelta(hours=1)).timestamp() * 1000)


def window(customer: str = "cust-1", meter: str = "tokens", quantity: str = "12.500", start_ms: int = START_MS) -> ClosedWindow:
    return ClosedWindow("tenant-1", customer, meter, "{}", start_ms, start_ms + 60_000, Decimal(quantity), 3, 3)


@dataclass
class MemoryLedger:
    rows: dict[str, dict] = field(default_factory=dict)
    customers: dict[tuple[str, str], str] = field(default_factory=lambda: {("tenant-1", "cust-1"): "cus_1"})

    def begin(self, w: ClosedWindow, identifier: str, provider: str, event_name: str) -> LedgerEntry:
        row = self.rows.setdefault(identifier, {"status": "pending", "attempts": 0, "quantity": w.quantity})
        return LedgerEntry(identifier, row["status"], row["attempts"])

    def provider_customer(self, tenant_id: str, customer_id: str, provider: str) -> str | None:
        return self.customers.get((tenant_id, customer_id))

    def mark_sent(self, identifier: str, event: MeterEvent, response_id: str, attempts: int) -> None:
        self.rows[identifier].update(status="sent", attempts=attempts, value=event.value, response=response_id)

    def mark_failed(self, identifier: str, attempts: int, error: str) -> None:
        self.rows[identifier].update(status="failed", attempts=attempts, error=error)

    def mark_dead(self, identifier: str, attempts: int, reason: str) -> None:
        self.rows[identifier].update(status="dead", attempts=attempts, error=reason)


@dataclass
class ScriptedProvider:
    """Answers from a script: an exception to raise, or None for success."""

    script: list[ProviderError | None] = field(default_factory=list)
    sent: list[MeterEvent] = field(default_factory=list)
    name: str = "stripe"

    def send(self, event: MeterEvent) -> str:
        self.sent.append(event)
        answer = self.script.pop(0) if self.script else None
        if answer is not None:
            raise answer
        return f"req_{len(self.sent)}"


class FakeTime:
    def __init__(self) -> None:
        self.now, self.slept = NOW.timestamp(), []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def deliverer(provider: ScriptedProvider, ledger: MemoryLedger, t: FakeTime, share: int = 1, **billing) -> Deliverer:
    cfg = JobConfig.model_validate({"billing": {"enabled": True, **billing}, "meters": [{"name": "tokens"}, {"name": "api_calls", "billing_event_name": "api_requests", "billing_rounding": "ceil"}]})
    return Deliverer(cfg, provider, ledger, clock=t.clock, sleep=t.sleep, rng=lambda: 1.0, share=share)


def test_sends_once_and_a_replayed_window_is_skipped():
    """A window is sent once; re-emitted after a failover, the ledger says sent and the provider is not called."""
    provider, ledger, t = ScriptedProvider(), MemoryLedger(), FakeTime()
    d = deliverer(provider, ledger, t)
    first = d.attempt(window())
    assert isinstance(first, Sent) and first.attempts == 1
    assert provider.sent == [MeterEvent(first.identifier, "tokens", "cus_1", "12.5", START_MS // 1000)]
    assert isinstance(d.attempt(window()), Skipped)
    assert len(provider.sent) == 1 and ledger.rows[first.identifier]["status"] == "sent"


def test_a_pending_delivery_is_resent_with_the_same_identifier():
    """Crash between the call and the ledger update: the resend carries the same identifier (the provider dedups)."""
    provider, ledger, t = ScriptedProvider(), MemoryLedger(), FakeTime()
    d = deliverer(provider, ledger, t)
    ledger.begin(window(), d.identifier(window()), "stripe", "tokens")  # pending, as a crash leaves it
    outcome = d.attempt(window())
    assert isinstance(outcome, Sent) and provider.sent[0].identifier == d.identifier(window())


def test_retryable_errors_back_off_honouring_retry_after_then_succeed():
    """429 with Retry-After and a 5xx are retried; delays honour Retry-After; attempts are counted."""
    script = [ProviderError("slow down", status=429, retryable=True, retry_after=7), ProviderError("oops", status=500, retryable=True)]
    provider, ledger, t = ScriptedProvider(script), MemoryLedger(), FakeTime()
    d = deliverer(provider, ledger, t, initial_backoff="1s", max_backoff="30s")
    outcome = d.deliver(window())
    assert isinstance(outcome, Sent) and outcome.attempts == 3
    assert t.slept[0] >= 7  # Retry-After wins over the (smaller) backoff
    assert t.slept[1] == pytest.approx(2.0)  # second attempt: 1 s * 2^1 with full jitter at its maximum
    assert ledger.rows[outcome.identifier]["attempts"] == 3


def test_gives_up_after_max_attempts_into_the_dead_letter_state():
    """Bounded attempts: the last failure makes the delivery dead, with the reason."""
    script = [ProviderError("unavailable", status=503, retryable=True)] * 3
    provider, ledger, t = ScriptedProvider(script), MemoryLedger(), FakeTime()
    outcome = deliverer(provider, ledger, t, max_attempts=3).deliver(window())
    assert isinstance(outcome, Dead) and "gave up after 3 attempts" in outcome.reason and "503" in outcome.reason
    assert ledger.rows[outcome.identifier]["status"] == "dead" and len(provider.sent) == 3


def test_a_refusal_is_dead_at_once():
    """A 4xx other than 408/409/425/429 will not succeed by retrying."""
    provider, ledger, t = ScriptedProvider([ProviderError("No such customer", status=400, retryable=False)]), MemoryLedger(), FakeTime()
    outcome = deliverer(provider, ledger, t).attempt(window())
    assert isinstance(outcome, Dead) and "provider refused the event: 400" in outcome.reason and len(provider.sent) == 1


def test_timeouts_are_retried_as_unknown_outcomes():
    """A timeout (no status) is retried: the identifier makes the resend safe."""
    provider, ledger, t = ScriptedProvider([ProviderError("timed out", status=None, retryable=True)]), MemoryLedger(), FakeTime()
    first = deliverer(provider, ledger, t).attempt(window())
    assert isinstance(first, Retry) and "no response" in first.error and ledger.rows[first.identifier]["status"] == "failed"


def test_unmapped_customer_is_dead_without_a_call_and_replays_after_mapping():
    """No billing customer: dead letter with the reason; after mapping, replay sends it once."""
    provider, ledger, t = ScriptedProvider(), MemoryLedger(), FakeTime()
    d = deliverer(provider, ledger, t)
    dead = d.attempt(window(customer="cust-9"))
    assert isinstance(dead, Dead) and "no billing customer mapped" in dead.reason and provider.sent == []
    assert isinstance(d.attempt(window(customer="cust-9")), Skipped), "the job does not retry dead letters by itself"
    ledger.customers[("tenant-1", "cust-9")] = "cus_9"
    assert isinstance(d.deliver(window(customer="cust-9"), replay=True), Sent) and len(provider.sent) == 1


@pytest.mark.parametrize(("age", "reason"), [(timedelta(days=36), "35 days"), (-timedelta(hours=1), "future")])
def test_windows_outside_the_provider_range_never_reach_the_api(age, reason):
    """Older than 35 days or in the future: dead with that reason, no call."""
    provider, ledger, t = ScriptedProvider(), MemoryLedger(), FakeTime()
    start_ms = int((NOW - age).timestamp() * 1000)
    outcome = deliverer(provider, ledger, t).attempt(window(start_ms=start_ms))
    assert isinstance(outcome, Dead) and reason in outcome.reason and provider.sent == []


def test_meter_mapping_event_name_and_rounding():
    """meter -> event name from config; a whole-number meter rounds as configured; unknown meters are dead."""
    event = build_meter_event(window(meter="api_calls", quantity="2.100"), "id", JobConfig.model_validate({"meters": [{"name": "api_calls", "billing_event_name": "api_requests", "billing_rounding": "ceil"}]}).meter("api_calls"), "cus_1", NOW, timedelta(days=35), timedelta(minutes=5))
    assert (event.event_name, event.value) == ("api_requests", "3")
    provider, ledger, t = ScriptedProvider(), MemoryLedger(), FakeTime()
    outcome = deliverer(provider, ledger, t).attempt(window(meter="gpu_seconds"))
    assert isinstance(outcome, Dead) and "not configured for billing" in outcome.reason


def test_rate_limit_spreads_calls_and_is_shared_by_subtasks():
    """calls_per_second is for the whole job: each of two subtasks gets half, enforced by sleeping."""
    provider, ledger, t = ScriptedProvider(), MemoryLedger(), FakeTime()
    d = deliverer(provider, ledger, t, share=2, calls_per_second=4)
    for i in range(6):
        d.attempt(window(start_ms=START_MS + i * 60_000))
    # 2 calls/s per subtask with a burst of 2: four of the six calls wait 0.5 s each.
    assert sum(t.slept) == pytest.approx(2.0)
    assert len(provider.sent) == 6


def test_customer_csv_import_parses_and_reports_every_problem():
    """Valid rows become mappings; empty cells, conflicting duplicates and a bad header are reasons, not crashes."""
    from sinks.billing import CustomerMapping, parse_customer_csv

    ok, problems = parse_customer_csv("tenant_id,customer_id,provider_customer_id\nt1,c1,cus_1\nt1,c2, cus_2 \nt1,c1,cus_1\n")
    assert ok == [CustomerMapping("t1", "c1", "cus_1"), CustomerMapping("t1", "c2", "cus_2"), CustomerMapping("t1", "c1", "cus_1")] and problems == []
    _, problems = parse_customer_csv("tenant_id,customer_id,provider_customer_id\nt1,,cus_1\nt1,c1,cus_1\nt1,c1,cus_9\n")
    assert problems == ["line 2: every column needs a value", "line 4: t1/c1 is mapped twice, to cus_1 and cus_9"]
    _, problems = parse_customer_csv("tenant,customer\nt1,c1\n")
    assert problems == ["header must name tenant_id, customer_id, provider_customer_id; missing tenant_id, customer_id, provider_customer_id"]
