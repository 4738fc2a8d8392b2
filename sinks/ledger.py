"""The billing tables in Postgres (psycopg): customer mapping, delivery ledger, reconciliation reads.

Thin over sinks/ledger_schema.py. Every ledger write commits on its own (autocommit): the ledger
records what happened at the provider, which no Flink checkpoint can roll back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from meterflow.config import JobConfig
from sinks.billing import ClosedWindow, CustomerMapping, LedgerEntry, MeterEvent
from sinks.ledger_schema import (
    DELIVERY_COLUMNS,
    begin_delivery_sql,
    billing_tables_ddl,
    deliveries_sql,
    delivery_state_sql,
    final_windows_sql,
    ledger_windows_sql,
    mark_sql,
    provider_customer_sql,
    status_summary_sql,
    upsert_customer_sql,
)
from sinks.postgres import apply_schema, connect
from sinks.reconcile import FinalWindow, LedgerWindow


def apply_billing_schema(cfg: JobConfig) -> None:
    """Create the billing tables and the ledger guard (idempotent)."""
    with connect(cfg.postgres) as conn, conn.transaction():
        for statement in billing_tables_ddl(cfg.billing.customers_table, cfg.billing.ledger_table):
            conn.execute(statement)


def apply_schemas(cfg: JobConfig) -> None:
    """Every table the job writes: usage windows, and the billing tables (all idempotent)."""
    apply_schema(cfg.postgres)
    apply_billing_schema(cfg)


class PostgresLedger:
    """The Ledger of sinks/billing.py on one autocommit connection."""

    def __init__(self, cfg: JobConfig, conn: psycopg.Connection | None = None) -> None:
        self.table, self.customers = cfg.billing.ledger_table, cfg.billing.customers_table
        self._pg = cfg.postgres
        self._conn = conn

    @property
    def conn(self) -> psycopg.Connection:
        # Reconnect after Postgres restarts: the next write simply opens a new connection.
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self._pg)
            self._conn.autocommit = True
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def begin(self, window: ClosedWindow, identifier: str, provider: str, event_name: str) -> LedgerEntry:
        params = {
            "identifier": identifier, "provider": provider, "tenant_id": window.tenant_id, "customer_id": window.customer_id,
            "meter": window.meter, "dimensions_key": window.dimensions_key, "window_start_ms": window.window_start_ms,
            "window_end_ms": window.window_end_ms, "quantity": window.quantity, "event_count": window.event_count, "event_name": event_name,
        }  # fmt: skip
        self.conn.execute(begin_delivery_sql(self.table), params)
        row = self.conn.execute(delivery_state_sql(self.table), {"identifier": identifier}).fetchone()
        return LedgerEntry(*row)

    def provider_customer(self, tenant_id: str, customer_id: str, provider: str) -> str | None:
        row = self.conn.execute(provider_customer_sql(self.customers), {"tenant_id": tenant_id, "customer_id": customer_id, "provider": provider}).fetchone()
        return row[0] if row else None

    def mark_sent(self, identifier: str, event: MeterEvent, response_id: str, attempts: int) -> None:
        params = {"identifier": identifier, "attempts": attempts, "value": event.value, "provider_customer_id": event.provider_customer_id, "response_id": response_id}
        self.conn.execute(mark_sql(self.table, "sent"), params)

    def mark_failed(self, identifier: str, attempts: int, error: str) -> None:
        self.conn.execute(mark_sql(self.table, "failed"), {"identifier": identifier, "attempts": attempts, "error": error})

    def mark_dead(self, identifier: str, attempts: int, reason: str) -> None:
        self.conn.execute(mark_sql(self.table, "dead"), {"identifier": identifier, "attempts": attempts, "error": reason})


@dataclass(frozen=True)
class Delivery:
    """One ledger row."""

    identifier: str
    provider: str
    tenant_id: str
    customer_id: str
    meter: str
    dimensions_key: str
    window_start: datetime
    window_end: datetime
    quantity: Decimal
    event_count: int
    event_name: str
    provider_customer_id: str | None
    value: str | None
    status: str
    attempts: int
    last_error: str | None
    provider_response_id: str | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None

    def closed_window(self, revision: int = 0) -> ClosedWindow:
        """The window this delivery is for, as the forwarder saw it."""
        def ms(t: datetime) -> int:
            return int(t.replace(tzinfo=UTC).timestamp() * 1000)

        return ClosedWindow(self.tenant_id, self.customer_id, self.meter, self.dimensions_key, ms(self.window_start), ms(self.window_end), self.quantity, self.event_count, revision)


assert tuple(Delivery.__dataclass_fields__) == DELIVERY_COLUMNS  # noqa: S101 - the query and the row type are one contract


def fetch_deliveries(cfg: JobConfig, statuses: tuple[str, ...] = ()) -> list[Delivery]:
    """Ledger rows, oldest window first, optionally only in the given statuses."""
    with connect(cfg.postgres) as conn:
        return [Delivery(*r) for r in conn.execute(deliveries_sql(cfg.billing.ledger_table, statuses), {"statuses": list(statuses)}).fetchall()]


def status_summary(cfg: JobConfig) -> list[tuple[Any, ...]]:
    """(provider, status, deliveries, quantity, oldest window, last update) rows."""
    with connect(cfg.postgres) as conn:
        return conn.execute(status_summary_sql(cfg.billing.ledger_table)).fetchall()


def map_customer(cfg: JobConfig, tenant_id: str, customer_id: str, provider_customer_id: str) -> None:
    """Map a tenant's customer to the provider's customer id (replacing an earlier mapping)."""
    map_customers(cfg, [CustomerMapping(tenant_id, customer_id, provider_customer_id)])


def map_customers(cfg: JobConfig, mappings: list[CustomerMapping]) -> None:
    """Map many customers in one transaction: all or none."""
    rows = [{"tenant_id": m.tenant_id, "customer_id": m.customer_id, "provider": cfg.billing.provider, "provider_customer_id": m.provider_customer_id} for m in mappings]
    with connect(cfg.postgres) as conn, conn.transaction(), conn.cursor() as cur:
        cur.executemany(upsert_customer_sql(cfg.billing.customers_table), rows)


def fetch_customers(cfg: JobConfig) -> list[tuple[str, str, str, str]]:
    """(tenant_id, customer_id, provider, provider_customer_id) of every mapping."""
    with connect(cfg.postgres) as conn:
        table = cfg.billing.customers_table
        return conn.execute(f"SELECT tenant_id, customer_id, provider, provider_customer_id FROM {table} ORDER BY 1, 2, 3").fetchall()  # noqa: S608 - validated identifier


def fetch_reconciliation_input(cfg: JobConfig, grace: timedelta) -> tuple[list[FinalWindow], list[LedgerWindow]]:
    """Final windows (marked settled when finalised before now - grace) and the provider's ledger rows."""
    cutoff = datetime.now(UTC) - grace
    with connect(cfg.postgres) as conn:
        finals = conn.execute(final_windows_sql(cfg.postgres.usage_table), {}).fetchall()
        ledger = conn.execute(ledger_windows_sql(cfg.billing.ledger_table), {"provider": cfg.billing.provider}).fetchall()
    return [FinalWindow(*r[:6], settled=r[6] <= cutoff) for r in finals], [LedgerWindow(*r) for r in ledger]
