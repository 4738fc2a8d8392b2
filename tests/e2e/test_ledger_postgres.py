"""The delivery ledger on the real Postgres: states, the never-leave-sent guard, and the replay path."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal

import pytest

from sinks.billing import ClosedWindow, Dead, Deliverer, MeterEvent, Sent, Skipped
from sinks.ledger import PostgresLedger, apply_billing_schema, fetch_deliveries, map_customer
from sinks.stripe_provider import StripeMeterEvents
from tests.support.fake_stripe import FakeStripe

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def ledger_cfg(e2e_stack):
    run = uuid.uuid4().hex[:6]
    cfg, _ = e2e_stack.config(f"ledger-{run}", billing={"enabled": True, "ledger_table": f"deliveries_{run}", "customers_table": f"customers_{run}"})
    apply_billing_schema(cfg)
    apply_billing_schema(cfg)  # idempotent
    return cfg


def _window(quantity: str = "5.5") -> ClosedWindow:
    start = (int(time.time()) - 3600) * 1000
    return ClosedWindow("t1", "c1", "tokens", "{}", start, start + 10_000, Decimal(quantity), 4, 4)


def test_states_and_the_sent_guard(ledger_cfg):
    """pending -> failed -> sent; a sent row keeps its status and value whatever a late writer does."""
    ledger = PostgresLedger(ledger_cfg)
    w = _window()
    entry = ledger.begin(w, "id-1", "stripe", "tokens")
    assert (entry.status, entry.attempts) == ("pending", 0)
    ledger.mark_failed("id-1", 1, "503: unavailable")
    assert ledger.begin(w, "id-1", "stripe", "tokens").status == "failed"
    ledger.mark_sent("id-1", MeterEvent("id-1", "tokens", "cus_1", "5.5", w.window_start_ms // 1000), "req_1", 2)
    ledger.mark_dead("id-1", 3, "a late writer")
    ledger.begin(_window("99"), "id-1", "stripe", "tokens")
    [row] = fetch_deliveries(ledger_cfg)
    assert (row.status, row.attempts, row.quantity, row.value, row.provider_response_id, row.last_error) == ("sent", 2, Decimal("5.5"), "5.5", "req_1", None)
    assert row.sent_at is not None and row.window_start.year >= 2026
    ledger.close()


def test_dead_letter_then_replay_after_mapping_through_the_sdk(ledger_cfg):
    """Unmapped: dead without a call. Mapped, replayed: one accepted event with the same identifier."""
    fake = FakeStripe().start()
    try:
        cfg = ledger_cfg.model_copy(update={"stripe": ledger_cfg.stripe.model_copy(update={"api_base": fake.url})})
        ledger = PostgresLedger(cfg)
        deliverer = Deliverer(cfg, StripeMeterEvents(cfg), ledger, clock=time.time, sleep=time.sleep)
        dead = deliverer.deliver(_window())
        assert isinstance(dead, Dead) and fake.requests == []
        assert fetch_deliveries(cfg, ("dead",))[0].last_error.startswith("no billing customer mapped")
        map_customer(cfg, "t1", "c1", "cus_1")
        assert isinstance(deliverer.deliver(_window()), Skipped), "the job itself leaves dead letters alone"
        sent = deliverer.deliver(_window(), replay=True)
        assert isinstance(sent, Sent) and list(fake.accepted) == [sent.identifier]
        assert fake.accepted[sent.identifier].value == Decimal("5.5") and fake.accepted[sent.identifier].customer == "cus_1"
        ledger.close()
    finally:
        fake.stop()
