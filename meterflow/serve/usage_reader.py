"""psycopg reads for the usage API and ``meterflow cycles``: a pool of connections, the
rollups (sinks/usage_rollup_schema.py), customers' billing cycles and counted corrections."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from meterflow.billing_cycle import BillingCycle
from meterflow.config import JobConfig
from meterflow.serve.ingest import RequestRefusedError
from meterflow.serve.usage import (
    MAX_LISTED_CORRECTIONS,
    MAX_WINDOW_ROWS,
    CorrectionSum,
    CountedCorrection,
    Total,
    UsageQuery,
    UsageRead,
)
from sinks.corrections_schema import corrections_ddl
from sinks.postgres import apply_schema, connect, table_exists
from sinks.postgres_schema import last_final_end_sql
from sinks.usage_rollup_schema import (
    correction_sums_sql,
    corrections_in_range_sql,
    cycle_sql,
    cycles_ddl,
    rollup_table,
    set_cycle_sql,
    spans_sql,
    windows_sql,
)


def apply_usage_schema(cfg: JobConfig) -> None:
    """The usage table, its rollup, the billing cycles table and the corrections tables (empty until
    ``corrections apply`` first runs), so every read finds the tables it reads (idempotent)."""
    apply_schema(cfg.postgres)
    with connect(cfg.postgres) as conn, conn.transaction():
        conn.execute(cycles_ddl(cfg.billing.cycles_table))
        for statement in corrections_ddl(cfg.corrections.table, cfg.corrections.events_table):
            conn.execute(statement)


def set_cycle(cfg: JobConfig, tenant_id: str, customer_id: str, cycle: BillingCycle) -> None:
    with connect(cfg.postgres) as conn, conn.transaction():
        conn.execute(cycles_ddl(cfg.billing.cycles_table))
        conn.execute(
            set_cycle_sql(cfg.billing.cycles_table), (tenant_id, customer_id, cycle.anchor_day, cycle.timezone)
        )


def _cycle(conn: psycopg.Connection, table: str, tenant_id: str, customer_id: str) -> BillingCycle:
    row = conn.execute(cycle_sql(table), (tenant_id, customer_id)).fetchone()
    return BillingCycle() if row is None else BillingCycle(row[0], row[1])


def cycle_of(cfg: JobConfig, tenant_id: str, customer_id: str) -> BillingCycle:
    """A customer's billing cycle (calendar months in UTC when none is set)."""
    with connect(cfg.postgres) as conn:
        if not table_exists(conn, cfg.billing.cycles_table):
            return BillingCycle()
        return _cycle(conn, cfg.billing.cycles_table, tenant_id, customer_id)


# How long a request waits for a pooled connection before it is answered 503.
POOL_WAIT_S = 5.0


def writer_pool(cfg: JobConfig, size: int = 2) -> ConnectionPool:
    """Autocommit connections that write (the threshold alerts' ledger), apart from the readers'."""
    pg = cfg.postgres
    password = pg.password.get_secret_value() if pg.password else None
    return ConnectionPool(
        pg.conninfo(),
        kwargs={"password": password, "connect_timeout": 5, "autocommit": True},
        min_size=1,
        max_size=size,
        open=False,
    )


async def _one_snapshot(conn: psycopg.AsyncConnection[Any]) -> None:
    """A request's reads see one snapshot, and never write."""
    await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
    await conn.set_read_only(True)


class UsageReader:
    """What the usage API reads, over a pool of ``serve.usage_pool_size`` connections. Asynchronous: the
    service's event loop waits on Postgres itself, with no thread handed each request."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        pg = cfg.postgres
        password = pg.password.get_secret_value() if pg.password else None
        self.pool = AsyncConnectionPool(
            pg.conninfo(),
            kwargs={"password": password, "connect_timeout": 5, "autocommit": True},
            min_size=1,
            max_size=cfg.serve.usage_pool_size,
            open=False,
            configure=_one_snapshot,
        )

    async def open(self) -> None:
        """The tables, then the pool (in the event loop that will use it)."""
        apply_usage_schema(self.cfg)
        await self.pool.open(wait=True, timeout=30)

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection; Postgres unreachable or every connection busy is a 503 to retry."""
        try:
            async with self.pool.connection(timeout=POOL_WAIT_S) as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as e:
            raise RequestRefusedError(503, f"usage is unavailable for a moment ({type(e).__name__}): retry") from e

    async def usage(
        self, tenant_id: str, customer_id: str, ask: Callable[[BillingCycle], UsageQuery]
    ) -> UsageRead | None:
        """The customer's cycle, the query ``ask`` makes of it, and what that query reads, in one snapshot
        and one pooled connection; None when the tenant has no such customer (no usage, no cycle set).
        A RequestRefusedError of ``ask`` (a query refused for the customer's cycle) passes through."""
        usage_table = self.cfg.postgres.usage_table
        # BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY (the pool's connections): one snapshot.
        async with self._connection() as conn, conn.transaction():
            # The cycle set for the customer, else whether it has usage at all.
            row = await (
                await conn.execute(
                    f"SELECT 0 AS o, anchor_day, timezone FROM ({cycle_sql(self.cfg.billing.cycles_table)}) c "
                    f"UNION ALL (SELECT 1, NULL, NULL FROM {rollup_table(usage_table)} "
                    "WHERE tenant_id = %s AND customer_id = %s LIMIT 1) ORDER BY o LIMIT 1",
                    (tenant_id, customer_id, tenant_id, customer_id),
                )
            ).fetchone()
            if row is None:
                return None
            cycle = BillingCycle(row[1], row[2]) if row[0] == 0 else BillingCycle()
            query = ask(cycle)
            meter = [query.meter] if query.meter is not None else []
            where = [tenant_id, query.customer_id, query.since, query.until, *meter]
            per_window = query.granularity == "window"
            bounds = [] if per_window else [list(query.bounds)]
            corrections_table = self.cfg.corrections.table
            # The horizon, the totals and the corrections in one round trip. Per window, one row past the
            # limit is read, so more is seen and refused rather than cut off unsaid.
            async with conn.pipeline():
                horizon = await conn.execute(last_final_end_sql(usage_table))
                if per_window:
                    sql, params = windows_sql(usage_table, query.group_by, bool(meter))
                    rows = await conn.execute(sql, [*params, *where, MAX_WINDOW_ROWS + 1])
                else:
                    sql, params = spans_sql(usage_table, query.group_by, bool(meter))
                    rows = await conn.execute(sql, [*params, *bounds, *where])
                sql, params = correction_sums_sql(corrections_table, query.group_by, bool(meter), per_window)
                # LIMIT NULL: per day or period, as many sums as totals.
                summed = await conn.execute(
                    sql, [*params, *bounds, *where, MAX_WINDOW_ROWS + 1 if per_window else None]
                )
                listed = await conn.execute(
                    corrections_in_range_sql(corrections_table, bool(meter)), [*where, MAX_LISTED_CORRECTIONS]
                )
            totals = _totals(query, await rows.fetchall())
            sums = _correction_sums(query, await summed.fetchall())
            corrections = [CountedCorrection(*r) for r in await listed.fetchall()]
            last_end = await horizon.fetchone()
        return UsageRead(cycle, query, totals, sums, corrections, last_end[0] if last_end else None)


def _correction_sums(query: UsageQuery, rows: list[tuple[Any, ...]]) -> list[CorrectionSum]:
    """The rows of correction_sums_sql; per window, more corrected windows than windows are taken is refused."""
    if query.granularity == "window":
        if len(rows) > MAX_WINDOW_ROWS:
            msg = f"more than {MAX_WINDOW_ROWS} corrected windows: narrow from and to, or ask per day"
            raise RequestRefusedError(400, msg)
        return [CorrectionSum(meter, grp, start, end, delta, count) for meter, grp, start, end, delta, count in rows]
    sums = []
    for meter, grp, n, delta, count in rows:
        start, end = _span(query, n)
        sums.append(CorrectionSum(meter, grp, start, end, delta, count))
    return sums


def _span(query: UsageQuery, n: int) -> tuple[datetime, datetime]:
    """Span ``n`` (from 1) of ``width_bucket``; the reads' range is the spans', so any other is a fault."""
    if not 1 <= n <= len(query.spans):
        msg = f"a row outside the query's {len(query.spans)} spans (bucket {n})"
        raise ValueError(msg)
    return query.spans[n - 1]


def _totals(query: UsageQuery, rows: list[tuple[Any, ...]]) -> list[Total]:
    """The rows of windows_sql or spans_sql as totals."""
    if query.granularity == "window":
        if len(rows) > MAX_WINDOW_ROWS:
            msg = f"more than {MAX_WINDOW_ROWS} windows: narrow from and to, or ask per day"
            raise RequestRefusedError(400, msg)
        return [
            Total(meter, grp, start, end, qty, int(events), windows, finals, revision)
            for meter, grp, start, end, qty, events, windows, finals, revision in rows
        ]
    # Postgres sums bigints as numeric: whole numbers, read as int.
    totals = []
    for meter, grp, n, qty, events, windows, finals, revision in rows:
        start, end = _span(query, n)
        totals.append(Total(meter, grp, start, end, qty, int(events), int(windows), int(finals), int(revision)))
    return totals
