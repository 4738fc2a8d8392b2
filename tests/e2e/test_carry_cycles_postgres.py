"""The carry of whole-number meters follows each customer's billing cycle, on the real Postgres.

The SQL period function the carry statement groups by equals ``BillingCycle.period_of`` over a
year of instants in timezones with whole, half and quarter hour offsets and daylight saving (at
midnight too: midnight skipped, and midnight twice), for
calendar and anniversary cycles (the last day of a short month included). A customer billed from
the 15th in Paris carries a fraction across the calendar month's end within one period, where a
calendar customer's is left at the month's end; reconcile judges each by its own periods.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner

from billing.deliveries import ClosedWindow, window_delivery
from billing.reconcile import value_discrepancies
from meterflow.billing_cycle import BillingCycle
from meterflow.commands import cli
from meterflow.serve.usage_reader import set_cycle
from sinks.carry_schema import period_function
from sinks.ledger import apply_billing_schema, fetch_reconciliation_input
from sinks.ledger_async import AsyncPostgresLedger
from sinks.postgres import apply_schema, connect
from tests.e2e.helpers import closed_window, write_final_rows

pytestmark = [pytest.mark.e2e]

# Havana and Santiago change their clocks at midnight: local midnight skipped, and twice.
ZONES = (
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "Pacific/Auckland",
    "America/Havana",
    "America/Santiago",
)
ANCHORS = (None, 1, 15, 29, 31)


@pytest.fixture
def cfg(e2e_stack):
    run = uuid.uuid4().hex[:6]
    # A usage table of its own too: the final rows written below must not reach other tests' tables.
    cfg, path = e2e_stack.config(
        f"carry-{run}",
        postgres={**e2e_stack.base["postgres"], "usage_table": f"usage_carry_{run}"},
        billing={
            "enabled": True,
            "ledger_table": f"deliveries_{run}",
            "customers_table": f"customers_{run}",
            "carry_table": f"carry_{run}",
            "cycles_table": f"cycles_{run}",
        },
    )
    apply_schema(cfg.postgres)
    apply_billing_schema(cfg)
    return cfg, path


def test_the_sql_period_is_the_billing_cycles(cfg):
    cfg, _ = cfg
    instants = [datetime(2025, 1, 1) + timedelta(hours=7, minutes=13) * i for i in range(2500)]
    f = period_function(cfg.billing.carry_table)
    with connect(cfg.postgres) as conn:
        for zone in ZONES:
            for anchor in ANCHORS:
                got = [
                    row[0]
                    for row in conn.execute(
                        f"SELECT {f}(ws, %s, %s) FROM unnest(%s::timestamp[]) WITH ORDINALITY AS u(ws, n) ORDER BY n",
                        (anchor, zone, instants),
                    )
                ]
                cycle = BillingCycle(anchor, zone)
                want = [cycle.period_of(i)[0] for i in instants]
                assert got == want, (
                    zone,
                    anchor,
                    next(i for i, g, w in zip(instants, got, want, strict=True) if g != w),
                )


def _delivery(customer: str, start: datetime, quantity: str):
    ms = int(start.replace(tzinfo=UTC).timestamp() * 1000)
    return window_delivery(
        ClosedWindow.from_fields(("t", customer, "tokens", "{}", ms, ms + 60_000, Decimal(quantity), 1, 1)), "mf"
    )


def test_a_fraction_is_carried_within_the_customers_own_period(cfg):
    cfg, path = cfg
    set_cycle(cfg, "t", "anniv", BillingCycle(15, "Europe/Paris"))
    # 0.6 on the last minute of November and 0.6 on the first of December (UTC): one anniversary
    # period (Nov 15 to Dec 15, Paris), two calendar months.
    minutes = (datetime(2026, 11, 30, 22, 0), datetime(2026, 12, 1, 0, 0))

    async def carry() -> dict[str, list[Decimal]]:
        ledger = AsyncPostgresLedger(cfg, "w1", connections=1)
        values: dict[str, list[Decimal]] = {}
        try:
            for customer in ("anniv", "calendar"):
                for start in minutes:
                    entry = await ledger.claim(_delivery(customer, start, "0.6"), "stripe", "tokens", retry=False)
                    values.setdefault(customer, []).append(await ledger.carry_value(entry.identifier))
        finally:
            await ledger.close()
        return values

    values = asyncio.run(carry())
    assert values == {"anniv": [Decimal(0), Decimal(1)], "calendar": [Decimal(0), Decimal(0)]}
    found = fetch_reconciliation_input(cfg, timedelta(0))
    assert found.cycles == {("t", "anniv"): BillingCycle(15, "Europe/Paris")}
    assert value_discrepancies(found.ledger, {"tokens": "carry"}, found.cycles) == []
    # Judged by calendar months, the anniversary customer's period looks wrong: its cycle is what counts.
    [misjudged] = value_discrepancies(found.ledger, {"tokens": "carry"})
    assert misjudged.customer_id == "anniv"

    # `meterflow reconcile` totals each customer per its own period (the deliveries are still
    # pending: not billed yet, so it exits 1 and lists them).
    write_final_rows(
        cfg,
        [
            closed_window("t", customer, "tokens", start, timedelta(minutes=1), "0.6", 1)
            for customer in ("anniv", "calendar")
            for start in minutes
        ],
    )
    result = CliRunner().invoke(
        cli, ["--config", str(path), "reconcile", "--tenant", "t", "--grace", "0s", "--format", "json"]
    )
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert [(p["customer_id"], p["period"], p["windows"], Decimal(p["final_quantity"])) for p in report["periods"]] == [
        ("anniv", "2026-11-15/2026-12-15 Europe/Paris", 2, Decimal("1.2")),
        ("calendar", "2026-11", 1, Decimal("0.6")),
        ("calendar", "2026-12", 1, Decimal("0.6")),
    ]
    assert {d["kind"] for d in report["discrepancies"]} == {"not billed"} and len(report["discrepancies"]) == 4
    by_day = CliRunner().invoke(
        cli,
        ["--config", str(path), "reconcile", "--tenant", "t", "--grace", "0s", "--format", "json", "--period", "day"],
    )
    assert [(p["customer_id"], p["period"]) for p in json.loads(by_day.stdout)["periods"]] == [
        ("anniv", "2026-11-30 Europe/Paris"),
        ("anniv", "2026-12-01 Europe/Paris"),
        ("calendar", "2026-11-30"),
        ("calendar", "2026-12-01"),
    ]
