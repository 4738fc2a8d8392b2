"""Pure SQL for billing: the customer mapping, the delivery ledger, and the reconciliation query.

One row per delivery: the window's own meter event (``kind = 'window'``) and any corrections of it
(``kind = 'correction'``, one per revision that changed the final value). A delivery that reached
``sent`` never leaves it (a trigger ignores such updates), so a late replay can't make the ledger
forget that the provider accepted it.

The ledger is also the retry queue: a delivery that failed waits with ``next_attempt_at``, and the
billing job's retry scan hands it to an attempt again when that time has come. Handing a delivery
to an attempt *claims* it: ``claimed_by`` names the attempt's worker and ``next_attempt_at`` moves
a lease ahead, so nothing else hands it out meanwhile.
"""

from __future__ import annotations

from meterflow.window_row import BRIDGE_FORMS, WINDOW_KEY, WINDOW_ROW, WINDOW_SPAN, bridge_names, names
from sinks.carry_schema import carry_ddl
from sinks.postgres_schema import WINDOW_COLUMNS_DDL, check_identifier
from sinks.routing_schema import mapped_destination_sql, routing_ddl

STATUSES = ("pending", "sent", "failed", "dead")
# What makes a window's own delivery unique: the provider, the window's key and its span.
WINDOW_DELIVERY_KEY = ("provider", *names(WINDOW_KEY + WINDOW_SPAN))
KINDS = ("window", "correction")


def billing_tables_ddl(
    customers_table: str = "billing_customers",
    ledger_table: str = "billing_deliveries",
    carry_table: str = "billing_carry",
    cycles_table: str = "billing_cycles",
) -> list[str]:
    """Statements that create the billing tables and the ledger's guard; safe to run again, and they
    bring a ledger created by an earlier version up to date."""
    c, d = check_identifier(customers_table), check_identifier(ledger_table)
    statuses = ", ".join(f"'{s}'" for s in STATUSES)
    kinds = ", ".join(f"'{k}'" for k in KINDS)
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
{WINDOW_COLUMNS_DDL}
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
    sent_at              timestamptz
)""",
        # Added after the first version: corrections, the retry queue, the provider's dedup window.
        f"ALTER TABLE {d} ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'window' CHECK (kind IN ({kinds}))",
        f"ALTER TABLE {d} ADD COLUMN IF NOT EXISTS window_identifier text",
        f"UPDATE {d} SET window_identifier = identifier WHERE window_identifier IS NULL",
        f"ALTER TABLE {d} ALTER COLUMN window_identifier SET NOT NULL",
        f"ALTER TABLE {d} ADD COLUMN IF NOT EXISTS revision bigint NOT NULL DEFAULT 0",
        f"ALTER TABLE {d} ADD COLUMN IF NOT EXISTS first_attempt_at timestamptz",
        f"UPDATE {d} SET first_attempt_at = created_at WHERE first_attempt_at IS NULL AND attempts > 0",
        f"ALTER TABLE {d} ADD COLUMN IF NOT EXISTS next_attempt_at timestamptz",
        f"ALTER TABLE {d} ADD COLUMN IF NOT EXISTS claimed_by text",
        # True while a claim's lease holds the delivery for an attempt in progress (not a retry's schedule).
        f"ALTER TABLE {d} ADD COLUMN IF NOT EXISTS leased boolean NOT NULL DEFAULT false",
        f"ALTER TABLE {d} ADD COLUMN IF NOT EXISTS provider_check text",
        # A correction from late events names its row in the corrections table; NULL for a
        # correction of a window's changed final (and for a window's own event).
        f"ALTER TABLE {d} ADD COLUMN IF NOT EXISTS correction_id text",
        # A window has one 'window' delivery; corrections share its key (the first version's unique
        # constraint on the key alone is dropped for that).
        f"""DO $$ DECLARE name text; BEGIN
    FOR name IN SELECT conname FROM pg_constraint WHERE conrelid = '{d}'::regclass AND contype = 'u' LOOP
        EXECUTE format('ALTER TABLE {d} DROP CONSTRAINT %I', name);
    END LOOP;
END $$""",
        # One 'window' delivery per window key and span: windows of two sizes that start together
        # (a changed event_time.window_size) are two windows. Replaces the first version's index on
        # the start alone.
        f"CREATE UNIQUE INDEX IF NOT EXISTS {d}_window_span ON {d} ({', '.join(WINDOW_DELIVERY_KEY)}) WHERE kind = 'window'",
        f"DROP INDEX IF EXISTS {d}_window",
        f"CREATE INDEX IF NOT EXISTS {d}_of_window ON {d} (window_identifier)",
        # The provider's report that it dropped the events of the request that carried a delivery.
        f"ALTER TABLE {d} ADD COLUMN IF NOT EXISTS provider_report text",
        f"CREATE INDEX IF NOT EXISTS {d}_response ON {d} (provider_response_id)",
        f"CREATE INDEX IF NOT EXISTS {d}_status ON {d} (status) WHERE status <> 'sent'",
        f"CREATE INDEX IF NOT EXISTS {d}_due ON {d} (next_attempt_at) WHERE status IN ('pending', 'failed')",
        f"""CREATE OR REPLACE FUNCTION {d}_keep_sent() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The one way out of sent: the provider reported, after accepting the request, that it did
    -- not count its events (reported_dead_sql); a new report each time.
    IF OLD.status = 'sent' AND NEW.status <> 'sent'
       AND NOT (NEW.status = 'dead' AND NEW.provider_report IS NOT NULL AND NEW.provider_report IS DISTINCT FROM OLD.provider_report) THEN
        RETURN NULL;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$""",
        f"DROP TRIGGER IF EXISTS {d}_keep_sent ON {d}",
        f"CREATE TRIGGER {d}_keep_sent BEFORE UPDATE ON {d} FOR EACH ROW EXECUTE FUNCTION {d}_keep_sent()",
        *carry_ddl(carry_table, cycles_table),
        *routing_ddl(customers_table),
    ]


def delivery_value_sql(ledger_table: str) -> str:
    """The value fixed for a delivery (NULL until fixed)."""
    return f"SELECT value FROM {check_identifier(ledger_table)} WHERE identifier = %(identifier)s"


def _state_columns(d: str, c: str) -> str:
    """What the deliverer reads about a delivery: its row, the mapped customer, and its window's corrections.

    Only corrections of a changed final count here (``correction_id IS NULL``): they are what the
    next final is compared with. Corrections from late events come on top of every final.
    """
    return (
        f"{d}.identifier, {d}.kind, {d}.status, {d}.attempts, {d}.quantity, {d}.revision, "
        f"extract(epoch FROM {d}.first_attempt_at)::float8, "
        f"(SELECT m.provider_customer_id FROM {c} m WHERE m.tenant_id = {d}.tenant_id AND m.customer_id = {d}.customer_id AND m.provider = {d}.provider), "
        f"(SELECT coalesce(sum(x.quantity), 0) FROM {d} x WHERE x.window_identifier = {d}.identifier AND x.kind = 'correction' AND x.correction_id IS NULL), "
        f"(SELECT coalesce(max(x.revision), 0) FROM {d} x WHERE x.window_identifier = {d}.identifier AND x.kind = 'correction' AND x.correction_id IS NULL), "
        f"{d}.value"
    )


# A delivery may be handed to an attempt when it is not final and nobody else holds it: a retry
# (the scan's lease, or the replay command) always; a closed window read from Kafka only when no
# attempt of this worker is scheduled (an earlier worker's claim died with it).
_CLAIMABLE = "{d}.status IN ('pending', 'failed') AND (%(retry)s OR {d}.next_attempt_at IS NULL OR {d}.next_attempt_at <= now() OR {d}.claimed_by IS DISTINCT FROM %(worker)s)"
_CLAIM_SET = "first_attempt_at = coalesce({d}.first_attempt_at, now()), next_attempt_at = now() + make_interval(secs => %(lease_s)s), claimed_by = %(worker)s, leased = true"


# The parameters of a claim that differ per delivery: arrays in claim_new_sql, one element each.
CLAIM_ROW_PARAMS = ("identifier", "provider", "kind", "window_identifier", *bridge_names(WINDOW_ROW), "event_name")
_CLAIM_ROW_TYPES = ("text", "text", "text", "text", *(BRIDGE_FORMS[c.kind].postgres for c in WINDOW_ROW), "text")
# What names a claimed row in claim_new_sql's answer: the identifier, or for a window's own event
# its key and span (its recorded identifier may be of an earlier form).
CLAIM_KEY = ("identifier",)
WINDOW_CLAIM_KEY = ("provider", *bridge_names(WINDOW_KEY + WINDOW_SPAN))


def claim_new_sql(ledger_table: str, customers_table: str, *, window: bool = False) -> str:
    """Record deliveries (pending) unless they exist, and claim each for an attempt if it may be attempted.

    Set-based: each name of :data:`CLAIM_ROW_PARAMS` is an array, one element per delivery;
    ``lease_s``, ``worker`` and ``retry`` are one value for all. Returns each claimed delivery's
    state followed by its key (:data:`CLAIM_KEY`, or :data:`WINDOW_CLAIM_KEY` with ``window``), and
    no row for one that exists but may not be attempted now (read it with
    :func:`delivery_state_sql`, or :func:`window_state_sql` for a window's own delivery). A recorded
    delivery's value never changes: its identifier must always carry the same parameters, so a
    changed final becomes a correction.

    ``window``: the deliveries are windows' own events, found by the window's key and span rather
    than by identifier, so a window recorded under an identifier of an earlier form is claimed under
    it (the state's first column is the recorded identifier).
    """
    d, c = check_identifier(ledger_table), check_identifier(customers_table)
    target = f"({', '.join(WINDOW_DELIVERY_KEY)}) WHERE kind = 'window'" if window else "(identifier)"
    key = _WINDOW_KEY_COLUMNS.format(d=d) if window else f"{d}.identifier"
    # Arrays go in binary (``%(name)b``): psycopg dumps them about 4 times faster than in text form,
    # where it escapes every element (bench/billing_analysis.md).
    arrays = ", ".join(f"%({name})b::{kind}[]" for name, kind in zip(CLAIM_ROW_PARAMS, _CLAIM_ROW_TYPES, strict=True))
    return (
        f"INSERT INTO {d} (identifier, provider, kind, window_identifier, tenant_id, customer_id, meter, dimensions_key, window_start, window_end, "
        "quantity, event_count, revision, event_name, status, first_attempt_at, next_attempt_at, claimed_by, leased) "
        "SELECT v.identifier, v.provider, v.kind, v.window_identifier, v.tenant_id, v.customer_id, v.meter, v.dimensions_key, "
        "to_timestamp(v.window_start_ms / 1000.0) AT TIME ZONE 'UTC', to_timestamp(v.window_end_ms / 1000.0) AT TIME ZONE 'UTC', "
        "v.quantity, v.event_count, v.revision, v.event_name, 'pending', now(), now() + make_interval(secs => %(lease_s)s), %(worker)s, true "
        f"FROM unnest({arrays}) AS v({', '.join(CLAIM_ROW_PARAMS)}) "
        f"ON CONFLICT {target} DO UPDATE SET {_CLAIM_SET.format(d=d)} "
        f"WHERE {_CLAIMABLE.format(d=d)} "
        f"RETURNING {_state_columns(d, c)}, {key}"
    )


_WINDOW_KEY_COLUMNS = (
    "{d}.provider, {d}.tenant_id, {d}.customer_id, {d}.meter, {d}.dimensions_key, "
    "(extract(epoch FROM {d}.window_start AT TIME ZONE 'UTC') * 1000)::bigint, (extract(epoch FROM {d}.window_end AT TIME ZONE 'UTC') * 1000)::bigint"
)
_WINDOW_START = "to_timestamp(%(window_start_ms)s / 1000.0) AT TIME ZONE 'UTC'"
_WINDOW_END = "to_timestamp(%(window_end_ms)s / 1000.0) AT TIME ZONE 'UTC'"


def window_state_sql(ledger_table: str, customers_table: str) -> str:
    """The state of a window's own delivery, found by the window's key and span (same columns as the claims)."""
    d, c = check_identifier(ledger_table), check_identifier(customers_table)
    return (
        f"SELECT {_state_columns(d, c)} FROM {d} WHERE {d}.kind = 'window' AND {d}.provider = %(provider)s AND {d}.tenant_id = %(tenant_id)s "
        f"AND {d}.customer_id = %(customer_id)s AND {d}.meter = %(meter)s AND {d}.dimensions_key = %(dimensions_key)s "
        f"AND {d}.window_start = {_WINDOW_START} AND {d}.window_end = {_WINDOW_END}"
    )


def claim_existing_sql(ledger_table: str, customers_table: str) -> str:
    """Claim an existing delivery for an attempt (retry scan, replay); no row when it may not be attempted."""
    d, c = check_identifier(ledger_table), check_identifier(customers_table)
    return f"UPDATE {d} SET {_CLAIM_SET.format(d=d)} WHERE {d}.identifier = %(identifier)s AND {_CLAIMABLE.format(d=d)} RETURNING {_state_columns(d, c)}"


def delivery_state_sql(ledger_table: str, customers_table: str) -> str:
    """The state of one delivery (same columns as the claims)."""
    d, c = check_identifier(ledger_table), check_identifier(customers_table)
    return f"SELECT {_state_columns(d, c)} FROM {d} WHERE {d}.identifier = %(identifier)s"


def delivery_window_sql(ledger_table: str) -> str:
    """The window a delivery belongs to, and its quantity, revision and kind (for retries)."""
    d = check_identifier(ledger_table)
    return (
        "SELECT identifier, kind, window_identifier, tenant_id, customer_id, meter, dimensions_key, "
        "(extract(epoch FROM window_start AT TIME ZONE 'UTC') * 1000)::bigint, (extract(epoch FROM window_end AT TIME ZONE 'UTC') * 1000)::bigint, "
        f"quantity, event_count, revision FROM {d} WHERE identifier = %(identifier)s"
    )


def owe_late_correction_sql(ledger_table: str, customers_table: str) -> str:
    """Record a correction from late events as owed: pending and due now, for the billing job's retry
    scan to deliver. Run in the transaction that applies or approves the correction, so the
    correction and its delivery are recorded together or not at all; recording it again does nothing.

    It goes to the destination that recorded its window (billing/routing.py), else to the one its
    customer's mapping names at the window's start, else to ``%(provider)s``.
    """
    d, c = check_identifier(ledger_table), check_identifier(customers_table)
    return (
        f"WITH w AS (SELECT w.identifier, w.provider FROM {d} w WHERE w.kind = 'window' AND w.provider = ANY(%(destinations)s::text[]) "
        "AND w.tenant_id = %(tenant_id)s AND w.customer_id = %(customer_id)s AND w.meter = %(meter)s AND w.dimensions_key = %(dimensions_key)s "
        "AND w.window_start = %(window_start)s AND w.window_end = %(window_end)s LIMIT 1) "
        f"INSERT INTO {d} (identifier, provider, kind, window_identifier, correction_id, tenant_id, customer_id, meter, dimensions_key, window_start, window_end, "
        "quantity, event_count, revision, event_name, status, next_attempt_at) "
        "SELECT %(identifier)s, "
        f"coalesce((SELECT provider FROM w), {mapped_destination_sql(c, '%(tenant_id)s', '%(customer_id)s', '%(window_start)s')}, %(provider)s), "
        # Linked to the window's delivery as recorded (it may carry an identifier of an earlier form).
        "'correction', coalesce((SELECT identifier FROM w), %(window_identifier)s), "
        "%(correction_id)s, %(tenant_id)s, %(customer_id)s, %(meter)s, %(dimensions_key)s, "
        "%(window_start)s, %(window_end)s, %(quantity)s, %(event_count)s, 0, %(event_name)s, 'pending', now() "
        "ON CONFLICT (identifier) DO NOTHING"
    )


def withdraw_late_correction_sql(ledger_table: str) -> str:
    """Take back a correction's delivery that was never handed to an attempt: it becomes ``dead``.

    Once an attempt has claimed it (``first_attempt_at`` set) a call may be on its way, so it stays.
    A claim and this update lock the same row, so exactly one of them wins. Returns the row's
    status and whether it was withdrawn; no row when the correction has no delivery.
    """
    d = check_identifier(ledger_table)
    return (
        f"WITH withdrawn AS (UPDATE {d} SET status = 'dead', last_error = %(reason)s, next_attempt_at = NULL "
        "WHERE correction_id = %(correction_id)s AND status = 'pending' AND first_attempt_at IS NULL RETURNING status) "
        f"SELECT status, EXISTS (SELECT 1 FROM withdrawn) FROM {d} WHERE correction_id = %(correction_id)s"
    )


# The parameters of mark_sent_sql, one element each per delivery.
SENT_ROW_PARAMS = ("identifier", "attempts", "value", "provider_customer_id", "response_id")


def mark_sent_sql(ledger_table: str) -> str:
    """Move deliveries to ``sent``. Set-based: each name of :data:`SENT_ROW_PARAMS` is an array, one element per delivery."""
    d = check_identifier(ledger_table)
    return (
        f"UPDATE {d} SET status = 'sent', attempts = v.attempts, value = v.value, provider_customer_id = v.provider_customer_id, "
        "provider_response_id = v.response_id, last_error = NULL, provider_report = NULL, sent_at = now(), next_attempt_at = NULL, leased = false "
        "FROM unnest(%(identifier)b::text[], %(attempts)b::int[], %(value)b::text[], %(provider_customer_id)b::text[], %(response_id)b::text[]) "
        f"AS v({', '.join(SENT_ROW_PARAMS)}) WHERE {d}.identifier = v.identifier"
    )


def mark_sql(ledger_table: str, status: str) -> str:
    """Move a delivery to ``failed`` (retry at ``next_attempt_at``) or ``dead`` (sent: :func:`mark_sent_sql`).

    ``rejected`` is ``dead`` without a call: the first-attempt time a claim set is taken back, as
    nothing reached the provider.
    """
    d = check_identifier(ledger_table)
    if status == "failed":
        return (
            f"UPDATE {d} SET status = 'failed', attempts = %(attempts)s, last_error = %(error)s, "
            "next_attempt_at = now() + make_interval(secs => %(delay_s)s), leased = false WHERE identifier = %(identifier)s"
        )
    if status == "dead":
        return f"UPDATE {d} SET status = 'dead', attempts = %(attempts)s, last_error = %(error)s, next_attempt_at = NULL, leased = false WHERE identifier = %(identifier)s"
    if status == "rejected":
        return (
            f"UPDATE {d} SET status = 'dead', last_error = %(error)s, next_attempt_at = NULL, leased = false, "
            "first_attempt_at = CASE WHEN attempts = 0 THEN NULL ELSE first_attempt_at END WHERE identifier = %(identifier)s"
        )
    msg = f"a delivery can't be marked {status!r}"
    raise ValueError(msg)


def reported_dead_sql(ledger_table: str) -> str:
    """Mark dead, with the provider's report, the sent deliveries of a request the provider reported
    errors for after accepting it (the v2 stream). A delivery sent again since carries another
    request id and is left alone; a replay of these resends the same identifiers."""
    d = check_identifier(ledger_table)
    return (
        f"UPDATE {d} SET status = 'dead', last_error = %(reason)s, provider_report = %(reason)s, next_attempt_at = NULL, leased = false "
        "WHERE provider = %(provider)s AND provider_response_id = %(request_id)s AND status = 'sent' RETURNING identifier"
    )


def defer_sql(ledger_table: str) -> str:
    """Leave a delivery for the retry scan at a later time (its key is backing off, or holds enough
    deliveries already); no attempt counted. A lease on it (this worker's claim, or the retry scan's
    hand-out it came with) gives way to that time; a retry scheduled later is never brought forward."""
    d = check_identifier(ledger_table)
    return (
        f"UPDATE {d} SET next_attempt_at = CASE WHEN leased THEN to_timestamp(%(until)s) "
        "ELSE greatest(coalesce(next_attempt_at, now()), to_timestamp(%(until)s)) END, claimed_by = %(worker)s, leased = false "
        "WHERE identifier = %(identifier)s AND status IN ('pending', 'failed')"
    )


def record_check_sql(ledger_table: str) -> str:
    """Record the provider check of an old delivery; a resend after it restarts the dedup window."""
    d = check_identifier(ledger_table)
    return (
        f"UPDATE {d} SET provider_check = to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\" ') || %(decision)s, "
        "first_attempt_at = CASE WHEN %(resend)s THEN now() ELSE first_attempt_at END WHERE identifier = %(identifier)s"
    )


def accepted_total_sql(ledger_table: str) -> str:
    """The values the ledger has as accepted for one provider customer and event over a time range, one delivery excluded."""
    d = check_identifier(ledger_table)
    return (
        f"SELECT coalesce(sum(value::numeric), 0) FROM {d} WHERE provider = %(provider)s AND status = 'sent' "
        "AND provider_customer_id = %(provider_customer_id)s AND event_name = %(event_name)s AND identifier <> %(identifier)s "
        "AND window_start >= to_timestamp(%(start)s) AT TIME ZONE 'UTC' AND window_start < to_timestamp(%(end)s) AT TIME ZONE 'UTC'"
    )


def due_retries_sql(ledger_table: str) -> str:
    """Hand out the deliveries whose retry is due at any of ``destinations``, oldest first, each leased so it is handed out once."""
    d = check_identifier(ledger_table)
    return (
        f"UPDATE {d} SET next_attempt_at = now() + make_interval(secs => %(lease_s)s), claimed_by = %(scanner)s, leased = true "
        f"WHERE identifier IN (SELECT identifier FROM {d} WHERE provider = ANY(%(destinations)s::text[]) AND status IN ('pending', 'failed') "
        "AND next_attempt_at <= now() ORDER BY next_attempt_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
        "RETURNING identifier, tenant_id, customer_id, meter, dimensions_key, "
        "(extract(epoch FROM window_start AT TIME ZONE 'UTC') * 1000)::bigint, (extract(epoch FROM window_end AT TIME ZONE 'UTC') * 1000)::bigint"
    )


def hold_sql(ledger_table: str) -> str:
    """Lease a recorded delivery to a worker until a time: it waits in that worker for its key's turn."""
    d = check_identifier(ledger_table)
    return (
        f"UPDATE {d} SET next_attempt_at = to_timestamp(%(until)s), claimed_by = %(worker)s, leased = true "
        "WHERE identifier = %(identifier)s AND status IN ('pending', 'failed')"
    )


def release_leases_sql(ledger_table: str) -> str:
    """Make due at once the deliveries leased by earlier runs of one worker (``prefix``: its name up to
    the run's id), other than ``worker`` itself: a restarted billing job attempts what its
    predecessor held instead of waiting out the lease. A retry's schedule is not a lease and stays."""
    d = check_identifier(ledger_table)
    return (
        f"UPDATE {d} SET next_attempt_at = now(), leased = false WHERE leased AND status IN ('pending', 'failed') "
        "AND provider = ANY(%(destinations)s::text[]) AND claimed_by LIKE %(prefix)s AND claimed_by <> %(worker)s RETURNING identifier"
    )


DELIVERY_COLUMNS = (
    "identifier",
    "provider",
    "kind",
    "window_identifier",
    *names(WINDOW_ROW),
    "event_name",
    "provider_customer_id",
    "value",
    "status",
    "attempts",
    "last_error",
    "provider_response_id",
    "first_attempt_at",
    "next_attempt_at",
    "provider_check",
    "created_at",
    "updated_at",
    "sent_at",
)


def deliveries_sql(ledger_table: str, statuses: tuple[str, ...] = ()) -> str:
    """Deliveries, oldest window first (a window before its corrections), optionally only those in the given statuses."""
    where = " WHERE status = ANY(%(statuses)s)" if statuses else ""
    return f"SELECT {', '.join(DELIVERY_COLUMNS)} FROM {check_identifier(ledger_table)}{where} ORDER BY window_start, window_identifier, kind DESC, revision"


def status_summary_sql(ledger_table: str) -> str:
    """Per provider, kind and status: deliveries, total quantity, oldest window, last update."""
    return (
        "SELECT provider, kind, status, count(*), sum(quantity), min(window_start), max(updated_at) "
        f"FROM {check_identifier(ledger_table)} GROUP BY provider, kind, status ORDER BY provider, kind DESC, status"
    )


def final_windows_sql(usage_table: str) -> str:
    """Final windows (closed, is_final) with when they were last written, for reconciliation."""
    return (
        "SELECT tenant_id, customer_id, meter, dimensions_key, window_start, window_end, quantity, updated_at "
        f"FROM {check_identifier(usage_table)} WHERE is_final"
    )


def ledger_windows_sql(ledger_table: str) -> str:
    """Every delivery at any of ``destinations``, keyed like the final windows, with its destination last."""
    return (
        "SELECT tenant_id, customer_id, meter, dimensions_key, window_start, window_end, quantity, status, last_error, kind, revision, correction_id, value, provider "
        f"FROM {check_identifier(ledger_table)} WHERE provider = ANY(%(destinations)s::text[])"
    )


def sent_values_sql(ledger_table: str, customers_table: str) -> str:
    """Per provider customer, event name and UTC month of the event's timestamp (its window start):
    the values the provider accepted, how many, when the last was accepted, and how many deliveries
    are still pending or failed (a call that timed out may have reached the provider)."""
    d, c = check_identifier(ledger_table), check_identifier(customers_table)
    customer = f"coalesce({d}.provider_customer_id, m.provider_customer_id)"
    return (
        f"SELECT {customer}, {d}.event_name, date_trunc('month', {d}.window_start), "
        f"coalesce(sum({d}.value::numeric) FILTER (WHERE {d}.status = 'sent'), 0), count(*) FILTER (WHERE {d}.status = 'sent'), "
        f"max({d}.sent_at), count(*) FILTER (WHERE {d}.status IN ('pending', 'failed')) "
        f"FROM {d} LEFT JOIN {c} m ON m.tenant_id = {d}.tenant_id AND m.customer_id = {d}.customer_id AND m.provider = {d}.provider "
        f"WHERE {d}.provider = %(provider)s AND {customer} IS NOT NULL GROUP BY 1, 2, 3 HAVING count(*) FILTER (WHERE {d}.status = 'sent') > 0 ORDER BY 3, 1, 2"
    )
