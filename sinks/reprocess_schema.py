"""Pure SQL for reprocessing: the shadow table of recomputed windows, and the metered side of a period.

A period is compared window by window (key and span): the usage table's rows of the current
window size, plus every correction recorded for each window (late events, earlier reprocesses).
Statements use psycopg ``%s`` placeholders.
"""

from __future__ import annotations

from sinks.postgres_schema import USAGE_KEY_COLUMNS, WINDOW_COLUMNS_DDL, check_identifier

_KEY = ", ".join(USAGE_KEY_COLUMNS)
# Windows of the period, of the current size: [since, until) by start, and end - start = size.
_IN_PERIOD = "window_start >= %s AND window_start < %s AND window_end - window_start = %s"


def shadow_table_ddl(table: str) -> list[str]:
    """The shadow table: recomputed windows beside the usage table, with the period that wrote them."""
    s = check_identifier(table)
    return [
        f"""CREATE TABLE IF NOT EXISTS {s} (
{WINDOW_COLUMNS_DDL}
    quantity       numeric(38, 9) NOT NULL,
    event_count    bigint         NOT NULL,
    period_since   timestamp(3)   NOT NULL,
    period_until   timestamp(3)   NOT NULL,
    recomputed_at  timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY ({_KEY})
)"""
    ]


def clear_shadow_sql(table: str) -> str:
    """Remove the period's windows (since, until, size) from the shadow table before writing them again."""
    return f"DELETE FROM {check_identifier(table)} WHERE {_IN_PERIOD}"


def insert_shadow_sql(table: str) -> str:
    """One recomputed window: key, span, quantity, events, the period."""
    return (
        f"INSERT INTO {check_identifier(table)} ({_KEY}, quantity, event_count, period_since, period_until) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    )


def period_rows_sql(usage_table: str) -> str:
    """The usage rows of the period (since, until, size): key, span, quantity, is_final."""
    return f"SELECT {_KEY}, quantity, is_final FROM {check_identifier(usage_table)} WHERE {_IN_PERIOD}"


def period_corrections_sql(corrections_table: str) -> str:
    """Per window of the period (since, until, size), the deltas of every correction recorded for it,
    whatever its status: billed, held for approval, reported, or rejected by an operator (whose
    decision not to bill those events a recomputation must not undo)."""
    return f"SELECT {_KEY}, sum(delta) FROM {check_identifier(corrections_table)} WHERE {_IN_PERIOD} GROUP BY {_KEY}"


def other_sizes_sql(table: str) -> str:
    """How many rows of ``table`` (usage rows or corrections) overlap the period (since, until) with
    a span other than the current window size: a period billed in windows of another size."""
    return f"SELECT count(*) FROM {check_identifier(table)} WHERE window_start < %s AND window_end > %s AND window_end - window_start <> %s"


def changed_since_sql(corrections_table: str) -> str:
    """How many corrections of the period (since, until) were recorded or decided at or after a time."""
    return (
        f"SELECT count(*) FROM {check_identifier(corrections_table)} WHERE window_start >= %s AND window_start < %s "
        "AND (applied_at >= %s OR decided_at >= %s)"
    )


def known_corrections_sql(corrections_table: str) -> str:
    """Which of the given correction ids (an array) are recorded already."""
    return f"SELECT correction_id FROM {check_identifier(corrections_table)} WHERE correction_id = ANY(%s)"
