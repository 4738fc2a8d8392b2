"""The delivery ledger on Postgres for the async deliverer (psycopg's asyncio connections).

Thin over sinks/ledger_schema.py. Every write commits on its own (autocommit): the ledger records
what happened at the provider, which no Flink checkpoint can roll back. A few connections per
worker let concurrent deliveries' commits overlap (Postgres flushes them together) instead of
queueing behind one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal

import psycopg

from meterflow.config import JobConfig
from meterflow.errors import SinkError
from sinks.billing import ClosedWindow, Delivery, LedgerEntry, MeterEvent
from sinks.ledger_schema import (
    accepted_total_sql,
    claim_existing_sql,
    claim_new_sql,
    defer_sql,
    delivery_state_sql,
    delivery_window_sql,
    due_retries_sql,
    mark_sql,
    record_check_sql,
)


class AsyncPostgresLedger:
    """The Ledger of sinks/delivery.py; ``worker`` names this worker's claims (unique per run)."""

    def __init__(self, cfg: JobConfig, worker: str, connections: int = 4) -> None:
        self.table, self.customers, self.worker = cfg.billing.ledger_table, cfg.billing.customers_table, worker
        self.lease_s = cfg.billing.retry_lease.total_seconds()
        self._pg = cfg.postgres
        self._size = connections
        self._idle: asyncio.Queue[psycopg.AsyncConnection] | None = None
        self._all: list[psycopg.AsyncConnection] = []

    async def _connect(self) -> psycopg.AsyncConnection:
        password = self._pg.password.get_secret_value() if self._pg.password else None
        try:
            conn = await psycopg.AsyncConnection.connect(self._pg.conninfo(), password=password, connect_timeout=5, autocommit=True)
        except psycopg.OperationalError as e:
            msg = f"cannot connect to Postgres at {self._pg.host}:{self._pg.port}/{self._pg.database}: {e}"
            raise SinkError(msg) from e
        self._all.append(conn)
        return conn

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[psycopg.AsyncConnection]:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self._size):
                self._idle.put_nowait(await self._connect())
        conn = await self._idle.get()
        try:
            if conn.closed or conn.broken:
                self._all.remove(conn)
                conn = await self._connect()
            yield conn
        finally:
            self._idle.put_nowait(conn)

    async def _fetchone(self, sql: str, params: dict) -> tuple | None:
        async with self._conn() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchone()

    async def _execute(self, sql: str, params: dict) -> None:
        async with self._conn() as conn:
            await conn.execute(sql, params)

    async def close(self) -> None:
        for conn in self._all:
            await conn.close()
        self._all.clear()
        self._idle = None

    # -- the Ledger protocol ---------------------------------------------------------------------
    async def claim(self, delivery: Delivery, provider: str, event_name: str, *, retry: bool) -> LedgerEntry:
        w = delivery.window
        params = {
            "identifier": delivery.identifier, "provider": provider, "kind": delivery.kind, "window_identifier": delivery.window_identifier,
            "tenant_id": w.tenant_id, "customer_id": w.customer_id, "meter": w.meter, "dimensions_key": w.dimensions_key,
            "window_start_ms": w.window_start_ms, "window_end_ms": w.window_end_ms, "quantity": delivery.quantity,
            "event_count": w.event_count, "revision": delivery.revision, "event_name": event_name,
            "lease_s": self.lease_s, "worker": self.worker, "retry": retry,
        }  # fmt: skip
        sql = claim_existing_sql(self.table, self.customers) if retry else claim_new_sql(self.table, self.customers)
        row = await self._fetchone(sql, params)
        if row is not None:
            return _entry(row, claimed=True)
        row = await self._fetchone(delivery_state_sql(self.table, self.customers), {"identifier": delivery.identifier})
        if row is None:
            msg = f"delivery {delivery.identifier} vanished from the ledger"
            raise SinkError(msg)
        return _entry(row, claimed=False)

    async def delivery(self, identifier: str) -> Delivery | None:
        row = await self._fetchone(delivery_window_sql(self.table), {"identifier": identifier})
        if row is None:
            return None
        ident, kind, parent, tenant, customer, meter, dims, start, end, quantity, count, revision = row
        window = ClosedWindow(tenant, customer, meter, dims, int(start), int(end), quantity, count, revision)
        return Delivery(ident, kind, parent, window, quantity, revision)

    async def mark_sent(self, identifier: str, event: MeterEvent, response_id: str, attempts: int) -> None:
        params = {"identifier": identifier, "attempts": attempts, "value": event.value, "provider_customer_id": event.provider_customer_id, "response_id": response_id}
        await self._execute(mark_sql(self.table, "sent"), params)

    async def mark_failed(self, identifier: str, attempts: int, error: str, delay: float) -> None:
        await self._execute(mark_sql(self.table, "failed"), {"identifier": identifier, "attempts": attempts, "error": error, "delay_s": delay})

    async def mark_dead(self, identifier: str, attempts: int, reason: str) -> None:
        await self._execute(mark_sql(self.table, "dead"), {"identifier": identifier, "attempts": attempts, "error": reason})

    async def mark_rejected(self, identifier: str, reason: str) -> None:
        await self._execute(mark_sql(self.table, "rejected"), {"identifier": identifier, "error": reason})

    async def defer(self, identifier: str, until: float) -> None:
        await self._execute(defer_sql(self.table), {"identifier": identifier, "until": until, "worker": self.worker})

    async def record_check(self, identifier: str, decision: str, *, resend: bool) -> None:
        await self._execute(record_check_sql(self.table), {"identifier": identifier, "decision": decision, "resend": resend})

    async def accepted_total(self, identifier: str, provider_customer_id: str, event_name: str, start: int, end: int) -> Decimal:
        params = {"identifier": identifier, "provider": "stripe", "provider_customer_id": provider_customer_id, "event_name": event_name, "start": start, "end": end}
        row = await self._fetchone(accepted_total_sql(self.table), params)
        return Decimal(row[0]) if row else Decimal(0)


def _entry(row: tuple, *, claimed: bool) -> LedgerEntry:
    identifier, kind, status, attempts, quantity, revision, first_attempt_at, customer, corrections_total, corrections_revision = row
    return LedgerEntry(identifier, kind, status, attempts, quantity, revision, first_attempt_at, customer, Decimal(corrections_total), int(corrections_revision), claimed)


def due_retries(conn: psycopg.Connection, cfg: JobConfig, limit: int) -> list[tuple]:
    """(identifier, tenant, customer, meter, dimensions_key, window start ms, window end ms) of every delivery due for a retry, leased."""
    params = {"provider": cfg.billing.provider, "lease_s": cfg.billing.retry_lease.total_seconds(), "limit": limit}
    return conn.execute(due_retries_sql(cfg.billing.ledger_table), params).fetchall()
