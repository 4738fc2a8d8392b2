"""Pure SQL for corrections from late events: the corrections table, the table of late events
recorded per ``(tenant_id, event_id)``, and the queries of ``meterflow corrections``.

An event is recorded at most once (primary key ``(tenant_id, event_id)``, inserted with ``ON
CONFLICT DO NOTHING``), in the same transaction as the correction it is part of, so a re-run or an
overlapping time range never corrects it again. Statements use psycopg ``%s`` placeholders.
"""

from __future__ import annotations

from meterflow.corrections import CORRECTION_STATUSES, COUNTED_STATUSES, CURRENT_STATUSES, EVENT_OUTCOMES
from sinks.postgres_schema import WINDOW_COLUMNS_DDL, check_identifier

WINDOW_COLUMNS = ("tenant_id", "customer_id", "meter", "dimensions_key", "window_start", "window_end")
# A window is its key and its span: windows of two sizes that start together are two windows.
WINDOW_KEY = WINDOW_COLUMNS
CORRECTION_COLUMNS = ("correction_id", *WINDOW_COLUMNS, "delta", "events", "status", "reason")
EVENT_COLUMNS = (
    "tenant_id",
    "event_id",
    "customer_id",
    "meter",
    "dimensions_key",
    "window_start",
    "window_end",
    "quantity",
    "event_time",
    "outcome",
    "correction_id",
    "reason",
)


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def corrections_ddl(table: str = "usage_corrections", events_table: str = "usage_correction_events") -> list[str]:
    """Statements that create both tables; safe to run again."""
    c, e = check_identifier(table), check_identifier(events_table)
    return [
        f"""CREATE TABLE IF NOT EXISTS {c} (
    correction_id  text           PRIMARY KEY,
{WINDOW_COLUMNS_DDL}
    delta          numeric(38, 9) NOT NULL,
    events         bigint         NOT NULL CHECK (events > 0),
    status         text           NOT NULL CHECK (status IN ({_in(CORRECTION_STATUSES)})),
    reason         text           NOT NULL,
    applied_at     timestamptz    NOT NULL DEFAULT now(),
    decided_at     timestamptz,
    decided_by     text,
    decision_note  text
)""",
        f"CREATE INDEX IF NOT EXISTS {c}_window ON {c} (tenant_id, customer_id, meter, dimensions_key, window_start)",
        f"CREATE INDEX IF NOT EXISTS {c}_status ON {c} (status)",
        f"""CREATE TABLE IF NOT EXISTS {e} (
{WINDOW_COLUMNS_DDL}
    event_id       text           NOT NULL,
    quantity       numeric(38, 9) NOT NULL,
    event_time     timestamp(3)   NOT NULL,
    outcome        text           NOT NULL CHECK (outcome IN ({_in(EVENT_OUTCOMES)})),
    correction_id  text           REFERENCES {c} (correction_id),
    reason         text           NOT NULL,
    recorded_at    timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, event_id),
    CHECK ((outcome = 'corrected') = (correction_id IS NOT NULL))
)""",
        f"CREATE INDEX IF NOT EXISTS {e}_window ON {e} (tenant_id, customer_id, meter, dimensions_key, window_start)",
    ]


def offsets_ddl(offsets_table: str = "usage_correction_offsets") -> list[str]:
    """The incremental reader's place in the late topic: the next offset to read per partition."""
    o = check_identifier(offsets_table)
    return [
        f"""CREATE TABLE IF NOT EXISTS {o} (
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    next_offset    bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
)"""
    ]


def stored_offsets_sql(offsets_table: str = "usage_correction_offsets") -> str:
    """The stored next offsets of one topic."""
    return f"SELECT partition, next_offset FROM {check_identifier(offsets_table)} WHERE topic = %s"


def store_offset_sql(offsets_table: str = "usage_correction_offsets") -> str:
    """Store one partition's next offset (in the transaction of the batch it follows)."""
    o = check_identifier(offsets_table)
    return (
        f"INSERT INTO {o} (topic, partition, next_offset) VALUES (%s, %s, %s) "
        "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()"
    )


def apply_lock_sql(table: str = "usage_corrections") -> str:
    """Serialise ``corrections apply`` runs: a transaction-scoped advisory lock named after the table."""
    return f"SELECT pg_advisory_xact_lock(hashtext('meterflow:{check_identifier(table)}'))"


def known_events_sql(events_table: str = "usage_correction_events") -> str:
    """Which of ``(tenant_ids[], event_ids[])`` are already recorded."""
    e = check_identifier(events_table)
    return f"SELECT e.tenant_id, e.event_id FROM {e} e JOIN unnest(%s::text[], %s::text[]) AS k(tenant_id, event_id) ON e.tenant_id = k.tenant_id AND e.event_id = k.event_id"


_KEYS_ARG = "unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::timestamp[], %s::timestamp[]) AS k(tenant_id, customer_id, meter, dimensions_key, window_start, window_end)"


def _on_keys(alias: str) -> str:
    return " AND ".join(f"{alias}.{c} = k.{c}" for c in WINDOW_KEY)


def window_rows_sql(usage_table: str = "usage_windows") -> str:
    """The usage rows of the given windows (six parallel arrays: key and span): key, span, quantity, is_final."""
    u = check_identifier(usage_table)
    cols = ", ".join(f"u.{c}" for c in WINDOW_KEY)
    return f"SELECT {cols}, u.quantity, u.is_final FROM {u} u JOIN {_KEYS_ARG} ON {_on_keys('u')}"


def recorded_deltas_sql(table: str = "usage_corrections") -> str:
    """Per given window key, the sum of deltas of corrections that make up its current value."""
    c = check_identifier(table)
    cols = ", ".join(f"c.{col}" for col in WINDOW_KEY)
    return f"SELECT {cols}, sum(c.delta) FROM {c} c JOIN {_KEYS_ARG} ON {_on_keys('c')} WHERE c.status IN ({_in(CURRENT_STATUSES)}) GROUP BY {cols}"


def latest_corrected_sql(table: str = "usage_corrections", events_table: str = "usage_correction_events") -> str:
    """Per given window key, the newest corrected late event (event_time, event_id) of a correction that is not rejected."""
    c, e = check_identifier(table), check_identifier(events_table)
    cols = ", ".join(f"e.{col}" for col in WINDOW_KEY)
    return (
        f"SELECT DISTINCT ON ({cols}) {cols}, e.event_time, e.event_id FROM {e} e JOIN {c} c ON c.correction_id = e.correction_id JOIN {_KEYS_ARG} ON {_on_keys('e')} "
        f"WHERE e.outcome = 'corrected' AND c.status IN ({_in(CURRENT_STATUSES)}) ORDER BY {cols}, e.event_time DESC, e.event_id DESC"
    )


def insert_correction_sql(table: str = "usage_corrections") -> str:
    """One correction; ``applied_at`` comes from the caller's clock."""
    c = check_identifier(table)
    cols = (*CORRECTION_COLUMNS, "applied_at")
    return f"INSERT INTO {c} ({', '.join(cols)}) VALUES ({', '.join('%s' for _ in cols)})"


def insert_event_sql(events_table: str = "usage_correction_events") -> str:
    """One recorded late event; a second record of the same ``(tenant_id, event_id)`` is ignored and returns no row."""
    e = check_identifier(events_table)
    return f"INSERT INTO {e} ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('%s' for _ in EVENT_COLUMNS)}) ON CONFLICT (tenant_id, event_id) DO NOTHING RETURNING event_id"


def list_corrections_sql(
    table: str = "usage_corrections", *, tenant: bool = False, status: bool = False, correction_id: bool = False
) -> str:
    """Corrections, oldest window first; optional filters on tenant, status and correction id (in that order)."""
    c = check_identifier(table)
    where = [
        w
        for w, on in (("tenant_id = %s", tenant), ("status = %s", status), ("correction_id = %s", correction_id))
        if on
    ]
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT {', '.join(CORRECTION_COLUMNS)}, applied_at, decided_at, decided_by FROM {c}{clause} ORDER BY window_start, tenant_id, customer_id, meter, dimensions_key, correction_id"


def correction_status_for_update_sql(table: str = "usage_corrections") -> str:
    """A correction's status, locked for the operator's decision."""
    return f"SELECT status FROM {check_identifier(table)} WHERE correction_id = %s FOR UPDATE"


def decide_sql(table: str = "usage_corrections") -> str:
    """Record an operator's decision (new status, who, when, note)."""
    return f"UPDATE {check_identifier(table)} SET status = %s, decided_by = %s, decided_at = %s, decision_note = %s WHERE correction_id = %s"


def counted_deltas_sql(table: str = "usage_corrections") -> str:
    """Per window, the sum of the deltas that count in the corrected total, and the corrections' count."""
    c = check_identifier(table)
    key = ", ".join(WINDOW_COLUMNS)
    return f"SELECT {key}, sum(delta), count(*) FROM {c} WHERE status IN ({_in(COUNTED_STATUSES)}) GROUP BY {key}"


def recorded_event_outcomes_sql(events_table: str = "usage_correction_events", table: str = "usage_corrections") -> str:
    """Every recorded late event with its outcome and, when corrected, its correction's status."""
    e, c = check_identifier(events_table), check_identifier(table)
    return f"SELECT e.tenant_id, e.event_id, e.outcome, c.status FROM {e} e LEFT JOIN {c} c ON c.correction_id = e.correction_id"


def counted_corrections_sql(table: str = "usage_corrections") -> str:
    """Every correction that counts (and is billed), with when it came to count: for reconciliation."""
    c = check_identifier(table)
    return (
        "SELECT tenant_id, customer_id, meter, dimensions_key, window_start, window_end, delta, correction_id, coalesce(decided_at, applied_at) "
        f"FROM {c} WHERE status IN ({_in(COUNTED_STATUSES)})"
    )
