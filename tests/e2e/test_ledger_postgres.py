"""The delivery ledger on the real Postgres: claims, the never-leave-sent guard, the retry queue, and
the replay command past the provider's dedup window (a ledger timestamp and the fake's clock are
moved a day on instead of waiting one)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner

from billing.deliveries import ClosedWindow, Dead, MeterEvent, Retry, window_delivery
from billing.delivery import Deliverer
from billing.whole_values import billing_period_start, carried_value
from connectors.stripe_provider import StripeMeterEvents
from meterflow.commands import cli
from sinks.carry_schema import carry_value_sql
from sinks.ledger import apply_billing_schema, fetch_deliveries, map_customer
from sinks.ledger_async import AsyncPostgresLedger, StatementBatches, due_retries, release_leases
from sinks.postgres import apply_schema, connect, fetch_usage
from sinks.postgres_schema import USAGE_KEY_COLUMNS, USAGE_WRITE_COLUMNS, usage_upsert_sql
from tests.support.fake_stripe import DROP, FakeStripe, reject

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def ledger_cfg(e2e_stack):
    run = uuid.uuid4().hex[:6]
    cfg, path = e2e_stack.config(
        f"ledger-{run}",
        billing={
            "enabled": True,
            "ledger_table": f"deliveries_{run}",
            "customers_table": f"customers_{run}",
            "carry_table": f"carry_{run}",
        },
    )
    apply_billing_schema(cfg)
    apply_billing_schema(cfg)  # idempotent
    return cfg, path


# One start for the module: a window built twice must keep its identifier even if a second ticks over between.
_START_MS = (int(time.time()) - 3600) * 1000


def _window(quantity: str = "5.5", customer: str = "c1") -> ClosedWindow:
    return ClosedWindow.from_fields(
        ("t1", customer, "tokens", "{}", _START_MS, _START_MS + 10_000, Decimal(quantity), 4, 4)
    )


def test_claims_states_and_the_sent_guard(ledger_cfg):
    """A claim records and leases; a scheduled retry is not claimed from the stream; sent never changes; the scan hands out due rows once."""
    cfg, _ = ledger_cfg

    async def scenario() -> str:
        ledger = AsyncPostgresLedger(cfg, "w1", connections=2)
        d = window_delivery(_window(), "mf")
        entry = await ledger.claim(d, "stripe", "tokens", retry=False)
        assert (entry.status, entry.attempts, entry.claimed, entry.first_attempt_at is not None) == (
            "pending",
            0,
            True,
            True,
        )
        await ledger.mark_failed(d.identifier, 1, "503: unavailable", 3600)
        assert not (await ledger.claim(d, "stripe", "tokens", retry=False)).claimed, "its retry is scheduled"
        other = AsyncPostgresLedger(cfg, "w2", connections=1)
        assert (await other.claim(d, "stripe", "tokens", retry=False)).claimed, (
            "a new worker takes over a dead worker's claim"
        )
        await ledger.mark_sent(d.identifier, MeterEvent(d.identifier, "tokens", "cus_1", "5.5", 0), "req_1", 2)
        await ledger.mark_dead(d.identifier, 3, "a late writer")
        again = await ledger.claim(window_delivery(_window("99"), "mf"), "stripe", "tokens", retry=False)
        assert (again.status, again.quantity, again.claimed) == ("sent", Decimal("5.5"), False)
        due = window_delivery(_window(customer="c2"), "mf")
        await ledger.claim(due, "stripe", "tokens", retry=False)
        await ledger.mark_failed(due.identifier, 1, "429", 0)
        with connect(cfg.postgres) as conn:
            conn.autocommit = True
            assert [r[0] for r in due_retries(conn, cfg, 10)] == [due.identifier]
            assert due_retries(conn, cfg, 10) == [], "a handed-out retry is leased"
        await ledger.close()
        await other.close()
        return d.identifier

    identifier = asyncio.run(scenario())
    # By identifier: both windows may start in the same second, and then the listing's order is the identifiers'.
    rows = {r.identifier: r for r in fetch_deliveries(cfg)}
    assert len(rows) == 2
    row = rows[identifier]
    assert (row.status, row.attempts, row.quantity, row.value, row.provider_response_id, row.last_error, row.kind) == (
        "sent",
        2,
        Decimal("5.5"),
        "5.5",
        "req_1",
        None,
        "window",
    )


def test_replay_past_the_dedup_window_needs_force_and_asks_the_provider(e2e_stack):
    """Two dead deliveries first sent 25 h ago: refused without --force; with it, the one the provider has is marked sent, the other re-sent once."""
    fake = FakeStripe().start()
    try:
        run = uuid.uuid4().hex[:6]
        billing = {
            "enabled": True,
            "ledger_table": f"deliveries_{run}",
            "customers_table": f"customers_{run}",
            "carry_table": f"carry_{run}",
            "max_attempts": 2,
            "initial_backoff": "10ms",
        }
        cfg, path = e2e_stack.config(f"dedup-{run}", billing=billing, stripe={"api_base": fake.url})
        apply_billing_schema(cfg)
        map_customer(cfg, "t1", "c1", "cus_1")
        map_customer(cfg, "t1", "c2", "cus_2")
        arrived, lost = _window("5.5", "c1"), _window("7", "c2")

        async def first_attempts() -> list:
            ledger, provider = AsyncPostgresLedger(cfg, "job"), StripeMeterEvents(cfg)
            d = Deliverer(cfg, provider, ledger, clock=time.time, sleep=asyncio.sleep)
            fake.inject(DROP, reject(503), reject(503), reject(503))  # the first call arrives unanswered, then 503s
            outcomes = []
            for w in (arrived, lost):
                [outcome] = await d.on_window(w)
                outcomes.append(await d.deliver(outcome.identifier) if isinstance(outcome, Retry) else outcome)
            await ledger.close()
            await provider.close()
            return outcomes

        outcomes = asyncio.run(first_attempts())
        assert all(isinstance(o, Dead) for o in outcomes), outcomes
        assert [e.identifier for e in fake.events] == [window_delivery(arrived, "mf").identifier]
        # A day passes: the provider forgets identifiers, and the ledger's first attempts are 25 h old.
        fake.clock = lambda: time.time() + 25 * 3600
        with connect(cfg.postgres) as conn, conn.transaction():
            conn.execute(
                f"UPDATE {cfg.billing.ledger_table} SET first_attempt_at = first_attempt_at - interval '25 hours'"
            )
        requests = len(fake.requests)

        refused = CliRunner().invoke(cli, ["--config", str(path), "billing", "replay"], catch_exceptions=False)
        said = " ".join(refused.output.split())  # the console wraps long lines
        assert refused.exit_code == 1 and said.count("refused") == 2, refused.output
        assert "no longer deduplicates" in said and "--force" in said
        assert len(fake.requests) == requests, "nothing was sent"

        forced = CliRunner().invoke(
            cli, ["--config", str(path), "billing", "replay", "--force"], catch_exceptions=False
        )
        assert forced.exit_code == 0, forced.output
        rows = {d.customer_id: d for d in fetch_deliveries(cfg)}
        assert (
            rows["c1"].status == "sent"
            and rows["c1"].provider_response_id == "found-at-provider"
            and "found at the provider" in rows["c1"].provider_check
        )
        assert rows["c2"].status == "sent" and "not at the provider" in rows["c2"].provider_check
        assert sorted(e.customer for e in fake.events) == ["cus_1", "cus_2"], "each delivery is at the provider once"
        assert fake.outcomes().get("accepted-again", 0) == 0
    finally:
        fake.stop()


def test_stripe_mock_validates_meter_events_and_summaries(e2e_stack):
    """stripe-mock checks the meter event and the event summary requests against Stripe's specification."""
    cfg, _ = e2e_stack.config("summaries", billing={"enabled": True})

    async def calls() -> tuple[str, Decimal, str]:
        provider = StripeMeterEvents(cfg)
        try:
            response = await provider.send(MeterEvent("mf-1-abc", "tokens", "cus_1", "2.5", int(time.time()) - 60))
            meters = await provider.client.v1.billing.meters.list_async({"limit": 1})
            name = meters.data[0].event_name  # stripe-mock's fixture meter
            start = int(time.time()) // 60 * 60 - 3600
            return response, await provider.total(name, "cus_1", start, start + 60), name
        finally:
            await provider.close()

    response, total, _ = asyncio.run(calls())
    assert response and isinstance(total, Decimal)


def test_concurrent_writes_share_commits_and_a_bad_statement_fails_alone(ledger_cfg):
    """Claims and outcomes of 60 concurrent deliveries go out in far fewer transactions; a failing statement in a batch fails only its caller."""
    cfg, _ = ledger_cfg

    async def deliver(ledger: AsyncPostgresLedger, customer: str) -> None:
        d = window_delivery(_window(customer=customer), "mf")
        entry = await ledger.claim(d, "stripe", "tokens", retry=False)
        assert entry.claimed
        await ledger.mark_sent(
            d.identifier, MeterEvent(d.identifier, "tokens", "cus_1", "5.5", 0), f"req_{customer}", 1
        )

    async def scenario() -> tuple[int, int, list]:
        ledger = AsyncPostgresLedger(cfg, "w1", connections=1)
        outcomes = await asyncio.gather(
            *(deliver(ledger, f"c{i}") for i in range(30)),
            ledger.batches.fetchone("SELECT 1 / 0", {}),
            *(deliver(ledger, f"c{i}") for i in range(30, 60)),
            return_exceptions=True,
        )
        await ledger.close()
        return ledger.batches.batches, ledger.batches.statements, outcomes

    batches, statements, outcomes = asyncio.run(scenario())
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failed) == 1 and "division by zero" in str(failed[0])
    assert statements == 121 and batches <= 10, (batches, statements)
    rows = fetch_deliveries(cfg)
    assert len(rows) == 60 and {r.status for r in rows} == {"sent"}
    assert {r.provider_response_id for r in rows} == {f"req_c{i}" for i in range(60)}


def test_carried_values_on_postgres_follow_the_rule_once_per_delivery(ledger_cfg):
    """The ledger's carry statement gives carried_value's values, fixes each delivery's value once (two
    workers at once included), and keeps one running total per customer, meter and month."""
    cfg, _ = ledger_cfg
    month = billing_period_start(datetime.now(UTC))
    month_ms = int(month.timestamp() * 1000)
    quantities = [Decimal(q) for q in ("0.4", "0.4", "0.4", "-0.3", "2.75", "0.000000001", "0.999999999", "-5", "0.6")]

    def delivery(i: int, quantity: Decimal, start_ms: int, customer: str = "c1"):
        return window_delivery(
            ClosedWindow.from_fields(
                ("t1", customer, "tokens", "{}", start_ms + i * 60_000, start_ms + (i + 1) * 60_000, quantity, 1, 1)
            ),
            "mf",
        )

    async def scenario() -> tuple[list[Decimal], list[Decimal], Decimal]:
        ledger, other = AsyncPostgresLedger(cfg, "w1", connections=2), AsyncPostgresLedger(cfg, "w2", connections=2)
        try:
            values = []
            for i, q in enumerate(quantities):
                d = delivery(i, q, month_ms)
                await ledger.claim(d, "stripe", "tokens", retry=False)
                # Two workers fix the same delivery at once: one adds it to the total, both get its value.
                both = await asyncio.gather(ledger.carry_value(d.identifier), other.carry_value(d.identifier))
                assert both[0] == both[1]
                values.append(both[0])
            assert await ledger.carry_value(delivery(0, quantities[0], month_ms).identifier) == values[0], "fixed once"
            # The month before, and another customer: their own totals.
            elsewhere = []
            for d in (delivery(0, Decimal("0.5"), month_ms - 120_000), delivery(0, Decimal("0.5"), month_ms, "c2")):
                await ledger.claim(d, "stripe", "tokens", retry=False)
                elsewhere.append(await ledger.carry_value(d.identifier))
            with connect(cfg.postgres) as conn:
                [total] = conn.execute(
                    f"SELECT total FROM {cfg.billing.carry_table} WHERE customer_id = 'c1' AND period_start = %s",
                    (month.replace(tzinfo=None),),
                ).fetchone()
            return values, elsewhere, total
        finally:
            await ledger.close()
            await other.close()

    values, elsewhere, total = asyncio.run(scenario())
    expected, running = [], Decimal(0)
    for q in quantities:
        expected.append(carried_value(running, q))
        running += q
    assert values == expected and total == running == sum(quantities)
    assert sum(values) == running.to_integral_value(rounding="ROUND_FLOOR")
    assert elsewhere == [Decimal(0), Decimal(0)], "0.5 in another month and for another customer carries nothing over"
    rows = {d.identifier: d for d in fetch_deliveries(cfg)}
    assert all(r.value is not None for r in rows.values())


def test_a_batch_writes_claims_carries_and_outcomes_once_each_with_the_one_by_one_results(ledger_cfg):
    """60 concurrent deliveries of carried windows (one per customer, some recorded before under an
    identifier of an earlier form): each claim, carry and outcome of a batch is one statement for all
    its callers, and every delivery gets what one-by-one statements would give it. Five deliveries of
    one running total in one batch are carried in one statement, each taking the units it completes
    in identifier order; two ledgers carrying the same two totals at once neither deadlock nor add
    anything twice."""
    cfg, _ = ledger_cfg
    start_ms = int(billing_period_start(datetime.now(UTC)).timestamp() * 1000)
    quantity = Decimal("0.7")

    def delivery(customer: str, i: int = 0):
        return window_delivery(
            ClosedWindow.from_fields(
                ("t1", customer, "tokens", "{}", start_ms + i * 60_000, start_ms + (i + 1) * 60_000, quantity, 1, 1)
            ),
            "mf",
        )

    # Three windows first recorded under another identifier: a claim finds them by key and span.
    earlier = [delivery(f"c{i}") for i in range(3)]
    with connect(cfg.postgres) as conn:
        for d in earlier:
            conn.execute(
                f"INSERT INTO {cfg.billing.ledger_table} (identifier, provider, kind, window_identifier, tenant_id, customer_id, meter, dimensions_key, "
                "window_start, window_end, quantity, event_count, revision, event_name, status) "
                "VALUES (%s, 'stripe', 'window', %s, 't1', %s, 'tokens', '{}', %s, %s, %s, 1, 1, 'tokens', 'pending')",
                (
                    f"old-{d.window.customer_id}",
                    f"old-{d.window.customer_id}",
                    d.window.customer_id,
                    d.window.window_start,
                    d.window.window_end,
                    quantity,
                ),
            )

    async def deliver(ledger: AsyncPostgresLedger, d) -> tuple[str, Decimal]:
        entry = await ledger.claim(d, "stripe", "tokens", retry=False)
        assert entry.claimed and entry.quantity == quantity
        value = await ledger.carry_value(entry.identifier)
        await ledger.mark_sent(
            entry.identifier,
            MeterEvent(entry.identifier, "tokens", "cus_1", str(value), 0),
            f"req_{entry.identifier}",
            1,
        )
        return entry.identifier, value

    async def scenario() -> tuple[list, list, StatementBatches]:
        ledger = AsyncPostgresLedger(cfg, "w1", connections=1)
        try:
            many = await asyncio.gather(*(deliver(ledger, delivery(f"c{i}")) for i in range(60)))
            # Five windows of one customer and meter at once: the same running total in one batch.
            same_total = await asyncio.gather(*(deliver(ledger, delivery("c0", i)) for i in range(1, 6)))
            return many, same_total, ledger.batches
        finally:
            await ledger.close()

    many, same_total, batches = asyncio.run(scenario())
    assert [identifier for identifier, _ in many[:3]] == ["old-c0", "old-c1", "old-c2"], (
        "claimed under the recorded identifier"
    )
    assert all(value == carried_value(Decimal(0), quantity) for _, value in many), "0.7 alone completes no unit"
    assert [value for _, value in sorted(same_total)] == [1, 1, 0, 1, 1], (
        "0.7 carried, then 1.4, 2.1, 2.8, 3.5, 4.2: the units each completes, in identifier order"
    )
    with connect(cfg.postgres) as conn:
        [total] = conn.execute(f"SELECT total FROM {cfg.billing.carry_table} WHERE customer_id = 'c0'").fetchone()
    assert total == 6 * quantity, "each quantity added once"
    assert batches.statements == 3 * 65
    assert batches.written_apart == 0, "no batch refused: one total's carries go in one statement"
    assert batches.executions <= batches.batches * 3, (batches.executions, batches.batches)
    assert batches.batches <= 15, batches.batches
    rows = {r.identifier: r for r in fetch_deliveries(cfg)}
    assert len(rows) == 65 and {r.status for r in rows.values()} == {"sent"}
    assert all(rows[i].value is not None and rows[i].provider_response_id == f"req_{i}" for i, _ in many + same_total)


def test_windows_claimed_carried_and_marked_together_on_postgres(ledger_cfg):
    """The ledger's calls for windows delivered together (Deliverer.on_windows): one claim, one carry
    and one outcome statement for all of them; a window recorded under an earlier identifier is
    claimed under it, a sent one is not claimed and reads as sent, and five windows of one running
    total take the units each completes in identifier order."""
    cfg, _ = ledger_cfg
    start_ms = int(billing_period_start(datetime.now(UTC)).timestamp() * 1000)

    def delivery(customer: str, i: int = 0):
        return window_delivery(
            ClosedWindow.from_fields(
                (
                    "t1",
                    customer,
                    "tokens",
                    "{}",
                    start_ms + i * 60_000,
                    start_ms + (i + 1) * 60_000,
                    Decimal("0.7"),
                    1,
                    1,
                )
            ),
            "mf",
        )

    earlier, sent_before = delivery("c-earlier"), delivery("c-sent")
    with connect(cfg.postgres) as conn:
        conn.execute(
            f"INSERT INTO {cfg.billing.ledger_table} (identifier, provider, kind, window_identifier, tenant_id, customer_id, meter, dimensions_key, "
            "window_start, window_end, quantity, event_count, revision, event_name, status) "
            "VALUES ('old-1', 'stripe', 'window', 'old-1', 't1', 'c-earlier', 'tokens', '{}', %s, %s, 0.7, 1, 1, 'tokens', 'pending')",
            (earlier.window.window_start, earlier.window.window_end),
        )

    async def scenario() -> tuple[list, list, list, StatementBatches]:
        ledger = AsyncPostgresLedger(cfg, "w1", connections=1)
        try:
            [first] = await ledger.claim_windows([sent_before], "stripe", ["tokens"])
            await ledger.mark_all_sent(
                [(first.identifier, MeterEvent(first.identifier, "tokens", "cus_1", "0", 0), "req_0", 1)]
            )
            deliveries = [earlier, sent_before] + [delivery("c0", i) for i in range(5)]
            statements_before, executions_before = ledger.batches.statements, ledger.batches.executions
            entries = await ledger.claim_windows(deliveries, "stripe", ["tokens"] * len(deliveries))
            claimed = [e.identifier for e in entries if e.claimed]
            values = await ledger.carry_values(claimed)
            await ledger.mark_all_sent(
                [
                    (i, MeterEvent(i, "tokens", "cus_1", str(v), 0), f"req_{i}", 1)
                    for i, v in zip(claimed, values, strict=True)
                ]
            )
            # A claim each, the state of the one not claimed, a carry and an outcome each ...
            assert ledger.batches.statements - statements_before == len(deliveries) + 1 + 2 * len(claimed)
            # ... in one execution per kind: the claims, the state, the carries, the outcomes.
            assert ledger.batches.executions - executions_before == 4
            return entries, claimed, values, ledger.batches
        finally:
            await ledger.close()

    entries, claimed, values, batches = asyncio.run(scenario())
    assert [(e.identifier, e.claimed) for e in entries[:2]] == [("old-1", True), (sent_before.identifier, False)]
    assert entries[1].status == "sent", "a sent window reads as sent (its state read after the claim)"
    assert claimed[0] == "old-1" and len(claimed) == 6
    by_identifier = dict(zip(claimed, values, strict=True))
    assert by_identifier["old-1"] == 0
    assert [by_identifier[i] for i in sorted(claimed[1:])] == [0, 1, 1, 0, 1], "0.7, 1.4, 2.1, 2.8, 3.5"
    assert batches.written_apart == 0
    rows = {r.identifier: r for r in fetch_deliveries(cfg)}
    assert {rows[i].status for i in claimed} == {"sent"} and all(rows[i].value is not None for i in claimed)


def test_the_carry_joins_its_totals_in_one_pass_in_the_plan_the_ledger_runs(ledger_cfg):
    """The carry statement's generic plan (the one psycopg's prepared statements run) joins each
    delivery to its running total by merge or hash, not in a nested loop over the totals: that was
    quadratic in the batch and most of Postgres' time per delivery (bench/billing_analysis.md)."""
    cfg, _ = ledger_cfg
    sql = carry_value_sql(cfg.billing.ledger_table, cfg.billing.carry_table, cfg.billing.cycles_table).replace(
        "%(identifier)b", "$1"
    )
    with connect(cfg.postgres) as conn:
        conn.autocommit = True
        conn.execute(f"PREPARE carry_plan(text[]) AS {sql}")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        plan = [row[0] for row in conn.execute("EXPLAIN EXECUTE carry_plan(ARRAY['a', 'b'])")]
    joins = [line for line in plan if "carried." in line and ("Cond:" in line or "Join Filter:" in line)]
    assert joins and all("Merge Cond:" in line or "Hash Cond:" in line for line in joins), "\n".join(plan)


def test_two_ledgers_carrying_the_same_totals_at_once_add_each_quantity_once(ledger_cfg):
    """Two workers (two connections each) carry 40 deliveries each of the same two running totals
    at once, one worker's in the other's reverse order: no batch is refused (no deadlock), each
    quantity is added once, and the units sent add up to the whole part of each total."""
    cfg, _ = ledger_cfg
    start_ms = int(billing_period_start(datetime.now(UTC)).timestamp() * 1000)
    quantity = Decimal("0.3")

    def delivery(customer: str, i: int):
        span = (start_ms + i * 60_000, start_ms + (i + 1) * 60_000)
        return window_delivery(ClosedWindow.from_fields(("t2", customer, "tokens", "{}", *span, quantity, 1, 1)), "mf")

    async def carry(ledger: AsyncPostgresLedger, d) -> tuple[str, Decimal]:
        entry = await ledger.claim(d, "stripe", "tokens", retry=False)
        return d.window.customer_id, await ledger.carry_value(entry.identifier)

    async def scenario() -> tuple[list, list[StatementBatches]]:
        ledgers = [AsyncPostgresLedger(cfg, f"w{n}", connections=2) for n in (1, 2)]
        mine = [[delivery(c, i) for i in range(n, 80, 2) for c in ("d0", "d1")] for n in (0, 1)]
        try:
            values = await asyncio.gather(
                *(carry(ledgers[0], d) for d in mine[0]), *(carry(ledgers[1], d) for d in reversed(mine[1]))
            )
            return values, [ledger.batches for ledger in ledgers]
        finally:
            for ledger in ledgers:
                await ledger.close()

    values, batches = asyncio.run(scenario())
    with connect(cfg.postgres) as conn:
        totals = dict(
            conn.execute(f"SELECT customer_id, total FROM {cfg.billing.carry_table} WHERE tenant_id = 't2'").fetchall()
        )
    assert totals == {"d0": 80 * quantity, "d1": 80 * quantity}, "each quantity added once"
    for customer in ("d0", "d1"):
        assert sum(v for c, v in values if c == customer) == 24, "the whole part of 80 x 0.3"
    assert [b.written_apart for b in batches] == [0, 0], "no batch refused"
    assert all(b.executions < b.statements for b in batches), "the carries went out set-based"


def test_reconcile_exits_1_when_a_value_sent_breaks_the_carry(ledger_cfg):
    """Values fixed by the carry reconcile clean; one unit more on one delivery is reported and exits 1."""
    cfg, path = ledger_cfg
    start_ms = int(billing_period_start(datetime.now(UTC)).timestamp() * 1000)

    async def fix() -> list[str]:
        ledger = AsyncPostgresLedger(cfg, "w1")
        try:
            ids = []
            for i, q in enumerate(("0.7", "0.7", "0.7")):
                d = window_delivery(
                    ClosedWindow.from_fields(
                        (
                            "t9",
                            "c9",
                            "tokens",
                            "{}",
                            start_ms + i * 60_000,
                            start_ms + (i + 1) * 60_000,
                            Decimal(q),
                            1,
                            1,
                        )
                    ),
                    "mf",
                )
                await ledger.claim(d, "stripe", "tokens", retry=False)
                await ledger.carry_value(d.identifier)
                ids.append(d.identifier)
            return ids
        finally:
            await ledger.close()

    ids = asyncio.run(fix())
    clean = CliRunner().invoke(
        cli, ["--config", str(path), "reconcile", "--tenant", "t9", "--grace", "0s"], catch_exceptions=False
    )
    assert clean.exit_code == 0, clean.output
    with connect(cfg.postgres) as conn, conn.transaction():
        conn.execute(
            f"UPDATE {cfg.billing.ledger_table} SET value = (value::numeric + 1)::text WHERE identifier = %s", (ids[0],)
        )
    broken = CliRunner().invoke(
        cli, ["--config", str(path), "reconcile", "--tenant", "t9", "--grace", "0s"], catch_exceptions=False
    )
    said = " ".join(broken.output.split())
    assert broken.exit_code == 1 and "values sent differ" in said, broken.output


def test_tables_of_the_earlier_form_take_windows_of_two_sizes(e2e_stack):
    """A usage table keyed by window start and a ledger unique by window start (an earlier release),
    with a window billed under an identifier of the earlier form: the schema brings both to keys
    with the window's end; the billed window is claimed under its recorded identifier, and the
    5-minute window starting with it is a row and a delivery of its own."""
    run = uuid.uuid4().hex[:6]
    cfg, _ = e2e_stack.config(
        f"spans-{run}",
        postgres={"usage_table": f"usage_{run}"},
        billing={
            "enabled": True,
            "ledger_table": f"deliveries_{run}",
            "customers_table": f"customers_{run}",
            "carry_table": f"carry_{run}",
        },
    )
    u, d = cfg.postgres.usage_table, cfg.billing.ledger_table
    start_ms = (int(time.time()) // 60 - 60) * 60_000
    one, five = (
        ClosedWindow.from_fields(("t1", "c1", "tokens", "{}", start_ms, start_ms + size, Decimal(q), 1, 1))
        for size, q in ((60_000, "3"), (300_000, "8"))
    )
    legacy = f"mf-{start_ms}-{'a' * 64}"
    apply_billing_schema(cfg)
    with connect(cfg.postgres) as conn, conn.transaction():
        # The earlier form: keyed and unique by window start alone.
        conn.execute(
            f"CREATE TABLE {u} (tenant_id text NOT NULL, customer_id text NOT NULL, meter text NOT NULL, dimensions_key text NOT NULL DEFAULT '{{}}', "
            "window_start timestamp(3) NOT NULL, window_end timestamp(3) NOT NULL, quantity numeric(38, 9) NOT NULL, event_count bigint NOT NULL, "
            "revision bigint NOT NULL, is_final boolean NOT NULL DEFAULT false, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(), "
            "PRIMARY KEY (tenant_id, customer_id, meter, dimensions_key, window_start))"
        )
        conn.execute(f"DROP INDEX {d}_window_span")
        conn.execute(
            f"CREATE UNIQUE INDEX {d}_window ON {d} (provider, tenant_id, customer_id, meter, dimensions_key, window_start) WHERE kind = 'window'"
        )
        conn.execute(
            f"INSERT INTO {d} (identifier, provider, kind, window_identifier, tenant_id, customer_id, meter, dimensions_key, window_start, window_end, quantity, event_count, revision, event_name, status, value, attempts, sent_at) "
            "VALUES (%s, 'stripe', 'window', %s, 't1', 'c1', 'tokens', '{}', to_timestamp(%s / 1000.0) AT TIME ZONE 'UTC', to_timestamp(%s / 1000.0) AT TIME ZONE 'UTC', 3, 1, 1, 'tokens', 'sent', '3', 1, now())",
            (legacy, legacy, start_ms, start_ms + 60_000),
        )
    apply_schema(cfg.postgres)
    apply_billing_schema(cfg)
    apply_schema(cfg.postgres)  # idempotent on the new form
    with connect(cfg.postgres) as conn:
        key = conn.execute(
            "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey) "
            "WHERE c.conrelid = %s::regclass AND c.contype = 'p'",
            (u,),
        ).fetchone()[0]
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", (d,)).fetchall()}
        assert (
            sorted(key) == sorted(USAGE_KEY_COLUMNS) and f"{d}_window_span" in indexes and f"{d}_window" not in indexes
        )
        with conn.transaction():
            for w in (one, five):
                row = {
                    "tenant_id": w.tenant_id,
                    "customer_id": w.customer_id,
                    "meter": w.meter,
                    "dimensions_key": w.dimensions_key,
                    "window_start": w.window_start.replace(tzinfo=None),
                    "window_end": w.window_end.replace(tzinfo=None),
                    "quantity": w.quantity,
                    "event_count": 1,
                    "revision": 1,
                    "is_final": True,
                }
                conn.execute(usage_upsert_sql(u).replace("?", "%s"), [row[c] for c in USAGE_WRITE_COLUMNS])
    assert sorted((r.window_end - r.window_start, r.quantity) for r in fetch_usage(cfg.postgres)) == [
        (timedelta(minutes=1), Decimal(3)),
        (timedelta(minutes=5), Decimal(8)),
    ]

    async def claim() -> tuple:
        ledger = AsyncPostgresLedger(cfg, "w1")
        try:
            return await ledger.claim(window_delivery(one, "mf"), "stripe", "tokens", retry=False), await ledger.claim(
                window_delivery(five, "mf"), "stripe", "tokens", retry=False
            )
        finally:
            await ledger.close()

    billed, fresh = asyncio.run(claim())
    assert (billed.identifier, billed.status, billed.claimed) == (legacy, "sent", False), (
        "the billed window keeps its identifier and stays sent"
    )
    assert (fresh.identifier, fresh.status, fresh.claimed) == (window_delivery(five, "mf").identifier, "pending", True)
    assert window_delivery(one, "mf").identifier != legacy
    assert {r.identifier for r in fetch_deliveries(cfg)} == {legacy, fresh.identifier}


def test_reconcile_checks_the_providers_monthly_totals(e2e_stack):
    """Windows billed through the fake: the provider's monthly totals equal the values sent, and
    reconcile --provider-totals agrees; a meter event sent to the provider outside meterflow makes
    that customer's month differ, and reconcile exits 1 naming it."""
    from tests.e2e.helpers import write_final_rows

    fake = FakeStripe().start()
    try:
        run = uuid.uuid4().hex[:6]
        billing = {
            "enabled": True,
            "ledger_table": f"deliveries_{run}",
            "customers_table": f"customers_{run}",
            "carry_table": f"carry_{run}",
        }
        # Tables of its own: reconcile reads every tenant's final windows and late corrections.
        cfg, path = e2e_stack.config(
            f"ptotals-{run}",
            postgres={"usage_table": f"usage_{run}"},
            corrections={"table": f"corrections_{run}"},
            billing=billing,
            stripe={"api_base": fake.url},
        )
        apply_schema(cfg.postgres)
        apply_billing_schema(cfg)
        map_customer(cfg, "t1", "c1", "cus_1")
        map_customer(cfg, "t1", "c2", "cus_2")
        start_ms = (int(time.time()) // 60 - 60) * 60_000
        windows = [
            ClosedWindow.from_fields(
                ("t1", c, "tokens", "{}", start_ms + i * 10_000, start_ms + (i + 1) * 10_000, Decimal(q), 1, 1)
            )
            for c in ("c1", "c2")
            for i, q in enumerate(("0.7", "1.6", "2.2"))
        ]
        write_final_rows(
            cfg,
            [
                {
                    "tenant_id": w.tenant_id,
                    "customer_id": w.customer_id,
                    "meter": w.meter,
                    "window_start": w.window_start,
                    "window_end": w.window_end,
                    "quantity": w.quantity,
                    "event_count": 1,
                    "revision": 1,
                }
                for w in windows
            ],
        )

        async def bill(events: list[MeterEvent]) -> None:
            ledger, provider = AsyncPostgresLedger(cfg, "job"), StripeMeterEvents(cfg)
            try:
                for w in windows:
                    await Deliverer(cfg, provider, ledger, clock=time.time, sleep=asyncio.sleep).on_window(w)
                for e in events:
                    await provider.send(e)
            finally:
                await ledger.close()
                await provider.close()

        asyncio.run(bill([]))
        assert len(fake.events) == 6

        def reconcile() -> tuple[int, dict]:
            result = CliRunner().invoke(
                cli,
                ["--config", str(path), "reconcile", "--grace", "0s", "--provider-totals", "--format", "json"],
                catch_exceptions=False,
            )
            return result.exit_code, json.loads(result.stdout)

        code, report = reconcile()
        assert (code, report["discrepancies"], report["provider_differences"]) == (0, [], []), report
        assert sum(e.value for e in fake.events if e.customer == "cus_1") == Decimal(4), "whole units of 4.5: the carry"
        asyncio.run(bill([MeterEvent("outside-meterflow-1", "tokens", "cus_1", "3", start_ms // 1000)]))
        code, report = reconcile()
        assert code == 1 and report["discrepancies"] == [], report
        [diff] = report["provider_differences"]
        assert (diff["provider_customer_id"], Decimal(diff["sent"]), Decimal(diff["provider_total"])) == (
            "cus_1",
            Decimal(4),
            Decimal(7),
        )
    finally:
        fake.stop()


def test_a_restarted_worker_releases_what_its_earlier_run_held_leased(ledger_cfg):
    """A billing subtask's earlier run died holding leases (an attempt claimed, a retry handed out by
    the scan, a delivery parked in the worker for its key's turn): the new run makes them due at once instead of waiting out billing.retry_lease. A
    retry's schedule, and another subtask's leases, stay as they are."""
    cfg, _ = ledger_cfg

    async def earlier_run() -> list[str]:
        old, other = AsyncPostgresLedger(cfg, "billing-0-old"), AsyncPostgresLedger(cfg, "billing-1-old")
        try:
            claimed, scheduled, elsewhere, handed, held = (
                window_delivery(_window(customer=c), "mf") for c in ("c1", "c2", "c3", "c4", "c5")
            )
            await old.claim(claimed, "stripe", "tokens", retry=False)  # in flight when the run died
            await old.claim(scheduled, "stripe", "tokens", retry=False)
            await old.mark_failed(scheduled.identifier, 1, "503", 3600)  # its retry is an hour away
            await other.claim(elsewhere, "stripe", "tokens", retry=False)  # subtask 1's run, not this one
            await old.claim(handed, "stripe", "tokens", retry=False)
            await old.mark_failed(handed.identifier, 1, "503", 0)  # due: the scan hands it out, then the run dies
            await old.claim(held, "stripe", "tokens", retry=False)
            await old.hold(held.identifier, time.time() + 600)  # parked in the worker for its key's turn
            return [d.identifier for d in (claimed, scheduled, elsewhere, handed, held)]
        finally:
            await old.close()
            await other.close()

    claimed, scheduled, elsewhere, handed, held = asyncio.run(earlier_run())
    with connect(cfg.postgres) as conn:
        conn.autocommit = True
        assert [r[0] for r in due_retries(conn, cfg, 10, "retry-scan-0-old")] == [handed]
        assert due_retries(conn, cfg, 10, "retry-scan-0-new") == [], "everything left is leased or scheduled"

    with connect(cfg.postgres) as conn:
        conn.autocommit = True
        assert sorted(release_leases(conn, cfg, "billing-0-", "billing-0-new")) == sorted([claimed, held])
        assert release_leases(conn, cfg, "retry-scan-0-", "retry-scan-0-new") == [handed]
        assert sorted(r[0] for r in due_retries(conn, cfg, 10, "retry-scan-0-new")) == sorted(
            [claimed, handed, held]
        ), "due at once"
        assert release_leases(conn, cfg, "retry-scan-0-", "retry-scan-0-new") == [], "its own leases are its own"
    states = {d.identifier: d for d in fetch_deliveries(cfg)}
    assert (states[scheduled].status, states[elsewhere].status) == ("failed", "pending")


def test_a_parked_delivery_comes_back_at_its_turn_not_after_the_lease(ledger_cfg):
    """Deferring a delivery its worker just claimed, or the retry scan just handed out, replaces the
    lease with the turn given (a crowded key's burst, a key backing off); a retry scheduled later
    is never brought forward."""
    cfg, _ = ledger_cfg

    async def scenario() -> tuple[float, float, float, float]:
        ledger = AsyncPostgresLedger(cfg, "billing-0-w")
        try:
            parked, scheduled, handed = (window_delivery(_window(customer=c), "mf") for c in ("c1", "c2", "c3"))
            await ledger.claim(parked, "stripe", "tokens", retry=False)
            turn = time.time() + 5
            await ledger.defer(parked.identifier, turn)
            await ledger.claim(handed, "stripe", "tokens", retry=False)
            await ledger.mark_failed(handed.identifier, 1, "503", 0)
            with connect(cfg.postgres) as conn:
                conn.autocommit = True
                assert [r[0] for r in due_retries(conn, cfg, 10, "retry-scan-0-x")] == [handed.identifier]
            await ledger.defer(handed.identifier, turn)
            await ledger.claim(scheduled, "stripe", "tokens", retry=False)
            await ledger.mark_failed(scheduled.identifier, 1, "503", 3600)
            await ledger.defer(scheduled.identifier, time.time() + 5)
            with connect(cfg.postgres) as conn:
                at = dict(
                    conn.execute(
                        f"SELECT identifier, extract(epoch FROM next_attempt_at)::float8 FROM {cfg.billing.ledger_table}"
                    ).fetchall()
                )
            return turn, at[parked.identifier], at[scheduled.identifier], at[handed.identifier]
        finally:
            await ledger.close()

    turn, parked_at, scheduled_at, handed_at = asyncio.run(scenario())
    assert abs(parked_at - turn) < 0.01 and abs(handed_at - turn) < 0.01, "the turn, not the 2-minute lease"
    assert scheduled_at > time.time() + 3000, "the retry an hour away stays an hour away"
