"""psycopg adapter for the usage table: apply the schema, read rows. Thin over sinks/postgres_schema.py."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.abc import Params

from meterflow.config import PostgresConfig
from meterflow.errors import SinkError
from sinks.postgres_schema import last_final_end_sql, usage_rows_sql, usage_table_ddl
from sinks.usage_rollup_schema import rollup_ddl


@dataclass(frozen=True)
class UsageRow:
    """One window of usage as stored in Postgres."""

    tenant_id: str
    customer_id: str
    meter: str
    dimensions_key: str
    window_start: datetime
    window_end: datetime
    quantity: Decimal
    event_count: int
    revision: int
    is_final: bool
    updated_at: datetime


def connect(pg: PostgresConfig) -> psycopg.Connection:
    """Open a connection; the password comes from config (env or secrets file), never from code."""
    password = pg.password.get_secret_value() if pg.password else None
    try:
        return psycopg.connect(pg.conninfo(), password=password, connect_timeout=5)
    except psycopg.OperationalError as e:
        msg = f"cannot connect to Postgres at {pg.host}:{pg.port}/{pg.database}: {e}"
        raise SinkError(msg) from e


def scalar(conn: psycopg.Connection, sql: str, params: Params | None = None) -> Any:
    """The first column of the one row a query returns (an aggregate's), or an error saying which query returned none."""
    row = conn.execute(sql, params).fetchone()
    if row is None:
        msg = f"expected one row from: {sql[:120]}"
        raise SinkError(msg)
    return row[0]


def table_exists(conn: psycopg.Connection, table: str) -> bool:
    """Whether ``table`` (optionally schema-qualified) exists, so readers of optional tables need not fail."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [table]).fetchone()
    return bool(row and row[0])


def apply_schema(pg: PostgresConfig) -> None:
    """Create the usage table, its guard and its rollup (the usage API's) in one transaction (idempotent)."""
    with connect(pg) as conn, conn.transaction():
        for statement in [*usage_table_ddl(pg.usage_table), *rollup_ddl(pg.usage_table)]:
            conn.execute(statement)


def last_final_end(pg: PostgresConfig) -> datetime | None:
    """The end of the latest final window in the usage table (naive UTC), None when none is final."""
    with connect(pg) as conn:
        return scalar(conn, last_final_end_sql(pg.usage_table))


def fetch_usage(pg: PostgresConfig) -> list[UsageRow]:
    """All usage rows, ordered by window then key."""
    with connect(pg) as conn:
        return [UsageRow(*row) for row in conn.execute(usage_rows_sql(pg.usage_table)).fetchall()]
