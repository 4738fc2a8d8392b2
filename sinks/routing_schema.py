"""Pure SQL of routing (billing/routing.py): the mappings' effective month, and each window's destination."""

from __future__ import annotations

from sinks.postgres_schema import check_identifier


def routing_ddl(customers_table: str) -> list[str]:
    """The month a mapping takes effect from (NULL: from the start); safe to run again."""
    c = check_identifier(customers_table)
    return [f"ALTER TABLE {c} ADD COLUMN IF NOT EXISTS effective_from timestamp"]


def mapped_destination_sql(c: str, tenant: str, customer: str, at: str) -> str:
    """The destination of a customer's mapping in effect at ``at``: the latest that took effect by then."""
    return (
        f"(SELECT m.provider FROM {c} m WHERE m.tenant_id = {tenant} AND m.customer_id = {customer} "
        f"AND (m.effective_from IS NULL OR m.effective_from <= {at}) ORDER BY m.effective_from DESC NULLS LAST LIMIT 1)"
    )


def window_destinations_sql(ledger_table: str, customers_table: str) -> str:
    """Each window's destination, in the order given: the destination whose ledger recorded the window,
    else its customer's mapping in effect at the window's start, else ``%(default)s``.

    Parameters: arrays ``identifier`` (each window's own delivery identifier), ``tenant_id``,
    ``customer_id``, ``meter``, ``dimensions_key``, ``window_start_ms``, ``window_end_ms`` (one element
    per window), and ``destinations`` (every declared one). The window is found by its identifier at
    any destination, a declared one or not (on the primary key), and by its key at the declared ones
    (on their index on the window's key: a window recorded under an identifier of an earlier form).
    """
    d, c = check_identifier(ledger_table), check_identifier(customers_table)
    start = "to_timestamp(v.window_start_ms / 1000.0) AT TIME ZONE 'UTC'"
    end = "to_timestamp(v.window_end_ms / 1000.0) AT TIME ZONE 'UTC'"
    by_identifier = f"(SELECT i.provider FROM {d} i WHERE i.identifier = v.identifier)"
    by_key = (
        f"(SELECT w.provider FROM {d} w WHERE w.kind = 'window' AND w.provider = ANY(%(destinations)s::text[]) "
        "AND w.tenant_id = v.tenant_id AND w.customer_id = v.customer_id AND w.meter = v.meter "
        f"AND w.dimensions_key = v.dimensions_key AND w.window_start = {start} AND w.window_end = {end} LIMIT 1)"
    )
    return (
        f"SELECT coalesce({by_identifier}, {by_key}, {mapped_destination_sql(c, 'v.tenant_id', 'v.customer_id', start)}, %(default)s) "
        "FROM unnest(%(identifier)s::text[], %(tenant_id)s::text[], %(customer_id)s::text[], %(meter)s::text[], %(dimensions_key)s::text[], "
        "%(window_start_ms)s::bigint[], %(window_end_ms)s::bigint[]) WITH ORDINALITY "
        "AS v(identifier, tenant_id, customer_id, meter, dimensions_key, window_start_ms, window_end_ms, n) ORDER BY v.n"
    )


def recorded_elsewhere_sql(ledger_table: str) -> str:
    """Whether the ledger holds any delivery at a destination other than ``destinations``."""
    return f"SELECT EXISTS (SELECT 1 FROM {check_identifier(ledger_table)} WHERE provider <> ALL(%(destinations)s::text[]))"


def delivery_destinations_sql(ledger_table: str) -> str:
    """(identifier, destination) of recorded deliveries (``identifier``: an array)."""
    return f"SELECT identifier, provider FROM {check_identifier(ledger_table)} WHERE identifier = ANY(%(identifier)s::text[])"


def latest_recorded_sql(ledger_table: str) -> str:
    """The start of a customer's latest window in the ledger, at any of ``destinations``."""
    return (
        f"SELECT max(window_start) FROM {check_identifier(ledger_table)} WHERE kind = 'window' AND provider = ANY(%(destinations)s::text[]) "
        "AND tenant_id = %(tenant_id)s AND customer_id = %(customer_id)s"
    )


def upsert_mapping_sql(customers_table: str) -> str:
    """Map a tenant's customer at a destination, in effect from ``effective_from`` (NULL: from the start)."""
    c = check_identifier(customers_table)
    return (
        f"INSERT INTO {c} (tenant_id, customer_id, provider, provider_customer_id, effective_from) "
        "VALUES (%(tenant_id)s, %(customer_id)s, %(provider)s, %(provider_customer_id)s, %(effective_from)s) "
        "ON CONFLICT (tenant_id, customer_id, provider) DO UPDATE SET provider_customer_id = EXCLUDED.provider_customer_id, "
        "effective_from = EXCLUDED.effective_from, updated_at = now()"
    )


def lock_customer_sql() -> str:
    """Serialise the mappings of one (tenant, customer) for the transaction, whether or not it has any yet."""
    return "SELECT pg_advisory_xact_lock(hashtextextended(%(tenant_id)s || chr(31) || %(customer_id)s, 0))"


def rehome_unmapped_sql(ledger_table: str) -> str:
    """Move to ``provider`` a customer's deliveries that were refused, without a call, for want of a
    mapping (``reason``: the refusal's start): nothing of them reached any destination, so the
    destination the customer is now mapped at bills them on replay. Returns their identifiers."""
    return (
        f"UPDATE {check_identifier(ledger_table)} SET provider = %(provider)s WHERE tenant_id = %(tenant_id)s "
        "AND customer_id = %(customer_id)s AND provider <> %(provider)s AND status = 'dead' AND attempts = 0 "
        "AND last_error LIKE %(reason)s RETURNING identifier"
    )
