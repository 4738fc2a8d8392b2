"""The billing tables in Postgres (psycopg): schema, customer mapping, and the ledger reads of the CLI.

Thin over sinks/ledger_schema.py. The deliverer's own reads and writes are in sinks/ledger_async.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from billing.deliveries import NO_CUSTOMER, CustomerMapping, replay_refusal
from billing.reconcile import FinalWindow, LateCorrection, LedgerWindow, SentGroup
from billing.routing import mapping_refusal
from meterflow.billing_cycle import BillingCycle
from meterflow.config import JobConfig
from meterflow.destinations import STRIPE
from meterflow.errors import ConfigError
from sinks.corrections_schema import counted_corrections_sql
from sinks.ledger_schema import (
    DELIVERY_COLUMNS,
    billing_tables_ddl,
    deliveries_sql,
    final_windows_sql,
    ledger_windows_sql,
    sent_values_sql,
    status_summary_sql,
)
from sinks.postgres import apply_schema, connect, table_exists
from sinks.postgres_schema import check_identifier
from sinks.routing_schema import latest_recorded_sql, lock_customer_sql, rehome_unmapped_sql, upsert_mapping_sql


def apply_billing_schema(cfg: JobConfig) -> None:
    """Create the billing tables and the ledger guard (idempotent)."""
    with connect(cfg.postgres) as conn, conn.transaction():
        for statement in billing_tables_ddl(
            cfg.billing.customers_table, cfg.billing.ledger_table, cfg.billing.carry_table, cfg.billing.cycles_table
        ):
            conn.execute(statement)


def apply_schemas(cfg: JobConfig) -> None:
    """Every table the job writes: usage windows, and the billing tables (all idempotent)."""
    apply_schema(cfg.postgres)
    apply_billing_schema(cfg)


@dataclass(frozen=True)
class DeliveryRow:
    """One ledger row."""

    identifier: str
    provider: str
    kind: str
    window_identifier: str
    tenant_id: str
    customer_id: str
    meter: str
    dimensions_key: str
    window_start: datetime
    window_end: datetime
    quantity: Decimal
    event_count: int
    revision: int
    event_name: str
    provider_customer_id: str | None
    value: str | None
    status: str
    attempts: int
    last_error: str | None
    provider_response_id: str | None
    first_attempt_at: datetime | None
    next_attempt_at: datetime | None
    provider_check: str | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None

    def replay_refusal(self, now: datetime, dedup_window: timedelta) -> str | None:
        """Why ``billing replay`` must not re-send this delivery without ``--force``, or None."""
        return replay_refusal(self.first_attempt_at, now, dedup_window)


assert tuple(DeliveryRow.__dataclass_fields__) == DELIVERY_COLUMNS  # noqa: S101 - the query and the row type are one contract


def fetch_deliveries(cfg: JobConfig, statuses: tuple[str, ...] = ()) -> list[DeliveryRow]:
    """Ledger rows, oldest window first, optionally only in the given statuses."""
    with connect(cfg.postgres) as conn:
        return [
            DeliveryRow(*r)
            for r in conn.execute(
                deliveries_sql(cfg.billing.ledger_table, statuses), {"statuses": list(statuses)}
            ).fetchall()
        ]


def status_summary(cfg: JobConfig) -> list[tuple[Any, ...]]:
    """(provider, kind, status, deliveries, quantity, oldest window, last update) rows."""
    with connect(cfg.postgres) as conn:
        return conn.execute(status_summary_sql(cfg.billing.ledger_table)).fetchall()


def map_customer(
    cfg: JobConfig,
    tenant_id: str,
    customer_id: str,
    provider_customer_id: str,
    destination: str = STRIPE,
    effective_from: datetime | None = None,
) -> None:
    """Map a tenant's customer to its id at a destination, from a month on (None: from the start);
    a refusal (billing/routing.py mapping_refusal) raises ConfigError and writes nothing."""
    map_customers(cfg, [CustomerMapping(tenant_id, customer_id, provider_customer_id)], destination, effective_from)


def map_customers(
    cfg: JobConfig, mappings: list[CustomerMapping], destination: str = STRIPE, effective_from: datetime | None = None
) -> None:
    """Map many customers at one destination in one transaction: all or none (ConfigError naming each refusal)."""
    declared = cfg.billing.destination_names()
    customers, ledger = cfg.billing.customers_table, cfg.billing.ledger_table
    refusals = []
    with connect(cfg.postgres) as conn, conn.transaction(), conn.cursor() as cur:
        for m in mappings:
            key = {"tenant_id": m.tenant_id, "customer_id": m.customer_id}
            # Two mappings of one customer at once are decided one after the other, its first ones too.
            cur.execute(lock_customer_sql(), key)
            mapped = {
                p: _utc(at)
                for p, at in cur.execute(
                    f"SELECT provider, effective_from FROM {customers} WHERE tenant_id = %(tenant_id)s AND customer_id = %(customer_id)s",
                    key,
                ).fetchall()
            }
            latest = cur.execute(latest_recorded_sql(ledger), {**key, "destinations": list(declared)}).fetchone()
            refused = mapping_refusal(
                destination, effective_from, declared, mapped, _utc(latest[0] if latest else None)
            )
            if refused:
                refusals.append(f"{m.tenant_id}/{m.customer_id}: {refused}")
                continue
            # A new id at the customer's destination keeps the month its mapping takes effect from.
            since = mapped.get(destination) if effective_from is None else effective_from
            cur.execute(
                upsert_mapping_sql(customers),
                {
                    **key,
                    "provider": destination,
                    "provider_customer_id": m.provider_customer_id,
                    "effective_from": since.replace(tzinfo=None) if since else None,
                },
            )
            if since is None:
                # Windows refused elsewhere for want of any mapping go here, to be billed on replay.
                cur.execute(rehome_unmapped_sql(ledger), {**key, "provider": destination, "reason": f"{NO_CUSTOMER}%"})
        if refusals:
            raise ConfigError("; ".join(refusals))


def _utc(at: datetime | None) -> datetime | None:
    """A Postgres ``timestamp`` (UTC, naive) as an aware datetime."""
    return at.replace(tzinfo=UTC) if at is not None else None


def fetch_customers(cfg: JobConfig) -> list[tuple[str, str, str, str, datetime | None]]:
    """(tenant_id, customer_id, destination, provider_customer_id, effective_from) of every mapping."""
    with connect(cfg.postgres) as conn:
        table = cfg.billing.customers_table
        return conn.execute(
            f"SELECT tenant_id, customer_id, provider, provider_customer_id, effective_from FROM {table} ORDER BY 1, 2, 5 NULLS FIRST, 3"
        ).fetchall()


@dataclass(frozen=True)
class ReconciliationInput:
    """What reconciliation compares: final windows and counted late corrections (both marked settled
    when written before now - grace) against the provider's ledger rows."""

    finals: list[FinalWindow]
    ledger: list[LedgerWindow]
    late_corrections: list[LateCorrection]
    # Customers' billing cycles (none: calendar months in UTC): carried values add up per period.
    cycles: dict[tuple[str, str], BillingCycle] = field(default_factory=dict)


def fetch_ledger_windows(cfg: JobConfig) -> list[LedgerWindow]:
    """Every delivery at any destination, keyed like the final windows."""
    with connect(cfg.postgres) as conn:
        return [
            LedgerWindow(*r)
            for r in conn.execute(
                ledger_windows_sql(cfg.billing.ledger_table), {"destinations": list(cfg.billing.destination_names())}
            ).fetchall()
        ]


def fetch_reconciliation_input(cfg: JobConfig, grace: timedelta) -> ReconciliationInput:
    """Read both sides of the reconciliation (no late corrections when none was ever recorded)."""
    cutoff = datetime.now(UTC) - grace
    with connect(cfg.postgres) as conn:
        finals = conn.execute(final_windows_sql(cfg.postgres.usage_table), {}).fetchall()
        ledger = conn.execute(
            ledger_windows_sql(cfg.billing.ledger_table), {"destinations": list(cfg.billing.destination_names())}
        ).fetchall()
        late = (
            conn.execute(counted_corrections_sql(cfg.corrections.table)).fetchall()
            if table_exists(conn, cfg.corrections.table)
            else []
        )
        cycles = (
            conn.execute(
                f"SELECT tenant_id, customer_id, anchor_day, timezone FROM {check_identifier(cfg.billing.cycles_table)}"
            ).fetchall()
            if table_exists(conn, cfg.billing.cycles_table)
            else []
        )
    return ReconciliationInput(
        [FinalWindow(t, c, m, k, s, e, q, settled=at <= cutoff) for t, c, m, k, s, e, q, at in finals],
        [LedgerWindow(*r) for r in ledger],
        [
            LateCorrection(t, c, m, k, s, e, q, correction_id=i, settled=at <= cutoff)
            for t, c, m, k, s, e, q, i, at in late
        ],
        {(t, c): BillingCycle(anchor, tz) for t, c, anchor, tz in cycles},
    )


def fetch_sent_groups(cfg: JobConfig) -> list[SentGroup]:
    """The values the configured provider accepted, per provider customer, event name and month."""
    with connect(cfg.postgres) as conn:
        rows = conn.execute(
            sent_values_sql(cfg.billing.ledger_table, cfg.billing.customers_table), {"provider": cfg.billing.provider}
        ).fetchall()
    return [
        SentGroup(customer, event, month, Decimal(value), int(n), last, int(open_))
        for customer, event, month, value, n, last, open_ in rows
    ]
