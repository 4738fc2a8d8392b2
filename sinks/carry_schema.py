"""Pure SQL for the carry of whole-number meters (billing/whole_values.py): the running total per
(customer, meter, billing period), the customer's billing period in SQL, and the statement that
fixes carried deliveries' values.

A customer's billing period is its cycle's (``billing.cycles_table``: an anchor day and a timezone,
meterflow/billing_cycle.py), calendar months in UTC when it has none, so the fraction is carried
within the period its provider invoices, never into the next. ``<carry_table>_period_start`` is the
SQL twin of ``BillingCycle.period_of``; tests/e2e/test_carry_cycles_postgres.py holds them equal.
"""

from __future__ import annotations

from sinks.postgres_schema import check_identifier
from sinks.usage_rollup_schema import cycles_ddl


def period_function(carry_table: str) -> str:
    return f"{check_identifier(carry_table)}_period_start"


def carry_ddl(carry_table: str = "billing_carry", cycles_table: str = "billing_cycles") -> list[str]:
    """The carry table, the cycles table and the period function; safe to run again."""
    k, f = check_identifier(carry_table), period_function(carry_table)
    # The anchor day of a month: the month's last day when the anchor is past it.
    anchor = "m + (least(coalesce(anchor, 1), extract(day FROM m + interval '1 month' - interval '1 day')::int) - 1) * interval '1 day'"
    return [
        # The running total of carried meters: exact quantities of every delivery whose value is
        # fixed, per customer, meter and billing period (its start, UTC); floor(total) has been billed.
        f"""CREATE TABLE IF NOT EXISTS {k} (
    provider     text           NOT NULL,
    tenant_id    text           NOT NULL,
    customer_id  text           NOT NULL,
    meter        text           NOT NULL,
    period_start timestamp      NOT NULL,
    total        numeric(38, 9) NOT NULL,
    updated_at   timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, tenant_id, customer_id, meter, period_start)
)""",
        cycles_ddl(cycles_table),
        f"""CREATE OR REPLACE FUNCTION {f}(ws timestamp, anchor integer, tz text) RETURNS timestamp
LANGUAGE plpgsql STABLE AS $$
DECLARE
    local timestamp := (ws AT TIME ZONE 'UTC') AT TIME ZONE tz;
    m timestamp := date_trunc('month', local);
    s timestamp := {anchor};
BEGIN
    IF local < s THEN
        m := m - interval '1 month';
        s := {anchor};
    END IF;
    RETURN (s AT TIME ZONE tz) AT TIME ZONE 'UTC';
END
$$""",
    ]


def carry_value_sql(ledger_table: str, carry_table: str, cycles_table: str = "billing_cycles") -> str:
    """Fix carried deliveries' values: add each one's quantity to its (customer, meter, billing
    period) total and take the whole units it completes, ``floor(total) - floor(total - quantity)``
    (billing/whole_values.py: carried_value). Set-based: ``identifier`` is an array, one per delivery;
    each row fixed returns (value, identifier), none for a value fixed already.

    The deliveries' rows are locked first, in identifier order, and checked again after the wait,
    so two attempts can't both add the same quantity. The deliveries of one total in one statement
    are added to it once, together, each taking the units it completes in identifier order. The
    totals are inserted in key order, so two statements that share totals take their row locks in
    the same order and one waits for the other (Postgres inserts in the SELECT's order; should two
    batches deadlock anyway, Postgres aborts one and it is written again statement by statement).
    """
    d, k, y = check_identifier(ledger_table), check_identifier(carry_table), check_identifier(cycles_table)
    total_key = "provider, tenant_id, customer_id, meter, period_start"
    cycle = f"FROM {y} y WHERE y.tenant_id = {d}.tenant_id AND y.customer_id = {d}.customer_id"
    period = f"{period_function(carry_table)}(window_start, (SELECT y.anchor_day {cycle}), coalesce((SELECT y.timezone {cycle}), 'UTC'))"
    # Every named row is locked and "not fixed yet" is a column (``open``), read after the lock,
    # rather than a filter before it: filtered, the planner expects one row and joins ``ordered``
    # to ``carried`` in a nested loop, quadratic in the batch (about 60% of Postgres' time per
    # delivery at 200 a batch; bench/billing_analysis.md).
    return (
        f"WITH target AS (SELECT identifier, provider, tenant_id, customer_id, meter, {period} AS period_start, quantity, value IS NULL AS open "
        f"FROM {d} WHERE identifier = ANY(%(identifier)b::text[]) ORDER BY identifier FOR UPDATE OF {d}), "
        f"ordered AS (SELECT target.*, sum(quantity) FILTER (WHERE open) OVER (PARTITION BY {total_key} ORDER BY identifier) AS upto, "
        f"sum(quantity) FILTER (WHERE open) OVER (PARTITION BY {total_key}) AS added FROM target), "
        f"carried AS (INSERT INTO {k} ({total_key}, total) "
        f"SELECT {total_key}, sum(quantity) FROM target WHERE open GROUP BY {total_key} ORDER BY {total_key} "
        f"ON CONFLICT ({total_key}) DO UPDATE SET total = {k}.total + EXCLUDED.total, updated_at = now() "
        f"RETURNING {total_key}, total) "
        f"UPDATE {d} SET value = (floor(carried.total - ordered.added + ordered.upto) - floor(carried.total - ordered.added + ordered.upto - ordered.quantity))::text "
        f"FROM ordered JOIN carried USING ({total_key}) "
        f"WHERE {d}.identifier = ordered.identifier AND ordered.open RETURNING {d}.value, {d}.identifier"
    )
