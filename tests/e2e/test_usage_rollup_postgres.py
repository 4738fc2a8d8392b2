"""The usage API's rollups and reads on the real Postgres.

The rollup is kept by a trigger in the transaction that writes a window, so after every kind of
write the job and operators make (a first row, a re-fire, an older revision the guard refuses, the
final row, a delete) it equals the sums computed again from the usage table. It is made from the
rows already there when it is created, once. Reads per day and per period in a customer's own
cycle (an anniversary period across a month boundary, in Paris) agree with sums of the rows in
plain Python; corrections that count are added, and a total turns final once its windows are.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal

import pytest

from meterflow.billing_cycle import BillingCycle
from meterflow.serve.usage import MAX_LISTED_CORRECTIONS, UsageRead, answer, check_query, sum_corrections
from meterflow.serve.usage_reader import UsageReader, apply_usage_schema, set_cycle
from sinks.corrections_schema import corrections_ddl
from sinks.postgres import connect
from sinks.postgres_schema import USAGE_WRITE_COLUMNS, usage_table_ddl, usage_upsert_sql
from sinks.usage_rollup_schema import rollup_table
from tests.e2e.helpers import private_job

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def cfg(e2e_stack):
    run = uuid.uuid4().hex[:6]
    cfg, _ = private_job(
        e2e_stack,
        "rollup",
        billing={"cycles_table": f"cycles_{run}"},
        corrections={"table": f"corr_{run}", "events_table": f"corr_ev_{run}"},
    )
    with connect(cfg.postgres) as conn:
        for statement in usage_table_ddl(cfg.postgres.usage_table):
            conn.execute(statement)
    return cfg


def _write(
    cfg, customer: str, meter: str, start: datetime, quantity: str, revision: int, final: bool, dims: str = "{}"
):
    row = dict(
        tenant_id="t",
        customer_id=customer,
        meter=meter,
        dimensions_key=dims,
        window_start=start,
        window_end=start + timedelta(minutes=1),
        quantity=Decimal(quantity),
        event_count=revision,
        revision=revision,
        is_final=final,
    )
    with connect(cfg.postgres) as conn:
        conn.execute(
            usage_upsert_sql(cfg.postgres.usage_table).replace("?", "%s"), [row[c] for c in USAGE_WRITE_COLUMNS]
        )


def _rollup(cfg) -> dict:
    with connect(cfg.postgres) as conn:
        rows = conn.execute(
            f"SELECT customer_id, meter, dimensions_key, bucket_start, quantity, event_count, windows, final_windows, final_quantity FROM {rollup_table(cfg.postgres.usage_table)}"
        ).fetchall()
    return {tuple(r[:4]): tuple(r[4:]) for r in rows if r[6] != 0}


def _recomputed(cfg) -> dict:
    """The rollup as sums of the usage table's rows, in Python."""
    with connect(cfg.postgres) as conn:
        rows = conn.execute(
            f"SELECT customer_id, meter, dimensions_key, window_start, quantity, event_count, is_final FROM {cfg.postgres.usage_table}"
        ).fetchall()
    sums: dict = defaultdict(lambda: [Decimal(0), 0, 0, 0, Decimal(0)])
    for customer, meter, dims, start, quantity, events, final in rows:
        bucket = start.replace(minute=start.minute - start.minute % 15, second=0, microsecond=0)
        s = sums[(customer, meter, dims, bucket)]
        s[0] += quantity
        s[1] += events
        s[2] += 1
        s[3] += int(final)
        s[4] += quantity if final else 0
    return {k: tuple(v) for k, v in sums.items()}


def test_the_rollup_follows_every_write_and_is_made_once_from_the_rows_already_there(cfg):
    base = datetime(2026, 11, 30, 23, 50)
    # Rows written before the rollup exists: it is made from them.
    _write(cfg, "c1", "tokens", base, "1.5", 1, False)
    _write(cfg, "c1", "tokens", base + timedelta(minutes=1), "2", 2, True)
    apply_usage_schema(cfg)
    assert _rollup(cfg) == _recomputed(cfg) and len(_rollup(cfg)) == 1
    apply_usage_schema(cfg)  # again: nothing counted twice
    assert _rollup(cfg) == _recomputed(cfg)
    steps = [
        ("c1", "tokens", base, "4.5", 3, False),  # a re-fire with more events
        ("c1", "tokens", base, "1", 1, False),  # an older revision: refused by the guard, the rollup keeps the newer
        ("c1", "tokens", base, "4.5", 3, True),  # the final row
        ("c1", "tokens", base + timedelta(minutes=10), "7", 1, False),  # the next quarter hour, the next month
        ("c2", "api_calls", base, "0.000000001", 1, True),
        ("c1", "tokens", base, "9", 4, True),  # closed again with more events (a rejoined partition)
    ]
    for step in steps:
        _write(cfg, *step)
        assert _rollup(cfg) == _recomputed(cfg), step
    with connect(cfg.postgres) as conn:
        conn.execute(f"DELETE FROM {cfg.postgres.usage_table} WHERE customer_id = 'c2'")
    assert _rollup(cfg) == _recomputed(cfg)


def test_reads_per_day_and_period_in_the_customers_cycle_agree_with_the_rows(cfg):
    apply_usage_schema(cfg)
    cycle = BillingCycle(20, "Europe/Paris")
    set_cycle(cfg, "t", "anniv", cycle)
    # Windows across the month boundary, in the period 2026-11-20 to 2026-12-20 (Paris), and one the
    # minute before it started (2026-11-19 23:00 UTC is local midnight of the 20th).
    rows = [
        (datetime(2026, 11, 19, 22, 59), "100", True),
        (datetime(2026, 11, 19, 23, 0), "1.25", True),
        (datetime(2026, 11, 30, 22, 59), "2", True),
        (datetime(2026, 11, 30, 23, 0), "3", True),  # local December 1st
        (datetime(2026, 12, 19, 22, 59), "4", False),  # the period's last minute, provisional
    ]
    for start, quantity, final in rows:
        _write(cfg, "anniv", "tokens", start, quantity, 1, final)
    with connect(cfg.postgres) as conn:
        for statement in corrections_ddl(cfg.corrections.table, cfg.corrections.events_table):
            conn.execute(statement)
        conn.execute(
            f"INSERT INTO {cfg.corrections.table} (correction_id, tenant_id, customer_id, meter, dimensions_key, window_start, window_end, delta, events, status, reason) "
            "VALUES ('k1', 't', 'anniv', 'tokens', '{}', %s, %s, 0.75, 1, 'applied', 'late'), ('k2', 't', 'anniv', 'tokens', '{}', %s, %s, 5, 1, 'pending', 'late')",
            [rows[2][0], rows[2][0] + timedelta(minutes=1), rows[2][0], rows[2][0] + timedelta(minutes=1)],
        )
    now = datetime(2026, 12, 5, 12)
    asyncio.run(_check_reads(cfg, cycle, now))


async def _check_reads(cfg, cycle: BillingCycle, now: datetime) -> None:
    reader = UsageReader(cfg)
    await reader.open()

    async def read(**params: str) -> dict:
        """What the service answers (through JSON, as it sends it)."""
        found = await reader.usage("t", "anniv", lambda c: check_query("anniv", c, now, **params))
        assert found is not None and found.cycle == cycle
        # The SQL's sums are those of the corrections listed (fewer than the limit here), summed in Python.
        assert sorted(found.correction_sums, key=repr) == sorted(
            sum_corrections(found.query, found.corrections), key=repr
        )
        return json.loads(json.dumps(answer(found, "t")))

    try:
        assert await reader.usage("other-tenant", "anniv", lambda c: check_query("anniv", c, now)) is None
        body = await read(granularity="period")
        assert (body["from"], body["to"]) == ("2026-11-19T23:00:00.000Z", "2026-12-19T23:00:00.000Z")
        [period] = body["usage"]
        assert (period["quantity"], period["corrected_quantity"], period["event_count"]) == ("10.25", "11", 4)
        assert period["status"] == "provisional"  # its last window is provisional
        assert [c["correction_id"] for c in body["corrections"]] == ["k1"]  # pending ones do not count

        days = await read()
        by_day = {d["start"]: d["quantity"] for d in days["usage"]}
        assert by_day == {
            "2026-11-19T23:00:00.000Z": "1.25",  # local November 20th, the period's first day
            "2026-11-29T23:00:00.000Z": "2",  # 22:59 UTC on the 30th is 23:59 in Paris
            "2026-11-30T23:00:00.000Z": "3",  # local December 1st
            "2026-12-18T23:00:00.000Z": "4",
        }
        # Once the job closed past the provisional window and it is final, so is the period.
        _write(cfg, "anniv", "tokens", datetime(2026, 12, 19, 22, 59), "4", 2, True)
        _write(cfg, "closer", "tokens", datetime(2026, 12, 19, 23, 0), "1", 1, True)
        [period] = (await read(granularity="period"))["usage"]
        assert period["status"] == "final" and period["quantity"] == "10.25"
        got = (await read(since="2026-11-30T22:00:00Z", until="2026-12-01T00:00:00Z", granularity="window"))["usage"]
        assert [(w["start"], w["quantity"], w["corrected_quantity"]) for w in got] == [
            ("2026-11-30T22:59:00.000Z", "2", "2.75"),
            ("2026-11-30T23:00:00.000Z", "3", "3"),
        ]
    finally:
        await reader.close()


def test_one_correction_past_the_listed_limit_still_counts(cfg):
    """A customer with more corrections in a day than an answer lists: every one counts in the day's
    corrected total and in corrections_count; the earliest windows' are listed, up to the limit."""
    apply_usage_schema(cfg)
    day = datetime(2026, 12, 1)
    _write(cfg, "busy", "tokens", day, "5", 1, True)
    count = MAX_LISTED_CORRECTIONS + 1
    with connect(cfg.postgres) as conn:
        conn.execute(
            f"INSERT INTO {cfg.corrections.table} (correction_id, tenant_id, customer_id, meter, dimensions_key, "
            "window_start, window_end, delta, events, status, reason) "
            "SELECT 'k' || lpad(i::text, 5, '0'), 't', 'busy', 'tokens', '{\"region\": \"eu\"}', "
            "%s + make_interval(secs => i), %s + make_interval(secs => i + 60), 0.001, 1, 'applied', 'late' "
            "FROM generate_series(0, %s) i",
            [day, day, count - 1],
        )

    async def read() -> UsageRead | None:
        reader = UsageReader(cfg)
        await reader.open()
        try:
            return await reader.usage(
                "t", "busy", lambda c: check_query("busy", c, day + timedelta(hours=12), group_by="region")
            )
        finally:
            await reader.close()

    found = asyncio.run(read())
    assert found is not None
    body = answer(found, "t")
    assert body["corrections_count"] == count and len(body["corrections"]) == MAX_LISTED_CORRECTIONS
    assert body["corrections"][-1]["correction_id"] == f"k{MAX_LISTED_CORRECTIONS - 1:05d}"
    # The window's own total has no region; the corrections' total of region eu is 0 plus all of them.
    by_group = {r["group"]["region"]: r for r in body["usage"] if r["start"] == "2026-12-01T00:00:00.000Z"}
    assert by_group[None]["corrected_quantity"] == "5"
    assert by_group["eu"]["quantity"] == "0" and by_group["eu"]["corrected_quantity"] == "1.001"
