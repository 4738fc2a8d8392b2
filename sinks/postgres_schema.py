"""Pure SQL for the Postgres side of meterflow: the usage table and its never-go-backwards guard.

Window timestamps are ``timestamp`` columns holding UTC (the job runs with a UTC session zone).
"""

from __future__ import annotations

import re

from meterflow.config import PG_TABLE_PATTERN
from meterflow.window_row import WINDOW_KEY, WINDOW_ROW, WINDOW_SPAN, names, postgres_column_lines

_IDENTIFIER = re.compile(PG_TABLE_PATTERN)


def check_identifier(name: str) -> str:
    """Accept only plain lower-case SQL identifiers, so generated DDL can never be injected into."""
    if not _IDENTIFIER.match(name):
        msg = f"not a plain SQL identifier: {name!r}"
        raise ValueError(msg)
    return name


# The window a row refers to, as every table but the usage table declares it (the usage table's
# own key has a default dimensions_key); a CREATE TABLE body line each, indented like the others.
WINDOW_COLUMNS_DDL = postgres_column_lines(WINDOW_KEY + WINDOW_SPAN)


# A usage row's key: the window's key and its span (so its size: windows of two sizes that start together are two rows).
USAGE_KEY_COLUMNS = names(WINDOW_KEY + WINDOW_SPAN)


def usage_table_ddl(table: str = "usage_windows") -> list[str]:
    """Statements that create the usage table and its guard; safe to run again (idempotent)."""
    t = check_identifier(table)
    return [
        f"""CREATE TABLE IF NOT EXISTS {t} (
    tenant_id    text           NOT NULL,
    customer_id  text           NOT NULL,
    meter        text           NOT NULL,
    dimensions_key text         NOT NULL DEFAULT '{{}}',
    window_start timestamp(3)   NOT NULL,
    window_end   timestamp(3)   NOT NULL,
    quantity     numeric(38, 9) NOT NULL,
    event_count  bigint         NOT NULL,
    revision     bigint         NOT NULL,
    is_final     boolean        NOT NULL DEFAULT false,
    created_at   timestamptz    NOT NULL DEFAULT now(),
    updated_at   timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, customer_id, meter, dimensions_key, window_start, window_end)
)""",
        # A table made before the key held the window's end (so its size) gets the new key.
        f"""DO $$ DECLARE name text; BEGIN
    SELECT c.conname INTO name FROM pg_constraint c WHERE c.conrelid = '{t}'::regclass AND c.contype = 'p'
        AND NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey) AND a.attname = 'window_end');
    IF name IS NOT NULL THEN
        EXECUTE format('ALTER TABLE {t} DROP CONSTRAINT %I', name);
        ALTER TABLE {t} ADD PRIMARY KEY ({", ".join(USAGE_KEY_COLUMNS)});
    END IF;
END $$""",
        # Batches are committed once their checkpoint completed, and again if the job restored before
        # the commit finished: keep the newer revision. A final row changes only when the window
        # closer closes the window again with more events (a source partition that rejoined behind
        # the others, docs/operations.md): the newer final is what billing bills in total (the first
        # value plus a correction), so Postgres holds it too. Nothing else changes a final row.
        f"""CREATE OR REPLACE FUNCTION {t}_keep_newest() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.revision < OLD.revision OR (OLD.is_final AND NOT (NEW.is_final AND NEW.revision > OLD.revision)) THEN
        RETURN NULL;
    END IF;
    NEW.created_at := OLD.created_at;
    NEW.updated_at := now();
    RETURN NEW;
END
$$""",
        f"DROP TRIGGER IF EXISTS {t}_keep_newest ON {t}",
        f"""CREATE TRIGGER {t}_keep_newest BEFORE UPDATE ON {t}
    FOR EACH ROW EXECUTE FUNCTION {t}_keep_newest()""",
    ]


# What the job writes per window, in the order jvm/ UsageWindowSink binds them.
USAGE_WRITE_COLUMNS = (*names(WINDOW_ROW), "is_final")


def usage_upsert_sql(table: str = "usage_windows") -> str:
    """The statement the job's committing sink runs per window row (one transaction per checkpoint).

    Idempotent: the same batch committed twice leaves the same rows; the trigger refuses older
    revisions and any change to a final row but a newer final one, so a final flag is never taken back.
    """
    t = check_identifier(table)
    cols = ", ".join(USAGE_WRITE_COLUMNS)
    marks = ", ".join("?" for _ in USAGE_WRITE_COLUMNS)
    # is_final as written: the trigger tells a newer final row from a re-fire by it, and refuses the re-fire of a final row.
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in USAGE_WRITE_COLUMNS if c not in USAGE_KEY_COLUMNS)
    return f"INSERT INTO {t} ({cols}) VALUES ({marks}) ON CONFLICT ({', '.join(USAGE_KEY_COLUMNS)}) DO UPDATE SET {updates}"


def last_final_end_sql(table: str = "usage_windows") -> str:
    """The latest end of a final window (NULL: none is final): every window ending by then is closed."""
    return f"SELECT max(window_end) FROM {check_identifier(table)} WHERE is_final"


def usage_rows_sql(table: str = "usage_windows") -> str:
    """Query for all usage rows, in a stable order."""
    t = check_identifier(table)
    return (
        "SELECT tenant_id, customer_id, meter, dimensions_key, window_start, window_end, quantity, event_count, revision, is_final, updated_at "
        f"FROM {t} ORDER BY window_start, tenant_id, customer_id, meter, dimensions_key"
    )
