"""Pure SQL for the usage API: quarter-hour rollups kept by Postgres as windows commit, customers'
billing cycles, and the queries ``GET /v1/customers/{id}/usage`` runs.

The rollup holds, per window key and quarter hour (UTC) of the window's start, the sum of the
windows' quantities and events, how many windows there are and how many are final, the sum of the
final ones' quantities (threshold alerts on final usage), and a revision bumped at every change. A trigger on the usage table keeps it in the transaction that writes the
window (the job's checkpoint commit, a reprocess), so it never disagrees with the usage table. A
day or a billing period in any timezone is a set of whole quarter hours (meterflow/billing_cycle.py),
so the API sums at most 96 rows a day per key, never the raw windows.

The rollup is made from the usage table once, under a lock, when its trigger is created.
"""

from __future__ import annotations

from meterflow.corrections import COUNTED_STATUSES
from sinks.postgres_schema import check_identifier

# The rollup's bucket: a window counts in the quarter hour (UTC) its start falls in.
BUCKET = "15 minutes"
_BIN = f"date_bin('{BUCKET}', {{start}}, TIMESTAMP '2000-01-01')"


def rollup_table(usage_table: str) -> str:
    return check_identifier(f"{usage_table}_rollup")


def rollup_ddl(usage_table: str = "usage_windows") -> list[str]:
    """The rollup table, its trigger on the usage table (made once, from the rows already there), and
    the index the close horizon is read from; safe to run again."""
    u, r = check_identifier(usage_table), rollup_table(usage_table)
    key = "tenant_id, customer_id, meter, dimensions_key"

    def change(row: str, sign: str) -> str:
        # One window's part in its bucket, added (+) or taken away (-).
        return f"""INSERT INTO {r} AS r ({key}, bucket_start, quantity, event_count, windows, final_windows, final_quantity)
        VALUES ({row}.tenant_id, {row}.customer_id, {row}.meter, {row}.dimensions_key, {_BIN.format(start=f"{row}.window_start")},
                {sign}{row}.quantity, {sign}{row}.event_count, {sign}1, CASE WHEN {row}.is_final THEN {sign}1 ELSE 0 END,
                CASE WHEN {row}.is_final THEN {sign}{row}.quantity ELSE 0 END)
        ON CONFLICT ({key}, bucket_start) DO UPDATE SET
            quantity = r.quantity + EXCLUDED.quantity, event_count = r.event_count + EXCLUDED.event_count,
            windows = r.windows + EXCLUDED.windows, final_windows = r.final_windows + EXCLUDED.final_windows,
            final_quantity = r.final_quantity + EXCLUDED.final_quantity,
            revision = r.revision + 1, updated_at = clock_timestamp(), last_xid = pg_current_xact_id()"""

    return [
        f"""CREATE TABLE IF NOT EXISTS {r} (
    tenant_id      text           NOT NULL,
    customer_id    text           NOT NULL,
    meter          text           NOT NULL,
    dimensions_key text           NOT NULL,
    bucket_start   timestamp(3)   NOT NULL,
    quantity       numeric(38, 9) NOT NULL,
    event_count    bigint         NOT NULL,
    windows        integer        NOT NULL,
    final_windows  integer        NOT NULL,
    final_quantity numeric(38, 9) NOT NULL DEFAULT 0,
    revision       bigint         NOT NULL DEFAULT 1,
    updated_at     timestamptz    NOT NULL DEFAULT clock_timestamp(),
    -- The transaction that wrote it last: threshold alerts read changes in commit order by it.
    last_xid       xid8           NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (tenant_id, customer_id, meter, dimensions_key, bucket_start)
)""",
        # The usage API reads a customer's buckets over a range of time, across meters, from the
        # index alone (what it sums is in it): a few pages a period, wherever the rows lie.
        f"""CREATE INDEX IF NOT EXISTS {r}_customer_time ON {r} (tenant_id, customer_id, bucket_start)
    INCLUDE (meter, dimensions_key, quantity, event_count, windows, final_windows, revision)""",
        # Threshold alerts read what changed since their last pass.
        f"CREATE INDEX IF NOT EXISTS {r}_updated ON {r} (updated_at)",
        f"CREATE INDEX IF NOT EXISTS {r}_last_xid ON {r} (last_xid)",
        # The close horizon (the latest final window's end) without a scan of the usage table.
        f"CREATE INDEX IF NOT EXISTS {u}_final_end ON {u} (window_end) WHERE is_final",
        f"""CREATE OR REPLACE FUNCTION {r}_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.quantity = OLD.quantity AND NEW.event_count = OLD.event_count
        AND NEW.is_final = OLD.is_final AND NEW.window_start = OLD.window_start THEN
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        {change("OLD", "-")};
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        {change("NEW", "")};
    END IF;
    RETURN NULL;
END
$$""",
        f"""DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = '{r}_keep' AND tgrelid = '{u}'::regclass) THEN
        -- Made from the rows already there, with writers held off until the trigger exists; asked
        -- again under the lock, as a second process may have made it while this one waited.
        LOCK TABLE {u} IN SHARE ROW EXCLUSIVE MODE;
        IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = '{r}_keep' AND tgrelid = '{u}'::regclass) THEN
            RETURN;
        END IF;
        DELETE FROM {r};
        INSERT INTO {r} ({key}, bucket_start, quantity, event_count, windows, final_windows, final_quantity)
            SELECT {key}, {_BIN.format(start="window_start")}, sum(quantity), sum(event_count), count(*),
                   count(*) FILTER (WHERE is_final), coalesce(sum(quantity) FILTER (WHERE is_final), 0)
            FROM {u} GROUP BY {key}, 5;
        CREATE TRIGGER {r}_keep AFTER INSERT OR UPDATE OR DELETE ON {u}
            FOR EACH ROW EXECUTE FUNCTION {r}_keep();
    END IF;
END $$""",
    ]


def cycles_ddl(table: str = "billing_cycles") -> str:
    t = check_identifier(table)
    return f"""CREATE TABLE IF NOT EXISTS {t} (
    tenant_id   text        NOT NULL,
    customer_id text        NOT NULL,
    anchor_day  smallint    CHECK (anchor_day BETWEEN 1 AND 31),
    timezone    text        NOT NULL DEFAULT 'UTC',
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, customer_id)
)"""


def cycle_sql(table: str = "billing_cycles") -> str:
    """A customer's anchor day and timezone (no row: calendar months in UTC)."""
    return f"SELECT anchor_day, timezone FROM {check_identifier(table)} WHERE tenant_id = %s AND customer_id = %s"


def set_cycle_sql(table: str = "billing_cycles") -> str:
    t = check_identifier(table)
    return (
        f"INSERT INTO {t} (tenant_id, customer_id, anchor_day, timezone) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (tenant_id, customer_id) DO UPDATE SET anchor_day = EXCLUDED.anchor_day, "
        "timezone = EXCLUDED.timezone, updated_at = now()"
    )


def group_expression(group_by: tuple[str, ...]) -> tuple[str, list[str]]:
    """The SQL of a row's group (a JSON object of the named dimensions, '{}' for none) and its parameters."""
    if not group_by:
        return "'{}'::jsonb", []
    pairs = ", ".join("%s::text, dimensions_key::jsonb ->> %s" for _ in group_by)
    return f"jsonb_build_object({pairs})", [p for name in group_by for p in (name, name)]


def spans_sql(usage_table: str, group_by: tuple[str, ...], with_meter: bool) -> tuple[str, list[str]]:
    """Sums over spans of time that follow one another (days or periods) per meter and group; each span's
    number ``n`` (from 1) is found by bisecting the spans' bounds (``UsageQuery.bounds``), so one scan of
    the customer's buckets serves any number of spans.

    Parameters, after the group's: bounds, tenant, customer, since, until[, meter].
    """
    r = rollup_table(usage_table)
    group, group_params = group_expression(group_by)
    meter = " AND r.meter = %s" if with_meter else ""
    sql = f"""SELECT r.meter, {group} AS grp, width_bucket(r.bucket_start, %s::timestamp[]) AS n, sum(r.quantity),
       sum(r.event_count), sum(r.windows), sum(r.final_windows), sum(r.revision)
FROM {r} r
WHERE r.tenant_id = %s AND r.customer_id = %s AND r.bucket_start >= %s AND r.bucket_start < %s{meter}
GROUP BY r.meter, grp, n ORDER BY r.meter, grp, n"""
    return sql, group_params


def windows_sql(usage_table: str, group_by: tuple[str, ...], with_meter: bool) -> tuple[str, list[str]]:
    """A customer's windows over a range, per meter and group (at most ``limit`` rows).

    Parameters, after the group's: tenant, customer, since, until[, meter], limit.
    """
    u = check_identifier(usage_table)
    group, group_params = group_expression(group_by)
    meter = " AND meter = %s" if with_meter else ""
    sql = f"""SELECT meter, {group} AS grp, window_start, window_end, sum(quantity), sum(event_count), count(*),
       count(*) FILTER (WHERE is_final), max(revision)
FROM {u}
WHERE tenant_id = %s AND customer_id = %s AND window_start >= %s AND window_start < %s{meter}
GROUP BY meter, grp, window_start, window_end ORDER BY meter, grp, window_start, window_end LIMIT %s"""
    return sql, group_params


def _counted_in_range(with_meter: bool) -> str:
    statuses = ", ".join(f"'{s}'" for s in COUNTED_STATUSES)
    meter = " AND meter = %s" if with_meter else ""
    return (
        f"tenant_id = %s AND customer_id = %s AND window_start >= %s AND window_start < %s "
        f"AND status IN ({statuses}){meter}"
    )


def corrections_in_range_sql(table: str, with_meter: bool) -> str:
    """A customer's first corrections that count, by the window they correct.

    Parameters: tenant, customer, since, until[, meter], limit."""
    return (
        "SELECT correction_id, meter, dimensions_key, window_start, window_end, delta, status, "
        f"coalesce(decided_at, applied_at) FROM {check_identifier(table)} WHERE {_counted_in_range(with_meter)} "
        "ORDER BY window_start, correction_id LIMIT %s"
    )


def correction_sums_sql(
    table: str, group_by: tuple[str, ...], with_meter: bool, per_window: bool
) -> tuple[str, list[str]]:
    """A customer's corrections that count, summed and counted per meter, group and span: the day or period
    their window starts in (``n``, by bisecting the spans' bounds, as spans_sql does), or per window.

    Parameters, after the group's: bounds (spans only), tenant, customer, since, until[, meter], limit (None: all).
    Rows: meter, group, n (or window start and end), sum, count."""
    group, group_params = group_expression(group_by)
    span = "window_start, window_end" if per_window else "width_bucket(window_start, %s::timestamp[])"
    sql = (
        f"SELECT meter, {group} AS grp, {span}, sum(delta), count(*) FROM {check_identifier(table)} "
        f"WHERE {_counted_in_range(with_meter)} GROUP BY 1, 2, {'3, 4' if per_window else '3'} LIMIT %s"
    )
    return sql, group_params
