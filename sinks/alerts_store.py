"""Threshold alerts in Postgres: the tenants' rules and webhook endpoints, and the delivery ledger of
crossings (one row per rule, customer and period: its primary key is the crossing's identifier).

Statements use psycopg ``%s`` placeholders; table names come from the config and are checked.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from meterflow.alerts import BASES, PERIODS, STATUSES, AlertRule, Crossing
from meterflow.alerts_config import AlertsConfig
from sinks.postgres_schema import check_identifier
from sinks.usage_rollup_schema import rollup_table


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def alerts_ddl(a: AlertsConfig) -> list[str]:
    rules, endpoints, crossings = (check_identifier(t) for t in (a.rules_table, a.endpoints_table, a.crossings_table))
    return [
        f"""CREATE TABLE IF NOT EXISTS {rules} (
    tenant_id   text           NOT NULL,
    rule_id     text           NOT NULL,
    meter       text           NOT NULL,
    threshold   numeric(38, 9) NOT NULL CHECK (threshold > 0),
    period      text           NOT NULL CHECK (period IN ({_in(PERIODS)})),
    basis       text           NOT NULL CHECK (basis IN ({_in(BASES)})),
    created_at  timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, rule_id)
)""",
        f"""CREATE TABLE IF NOT EXISTS {endpoints} (
    tenant_id   text        PRIMARY KEY,
    url         text        NOT NULL,
    secret      text        NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
)""",
        f"""CREATE TABLE IF NOT EXISTS {crossings} (
    crossing_id     text           PRIMARY KEY,
    tenant_id       text           NOT NULL,
    rule_id         text           NOT NULL,
    customer_id     text           NOT NULL,
    meter           text           NOT NULL,
    period          text           NOT NULL,
    basis           text           NOT NULL,
    period_start    timestamp(3)   NOT NULL,
    period_end      timestamp(3)   NOT NULL,
    threshold       numeric(38, 9) NOT NULL,
    total           numeric(38, 9) NOT NULL,
    crossed_at      timestamp(3)   NOT NULL,
    status          text           NOT NULL DEFAULT 'pending' CHECK (status IN ({_in(STATUSES)})),
    attempts        integer        NOT NULL DEFAULT 0,
    next_attempt_at timestamptz    NOT NULL DEFAULT now(),
    last_error      text,
    sent_at         timestamptz,
    UNIQUE (tenant_id, rule_id, customer_id, period_start)
)""",
        f"CREATE INDEX IF NOT EXISTS {crossings}_due ON {crossings} (next_attempt_at) WHERE status IN ('pending', 'failed')",
    ]


def apply_alerts_schema(conn: psycopg.Connection, a: AlertsConfig) -> None:
    with conn.transaction():
        for statement in alerts_ddl(a):
            conn.execute(statement)


def add_rule(conn: psycopg.Connection, a: AlertsConfig, rule: AlertRule) -> None:
    conn.execute(
        f"INSERT INTO {check_identifier(a.rules_table)} (tenant_id, rule_id, meter, threshold, period, basis) VALUES (%s, %s, %s, %s, %s, %s)",
        (rule.tenant_id, rule.rule_id, rule.meter, rule.threshold, rule.period, rule.basis),
    )


def remove_rule(conn: psycopg.Connection, a: AlertsConfig, tenant_id: str, rule_id: str) -> int:
    t = check_identifier(a.rules_table)
    return conn.execute(f"DELETE FROM {t} WHERE tenant_id = %s AND rule_id = %s", (tenant_id, rule_id)).rowcount


def rules(conn: psycopg.Connection, a: AlertsConfig, tenant_id: str | None = None) -> list[AlertRule]:
    t = check_identifier(a.rules_table)
    rows = conn.execute(
        f"SELECT rule_id, tenant_id, meter, threshold, period, basis FROM {t} WHERE %s::text IS NULL OR tenant_id = %s ORDER BY 2, 1",
        (tenant_id, tenant_id),
    ).fetchall()
    return [AlertRule(*row) for row in rows]


def set_endpoint(conn: psycopg.Connection, a: AlertsConfig, tenant_id: str, url: str, secret: str) -> None:
    t = check_identifier(a.endpoints_table)
    conn.execute(
        f"INSERT INTO {t} (tenant_id, url, secret) VALUES (%s, %s, %s) ON CONFLICT (tenant_id) DO UPDATE "
        "SET url = EXCLUDED.url, secret = EXCLUDED.secret, updated_at = now()",
        (tenant_id, url, secret),
    )


def endpoint(conn: psycopg.Connection, a: AlertsConfig, tenant_id: str) -> tuple[str, str] | None:
    """A tenant's webhook URL and signing secret."""
    t = check_identifier(a.endpoints_table)
    row = conn.execute(f"SELECT url, secret FROM {t} WHERE tenant_id = %s", (tenant_id,)).fetchone()
    return (row[0], row[1]) if row else None


def oldest_running_xid(conn: psycopg.Connection) -> int:
    """Every transaction with an id below this one has ended: what a later pass reads changes from."""
    row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()
    return int(row[0]) if row else 0


def changed_usage(
    conn: psycopg.Connection, usage_table: str, a: AlertsConfig, since_xid: int | None, since: datetime
) -> list[tuple[str, str, str, datetime, datetime]]:
    """(tenant, customer, meter, earliest and latest bucket changed) of the usage of meters some rule
    watches, written by a transaction from ``since_xid`` on (None: changed after ``since``, a timestamptz).

    By transaction id, not by time: a row written early by a transaction that commits late still has
    an id no lower than the oldest transaction running when the last pass began."""
    r, rules_t = rollup_table(usage_table), check_identifier(a.rules_table)
    changed = "r.last_xid >= %s::text::xid8" if since_xid is not None else "r.updated_at > %s"
    return conn.execute(
        f"""SELECT r.tenant_id, r.customer_id, r.meter, min(r.bucket_start), max(r.bucket_start)
FROM {r} r WHERE {changed}
    AND EXISTS (SELECT 1 FROM {rules_t} a WHERE a.tenant_id = r.tenant_id AND a.meter = r.meter)
GROUP BY 1, 2, 3""",
        (str(since_xid) if since_xid is not None else since,),
    ).fetchall()


def customers_with_usage(
    conn: psycopg.Connection, usage_table: str, tenant_id: str, meter: str, since: datetime
) -> list[str]:
    """A tenant's customers with usage of ``meter`` from ``since`` on."""
    r = rollup_table(usage_table)
    rows = conn.execute(
        f"SELECT DISTINCT customer_id FROM {r} WHERE tenant_id = %s AND meter = %s AND bucket_start >= %s",
        (tenant_id, meter, since),
    ).fetchall()
    return [row[0] for row in rows]


def period_totals(
    conn: psycopg.Connection, usage_table: str, key: tuple[str, str, str], start: datetime, end: datetime
) -> tuple[Decimal, Decimal]:
    """(every window's total, the final windows' total) of a customer's meter over ``[start, end)``."""
    r = rollup_table(usage_table)
    row = conn.execute(
        f"SELECT coalesce(sum(quantity), 0), coalesce(sum(final_quantity), 0) FROM {r} "
        "WHERE tenant_id = %s AND customer_id = %s AND meter = %s AND bucket_start >= %s AND bucket_start < %s",
        (*key, start, end),
    ).fetchone()
    return (row[0], row[1]) if row else (Decimal(0), Decimal(0))


def record_crossing(conn: psycopg.Connection, a: AlertsConfig, c: Crossing) -> bool:
    """Record a crossing unless its rule, customer and period have one; True when recorded now."""
    t = check_identifier(a.crossings_table)
    return (
        conn.execute(
            f"INSERT INTO {t} (crossing_id, tenant_id, rule_id, customer_id, meter, period, basis, period_start, period_end, "
            "threshold, total, crossed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (
                c.crossing_id,
                c.tenant_id,
                c.rule_id,
                c.customer_id,
                c.meter,
                c.period,
                c.basis,
                c.period_start,
                c.period_end,
                c.threshold,
                c.total,
                c.crossed_at,
            ),
        ).rowcount
        == 1
    )


_CROSSING_COLUMNS = "crossing_id, rule_id, tenant_id, customer_id, meter, period, basis, period_start, period_end, threshold, total, crossed_at"


def claim_due(
    conn: psycopg.Connection, a: AlertsConfig, hold: timedelta, limit: int = 50
) -> list[tuple[Crossing, int]]:
    """Crossings due for an attempt, each held for ``hold`` (a second service skips them meanwhile), with their attempts so far."""
    t = check_identifier(a.crossings_table)
    rows = conn.execute(
        f"""UPDATE {t} SET next_attempt_at = now() + %s WHERE crossing_id IN (
    SELECT crossing_id FROM {t} WHERE status IN ('pending', 'failed') AND next_attempt_at <= now()
    ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED)
RETURNING {_CROSSING_COLUMNS}, attempts""",
        (hold, limit),
    ).fetchall()
    return [(Crossing(*row[:12]), row[12]) for row in rows]


def mark_sent(conn: psycopg.Connection, a: AlertsConfig, crossing_id: str) -> None:
    t = check_identifier(a.crossings_table)
    conn.execute(
        f"UPDATE {t} SET status = 'sent', attempts = attempts + 1, sent_at = now(), last_error = NULL "
        "WHERE crossing_id = %s AND status IN ('pending', 'failed')",
        (crossing_id,),
    )


def mark_failed(
    conn: psycopg.Connection, a: AlertsConfig, crossing_id: str, error: str, dead: bool, wait: timedelta
) -> None:
    t = check_identifier(a.crossings_table)
    conn.execute(
        f"UPDATE {t} SET status = %s, attempts = attempts + 1, last_error = %s, next_attempt_at = now() + %s "
        "WHERE crossing_id = %s AND status IN ('pending', 'failed')",
        ("dead" if dead else "failed", error[:500], wait, crossing_id),
    )


def crossings(conn: psycopg.Connection, a: AlertsConfig, status: str | None = None) -> list[dict[str, Any]]:
    t = check_identifier(a.crossings_table)
    cur = conn.execute(
        f"SELECT {_CROSSING_COLUMNS}, status, attempts, last_error, sent_at FROM {t} "
        "WHERE %s::text IS NULL OR status = %s ORDER BY crossed_at, crossing_id",
        (status, status),
    )
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def replay(conn: psycopg.Connection, a: AlertsConfig, crossing_id: str | None) -> int:
    """Dead crossings (one, or all) due again with fresh attempts; how many."""
    t = check_identifier(a.crossings_table)
    return conn.execute(
        f"UPDATE {t} SET status = 'pending', attempts = 0, next_attempt_at = now() "
        "WHERE status = 'dead' AND (%s::text IS NULL OR crossing_id = %s)",
        (crossing_id, crossing_id),
    ).rowcount


def pending_count(conn: psycopg.Connection, a: AlertsConfig) -> tuple[int, int]:
    """(crossings waiting for delivery, dead ones)."""
    t = check_identifier(a.crossings_table)
    row = conn.execute(
        f"SELECT count(*) FILTER (WHERE status IN ('pending', 'failed')), count(*) FILTER (WHERE status = 'dead') FROM {t}"
    ).fetchone()
    return (row[0], row[1]) if row else (0, 0)
