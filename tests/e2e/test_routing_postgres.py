"""Routing on the real Postgres: each window's destination from the ledger and the mappings, the
rules of a move through ``meterflow billing customers``, and late-event corrections that follow
their window to the destination that billed it."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner

from billing.deliveries import ClosedWindow, window_delivery
from meterflow.commands import cli
from meterflow.corrections import Correction, WindowId
from sinks.corrections_store import owe_delivery
from sinks.ledger import apply_billing_schema, fetch_customers
from sinks.ledger_async import AsyncPostgresLedger
from sinks.postgres import connect

pytestmark = [pytest.mark.e2e]

# The start of this month, and windows either side of it.
MONTH = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
BEFORE, AFTER = MONTH - timedelta(minutes=1), MONTH


@pytest.fixture
def routed_cfg(e2e_stack):
    run = uuid.uuid4().hex[:6]
    cfg, path = e2e_stack.config(
        f"routing-{run}",
        billing={
            "enabled": True,
            "ledger_table": f"deliveries_{run}",
            "customers_table": f"customers_{run}",
            "carry_table": f"carry_{run}",
            "destinations": {
                "metronome": {"api_base": "http://127.0.0.1:9"},
                "chargebee": {"api_base": "http://127.0.0.1:9"},
            },
        },
    )
    apply_billing_schema(cfg)
    return cfg, path


def _window(customer: str, start: datetime, meter: str = "tokens") -> ClosedWindow:
    ms = int(start.timestamp() * 1000)
    return ClosedWindow.from_fields(("t1", customer, meter, "{}", ms, ms + 60_000, Decimal(3), 1, 1))


def _customers(path, *args: str):
    return CliRunner().invoke(cli, ["--config", str(path), "billing", "customers", *args])


def test_each_window_goes_to_the_mapping_in_effect_at_its_start_and_stays_where_it_was_recorded(routed_cfg):
    cfg, path = routed_cfg
    assert _customers(path, "set", "t1", "c1", "cus_1").exit_code == 0
    assert _customers(path, "set", "t1", "c2", "cb-sub-2", "--destination", "chargebee").exit_code == 0
    moved = _customers(path, "set", "t1", "c1", "m-1", "--destination", "metronome", "--from", f"{MONTH:%Y-%m-%d}")
    assert moved.exit_code == 0, moved.output

    async def scenario() -> None:
        ledger = AsyncPostgresLedger(cfg, "w1", connections=1)
        try:
            windows = [_window("c1", BEFORE), _window("c1", AFTER), _window("c2", AFTER), _window("c9", AFTER)]
            assert await ledger.destinations_of(windows) == ["stripe", "metronome", "chargebee", "stripe"]
            # A window recorded at Stripe stays there whatever the mappings say now.
            recorded = window_delivery(_window("c9", AFTER), "mf")
            metronome = AsyncPostgresLedger(cfg, "w1", connections=1, provider="metronome")
            await metronome.claim(recorded, "metronome", "tokens", retry=False)
            await metronome.close()
            assert await ledger.destinations_of([_window("c9", AFTER)]) == ["metronome"]
            assert await ledger.destinations_of_deliveries([recorded.identifier, "unknown"]) == {
                recorded.identifier: "metronome"
            }
        finally:
            await ledger.close()

    asyncio.run(scenario())
    listed = {(t, c, d): (there, since) for t, c, d, there, since in fetch_customers(cfg)}
    assert listed[("t1", "c1", "metronome")] == ("m-1", MONTH.replace(tzinfo=None))
    assert listed[("t1", "c1", "stripe")] == ("cus_1", None)


def test_a_move_is_refused_into_a_month_the_ledger_billed_already_and_writes_nothing(routed_cfg):
    cfg, path = routed_cfg
    assert _customers(path, "set", "t1", "c1", "cus_1").exit_code == 0

    async def record(start: datetime) -> None:
        ledger = AsyncPostgresLedger(cfg, "w1", connections=1)
        await ledger.claim(window_delivery(_window("c1", start), "mf"), "stripe", "tokens", retry=False)
        await ledger.close()

    asyncio.run(record(BEFORE))  # one minute before the month: the month is still free
    ok = _customers(path, "set", "t1", "c1", "m-1", "--destination", "metronome", "--from", f"{MONTH:%Y-%m-%d}")
    assert ok.exit_code == 0, ok.output
    asyncio.run(record(AFTER))  # a window of the month reached the ledger (at the start of the month)
    late = _customers(path, "set", "t1", "c1", "cb-1", "--destination", "chargebee", "--from", f"{MONTH:%Y-%m-%d}")
    assert late.exit_code == 1
    assert "the ledger holds a window of this customer from" in str(late.exception)
    for args, reason in [
        (("--destination", "chargebee"), "billed at metronome, stripe: moving them to chargebee"),
        (("--destination", "recurly", "--from", f"{MONTH:%Y-%m-%d}"), "'recurly' is not declared"),
        (("--destination", "chargebee", "--from", f"{MONTH:%Y-%m}-02"), "at the start of a UTC month"),
    ]:
        refused = _customers(path, "set", "t1", "c1", "cb-1", *args)
        assert refused.exit_code == 1 and reason in str(refused.exception), refused.exception
    assert {d for _, c, d, _, _ in fetch_customers(cfg) if c == "c1"} == {"stripe", "metronome"}


def test_a_late_events_correction_goes_where_its_window_was_billed(routed_cfg):
    cfg, path = routed_cfg
    assert _customers(path, "set", "t1", "c1", "cb-1", "--destination", "chargebee").exit_code == 0
    billed_at_metronome = _window("c1", BEFORE)

    async def record() -> None:
        ledger = AsyncPostgresLedger(cfg, "w1", connections=1, provider="metronome")
        await ledger.claim(window_delivery(billed_at_metronome, "mf"), "metronome", "tokens", retry=False)
        await ledger.close()

    asyncio.run(record())

    def correction(w: ClosedWindow, cid: str) -> Correction:
        naive = WindowId(
            "t1", w.customer_id, "tokens", "{}", w.window_start.replace(tzinfo=None), w.window_end.replace(tzinfo=None)
        )
        return Correction(cid, naive, Decimal(2), 2, "applied", "late events")

    with connect(cfg.postgres) as conn, conn.transaction():
        owe_delivery(conn, cfg, correction(billed_at_metronome, "corr-recorded"))
        owe_delivery(conn, cfg, correction(_window("c1", AFTER - timedelta(hours=1)), "corr-mapped"))
        rows = dict(
            conn.execute(
                f"SELECT correction_id, provider FROM {cfg.billing.ledger_table} WHERE kind = 'correction'"
            ).fetchall()
        )
    assert rows == {"corr-recorded": "metronome", "corr-mapped": "chargebee"}


def test_windows_refused_for_want_of_a_mapping_go_to_the_destination_the_customer_is_then_mapped_at(routed_cfg):
    """Dead at Stripe for want of any mapping, never sent: mapped at Metronome, they are Metronome's
    to bill on replay; a new id at Metronome after a move keeps the month the move took effect."""
    cfg, path = routed_cfg
    unmapped = window_delivery(_window("c7", BEFORE), "mf")
    sent_elsewhere = window_delivery(_window("c7", BEFORE - timedelta(minutes=1)), "mf")

    async def record() -> None:
        ledger = AsyncPostgresLedger(cfg, "w1", connections=1)
        await ledger.claim(unmapped, "stripe", "tokens", retry=False)
        await ledger.mark_rejected(unmapped.identifier, "no billing customer mapped for tenant 't1', customer 'c7'")
        await ledger.claim(sent_elsewhere, "stripe", "tokens", retry=False)
        await ledger.mark_dead(sent_elsewhere.identifier, 3, "gave up after 3 attempts: 503")
        await ledger.close()

    asyncio.run(record())
    assert _customers(path, "set", "t1", "c7", "m-7", "--destination", "metronome").exit_code == 0
    with connect(cfg.postgres) as conn:
        rows = dict(conn.execute(f"SELECT identifier, provider FROM {cfg.billing.ledger_table}").fetchall())
    assert rows == {unmapped.identifier: "metronome", sent_elsewhere.identifier: "stripe"}, (
        "only what no destination was ever asked to bill moves"
    )
    # A move, then a corrected id at the new destination: the month stays.
    assert _customers(path, "set", "t1", "c8", "cus_8").exit_code == 0
    assert (
        _customers(
            path, "set", "t1", "c8", "m-8", "--destination", "metronome", "--from", f"{MONTH:%Y-%m-%d}"
        ).exit_code
        == 0
    )
    fixed = _customers(path, "set", "t1", "c8", "m-8-fixed", "--destination", "metronome")
    assert fixed.exit_code == 0, fixed.exception
    listed = {(c, d): (there, since) for _, c, d, there, since in fetch_customers(cfg)}
    assert listed[("c8", "metronome")] == ("m-8-fixed", MONTH.replace(tzinfo=None))
