"""The billing job's ledger-backlog gauges count what the real ledger holds: pending and failed deliveries of the provider."""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal

import pytest

from billing.deliveries import ClosedWindow, MeterEvent, window_delivery
from jobs.billing_operator import backlog_sql
from sinks.ledger import apply_billing_schema
from sinks.ledger_async import AsyncPostgresLedger
from sinks.postgres import connect

pytestmark = [pytest.mark.e2e]


def _window(customer: str) -> ClosedWindow:
    start = (int(time.time()) - 3600) * 1000
    return ClosedWindow.from_fields(("t1", customer, "tokens", "{}", start, start + 10_000, Decimal(2), 1, 1))


def test_backlog_counts_pending_and_failed(e2e_stack):
    run = uuid.uuid4().hex[:6]
    cfg, _ = e2e_stack.config(
        f"backlog-{run}",
        billing={
            "enabled": True,
            "ledger_table": f"deliveries_{run}",
            "customers_table": f"customers_{run}",
            "carry_table": f"carry_{run}",
        },
    )
    apply_billing_schema(cfg)

    def backlog() -> tuple[int, int]:
        with connect(cfg.postgres) as conn:
            return tuple(
                conn.execute(
                    backlog_sql(cfg.billing.ledger_table), {"destinations": list(cfg.billing.destination_names())}
                ).fetchone()
            )

    assert backlog() == (0, 0)

    async def scenario() -> None:
        ledger = AsyncPostgresLedger(cfg, "w1", connections=1)
        pending, failed, sent, dead = (window_delivery(_window(c), "mf") for c in ("c1", "c2", "c3", "c4"))
        for d in (pending, failed, sent, dead):
            await ledger.claim(d, cfg.billing.provider, "tokens", retry=False)
        await ledger.mark_failed(failed.identifier, 1, "503", 60)
        await ledger.mark_sent(sent.identifier, MeterEvent(sent.identifier, "tokens", "cus_1", "2", 0), "req_1", 1)
        await ledger.mark_dead(dead.identifier, 3, "rejected")

    asyncio.run(scenario())
    assert backlog() == (1, 1)
