"""psycopg reads for the usage API and ``meterflow cycles``: a pool of connections, the
rollups (sinks/usage_rollup_schema.py), customers' billing cycles and counted corrections."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from meterflow.billing_cycle import BillingCycle
from meterflow.config import JobConfig
from meterflow.serve.ingest import RequestRefusedError
from meterflow.serve.usage import MAX_WINDOW_ROWS, CountedCorrection, Total, UsageQuery
from sinks.postgres import apply_schema, connect, table_exists
from sinks.postgres_schema import last_final_end_sql
from sinks.usage_rollup_schema import (
    corrections_in_range_sql,
    cycle_sql,
    cycles_ddl,
    rollup_table,
    set_cycle_sql,
    spans_sql,
    windows_sql,
)


def apply_usage_schema(cfg: JobConfig) -> None:
    """The usage table, its rollup and the billing cycles table (idempotent)."""
    apply_schema(cfg.postgres)
    with connect(cfg.postgres) as conn, conn.transaction():
        conn.execute(cycles_ddl(cfg.billing.cycles_table))


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


def _one_snapshot(conn: psycopg.Connection[Any]) -> None:
    """A request's reads see one snapshot, and never write."""
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True


class UsageReader:
    """What the usage API reads, over a pool of ``serve.usage_pool_size`` connections."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        pg = cfg.postgres
        password = pg.password.get_secret_value() if pg.password else None
        self.pool = ConnectionPool(
            pg.conninfo(),
            kwargs={"password": password, "connect_timeout": 5, "autocommit": True},
            min_size=1,
            max_size=cfg.serve.usage_pool_size,
            open=False,
            configure=_one_snapshot,
        )
        # The corrections table appears once `corrections apply` first ran: asked until it exists.
        self._corrections_exist = False

    def open(self) -> None:
        apply_usage_schema(self.cfg)
        self.pool.open(wait=True, timeout=30)

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; Postgres unreachable or every connection busy is a 503 to retry."""
        try:
            with self.pool.connection(timeout=POOL_WAIT_S) as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as e:
            raise RequestRefusedError(503, f"usage is unavailable for a moment ({type(e).__name__}): retry") from e

    def cycle(self, tenant_id: str, customer_id: str) -> BillingCycle | None:
        """The customer's cycle, or None when the tenant has no such customer (no usage, no cycle set)."""
        with self._connection() as conn:
            # One round trip: the cycle set for it, else whether it has usage at all.
            row = conn.execute(
                f"SELECT 0 AS o, anchor_day, timezone FROM ({cycle_sql(self.cfg.billing.cycles_table)}) c "
                f"UNION ALL (SELECT 1, NULL, NULL FROM {rollup_table(self.cfg.postgres.usage_table)} "
                "WHERE tenant_id = %s AND customer_id = %s LIMIT 1) ORDER BY o LIMIT 1",
                (tenant_id, customer_id, tenant_id, customer_id),
            ).fetchone()
        if row is None:
            return None
        return BillingCycle(row[1], row[2]) if row[0] == 0 else BillingCycle()

    def read(self, tenant_id: str, query: UsageQuery) -> tuple[list[Total], list[CountedCorrection], datetime | None]:
        """The query's totals, its counted corrections and the close horizon, in one snapshot."""
        usage_table = self.cfg.postgres.usage_table
        with_meter = query.meter is not None
        meter = [query.meter] if with_meter else []
        where = [tenant_id, query.customer_id, query.since, query.until, *meter]
        totals: list[Total] = []
        # BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY (the pool's connections): one snapshot.
        with self._connection() as conn, conn.transaction():
            horizon = conn.execute(last_final_end_sql(usage_table)).fetchone()
            if query.granularity == "window":
                sql, params = windows_sql(usage_table, query.group_by, with_meter)
                # One row past the limit, so more is seen and refused rather than cut off unsaid.
                rows = conn.execute(sql, [*params, *where, MAX_WINDOW_ROWS + 1]).fetchall()
                if len(rows) > MAX_WINDOW_ROWS:
                    msg = f"more than {MAX_WINDOW_ROWS} windows: narrow from and to, or ask per day"
                    raise RequestRefusedError(400, msg)
                for meter_name, grp, start, end, qty, events, windows, finals, revision in rows:
                    totals.append(Total(meter_name, grp, start, end, qty, int(events), windows, finals, revision))
            else:
                sql, params = spans_sql(usage_table, query.group_by, with_meter)
                starts = [s for s, _ in query.spans]
                ends = [e for _, e in query.spans]
                rows = conn.execute(sql, [*params, starts, ends, *where]).fetchall()
                # Postgres sums bigints as numeric: whole numbers, read as int.
                for meter_name, grp, n, qty, events, windows, finals, revision in rows:
                    start, end = query.spans[n - 1]
                    totals.append(
                        Total(meter_name, grp, start, end, qty, int(events), int(windows), int(finals), int(revision))
                    )
            corrections: list[CountedCorrection] = []
            table = self.cfg.corrections.table
            self._corrections_exist = self._corrections_exist or table_exists(conn, table)
            if self._corrections_exist:
                found = conn.execute(corrections_in_range_sql(table, with_meter), where).fetchall()
                corrections = [CountedCorrection(*row) for row in found]
        return totals, corrections, horizon[0] if horizon else None
