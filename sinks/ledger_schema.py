"""Pure SQL for billing: the customer mapping, the delivery ledger, and the reconciliation query.

A delivery that reached ``sent`` never leaves it (a trigger ignores such updates), so a late
replay can't make the ledger forget that the provider accepted a window.
"""

from __future__ import annotations

from sinks.postgres_schema import check_identifier

STATUSES = ("pending", "sent", "failed", "dead")


def billing_tables_ddl(customers_table: str = "billing_customers", ledger_table: str = "billing_deliveries") -> list[str]:
    """Statements that create both billing tables and the ledger's guard; safe to run again."""
    c, d = check_identifier(customers_table), check_identifier(ledger_table)
    statuses = ", ".join(f"'{s}'" for s in STATUSES)
    return [
        f"""CREATE TABLE IF NOT EXISTS {c} (
    tenant_id            text        NOT NULL,
    customer_id          text        NOT NULL,
    provider             text        NOT NULL DEFAULT 'stripe',
    provider_customer_id text        NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, customer_id, provider)
)""",
        f"""CREATE TABLE IF NOT EXISTS {d} (
    identifier           text           PRIMARY KEY,
    provider             text           NOT NULL,
    tenant_id            text           NOT NULL,
    customer_id          text           NOT NULL,
    meter                text           NOT NULL,
    dimensions_key       text           NOT NULL,
    window_start         timestamp(3)   NOT NULL,
    window_end           timestamp(3)   NOT NULL,
    quantity             numeric(38, 9) NOT NULL,
    event_count          bigint         NOT NULL,
    event_name           text           NOT NULL,
    provider_customer_id text,
    value                text,
    status               text           NOT NULL CHECK (status IN ({statuses})),
    attempts             integer        NOT NULL DEFAULT 0,
    last_error           text,
    provider_response_id text,
    created_at           timestamptz    NOT NULL DEFAULT now(),
    updated_at           timestamptz    NOT NULL DEFAULT now(),
    sent_at              timestamptz,
    UNIQUE (provider, tenant_id, customer_id, meter, dimensions_key, window_start)
)""",
        f"CREATE INDEX IF NOT EXISTS {d}_status ON {d} (status) WHERE status <> 'sent'",
        f"""CREATE OR REPLACE FUNCTION {d}_keep_sent() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'sent' AND NEW.status <> 'sent' THEN
        RETURN NULL;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$""",
        f"DROP TRIGGER IF EXISTS {d}_keep_sent ON {d}",
        f"CREATE TRIGGER {d}_keep_sent BEFORE UPDATE ON {d} FOR EACH ROW EXECUTE FUNCTION {d}_keep_sent()",
    ]


def begin_delivery_sql(ledger_table: str) -> str:
    """Insert a pending delivery unless one exists; a not-yet-sent one takes the window's latest value."""
    d = check_identifier(ledger_table)
    return (
        f"INSERT INTO {d} (identifier, provider, tenant_id, customer_id, meter, dimensions_key, window_start, window_end, quantity, event_count, event_name, status) "
        "VALUES (%(identifier)s, %(provider)s, %(tenant_id)s, %(customer_id)s, %(meter)s, %(dimensions_key)s, "
        "to_timestamp(%(window_start_ms)s / 1000.0) AT TIME ZONE 'UTC', to_timestamp(%(window_end_ms)s / 1000.0) AT TIME ZONE 'UTC', "
        "%(quantity)s, %(event_count)s, %(event_name)s, 'pending') "
        f"ON CONFLICT (identifier) DO UPDATE SET quantity = EXCLUDED.quantity, event_count = EXCLUDED.event_count "
        f"WHERE {d}.status <> 'sent' AND ({d}.quantity, {d}.event_count) IS DISTINCT FROM (EXCLUDED.quantity, EXCLUDED.event_count)"
    )


def delivery_state_sql(ledger_table: str) -> str:
    """Status and attempts of one delivery."""
    return f"SELECT identifier, status, attempts FROM {check_identifier(ledger_table)} WHERE identifier = %(identifier)s"


def mark_sql(ledger_table: str, status: str) -> str:
    """Move a delivery to ``sent``, ``failed`` or ``dead``."""
    d = check_identifier(ledger_table)
    if status == "sent":
        return (
            f"UPDATE {d} SET status = 'sent', attempts = %(attempts)s, value = %(value)s, provider_customer_id = %(provider_customer_id)s, "
            "provider_response_id = %(response_id)s, last_error = NULL, sent_at = now() WHERE identifier = %(identifier)s"
        )
    if status in ("failed", "dead"):
        return f"UPDATE {d} SET status = '{status}', attempts = %(attempts)s, last_error = %(error)s WHERE identifier = %(identifier)s"
    msg = f"a delivery can't be marked {status!r}"
    raise ValueError(msg)


def provider_customer_sql(customers_table: str) -> str:
    """The provider's customer id of one tenant's customer."""
    return (
        f"SELECT provider_customer_id FROM {check_identifier(customers_table)} "
        "WHERE tenant_id = %(tenant_id)s AND customer_id = %(customer_id)s AND provider = %(provider)s"
    )


def upsert_customer_sql(customers_table: str) -> str:
    """Map (or re-map) a tenant's customer to the provider's customer id."""
    c = check_identifier(customers_table)
    return (
        f"INSERT INTO {c} (tenant_id, customer_id, provider, provider_customer_id) VALUES (%(tenant_id)s, %(customer_id)s, %(provider)s, %(provider_customer_id)s) "
        "ON CONFLICT (tenant_id, customer_id, provider) DO UPDATE SET provider_customer_id = EXCLUDED.provider_customer_id, updated_at = now()"
    )


DELIVERY_COLUMNS = (
    "identifier", "provider", "tenant_id", "customer_id", "meter", "dimensions_key", "window_start", "window_end", "quantity",
    "event_count", "event_name", "provider_customer_id", "value", "status", "attempts", "last_error", "provider_response_id",
    "created_at", "updated_at", "sent_at",
)  # fmt: skip


def deliveries_sql(ledger_table: str, statuses: tuple[str, ...] = ()) -> str:
    """Deliveries, oldest window first, optionally only those in the given statuses."""
    where = " WHERE status = ANY(%(statuses)s)" if statuses else ""
    return f"SELECT {', '.join(DELIVERY_COLUMNS)} FROM {check_identifier(ledger_table)}{where} ORDER BY window_start, identifier"


def status_summary_sql(ledger_table: str) -> str:
    """Per provider and status: deliveries, total quantity, oldest window, last update."""
    return (
        "SELECT provider, status, count(*), sum(quantity), min(window_start), max(updated_at) "
        f"FROM {check_identifier(ledger_table)} GROUP BY provider, status ORDER BY provider, status"
    )


def final_windows_sql(usage_table: str) -> str:
    """Final windows (closed, is_final) with when they were last written, for reconciliation."""
    return (
        "SELECT tenant_id, customer_id, meter, dimensions_key, window_start, quantity, updated_at "
        f"FROM {check_identifier(usage_table)} WHERE is_final"
    )


def ledger_windows_sql(ledger_table: str) -> str:
    """Every delivery of one provider, keyed like the final windows."""
    return (
        "SELECT tenant_id, customer_id, meter, dimensions_key, window_start, quantity, status, last_error "
        f"FROM {check_identifier(ledger_table)} WHERE provider = %(provider)s"
    )
