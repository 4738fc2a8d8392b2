"""psycopg adapter for reprocessing: write the shadow table, read the metered side, record the
corrections that bill the differences. Thin over sinks/reprocess_schema.py and meterflow/reprocess.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import psycopg

from meterflow.config import JobConfig
from meterflow.corrections import Correction, LateEvent, WindowId
from meterflow.errors import CorrectionError
from meterflow.reprocess import Period, WindowDifference, WindowTotal, differences
from sinks.corrections_schema import apply_lock_sql, known_events_sql
from sinks.corrections_store import apply_corrections_schema, record_correction
from sinks.postgres import connect, scalar, table_exists
from sinks.reprocess_schema import (
    changed_since_sql,
    clear_shadow_sql,
    insert_shadow_sql,
    known_corrections_sql,
    other_sizes_sql,
    period_corrections_sql,
    period_rows_sql,
    shadow_table_ddl,
)


@dataclass(frozen=True)
class Metered:
    """The period as metered: per window, its final row plus its recorded corrections; the windows
    whose row is not final yet; and how many rows or corrections overlap it in windows of another size."""

    values: dict[WindowId, Decimal]
    not_final: list[WindowId]
    other_sizes: int = 0


def write_shadow(cfg: JobConfig, table: str, period: Period, windows: Sequence[WindowTotal]) -> None:
    """Replace the period's windows in the shadow table with the recomputed ones (one transaction)."""
    size = cfg.event_time.window_size
    with connect(cfg.postgres) as conn, conn.transaction():
        for statement in shadow_table_ddl(table):
            conn.execute(statement)
        conn.execute(clear_shadow_sql(table), (period.since, period.until, size))
        for t in windows:
            w = t.window
            conn.execute(
                insert_shadow_sql(table),
                (
                    w.tenant_id,
                    w.customer_id,
                    w.meter,
                    w.dimensions_key,
                    w.window_start,
                    w.window_end,
                    t.quantity,
                    t.events,
                    period.since,
                    period.until,
                ),
            )


def read_metered(conn: psycopg.Connection, cfg: JobConfig, period: Period) -> Metered:
    """What the period's windows hold now: usage rows of the current size plus current corrections."""
    args = (period.since, period.until, cfg.event_time.window_size)
    overlap = (period.until, period.since, cfg.event_time.window_size)
    values: dict[WindowId, Decimal] = {}
    not_final = []
    other_sizes = 0
    if table_exists(conn, cfg.postgres.usage_table):
        for *key, quantity, is_final in conn.execute(period_rows_sql(cfg.postgres.usage_table), args).fetchall():
            values[WindowId(*key)] = Decimal(quantity)
            if not is_final:
                not_final.append(WindowId(*key))
        other_sizes += scalar(conn, other_sizes_sql(cfg.postgres.usage_table), overlap)
    if table_exists(conn, cfg.corrections.table):
        for *key, delta in conn.execute(period_corrections_sql(cfg.corrections.table), args).fetchall():
            values[WindowId(*key)] = values.get(WindowId(*key), Decimal(0)) + Decimal(delta)
        other_sizes += scalar(conn, other_sizes_sql(cfg.corrections.table), overlap)
    return Metered(values, not_final, other_sizes)


def compare(
    cfg: JobConfig, period: Period, recomputed: Sequence[WindowTotal]
) -> tuple[Metered, list[WindowDifference]]:
    """The metered side of the period and every window that differs from its recomputation."""
    with connect(cfg.postgres) as conn:
        metered = read_metered(conn, cfg, period)
    return metered, differences(recomputed, metered.values)


def bill_differences(
    cfg: JobConfig,
    period: Period,
    recomputed: Sequence[WindowTotal],
    make: Callable[[WindowDifference], Correction],
    now: datetime,
    recomputed_from: datetime,
) -> list[Correction]:
    """Record a correction per window that still differs, with its owed meter event, in one transaction.

    Holds the corrections' advisory lock (``corrections apply`` waits, and so does another
    reprocess) and compares under it. Refused (:class:`CorrectionError`, nothing recorded) when:
    a correction of the period was recorded or decided since the recomputation began at
    ``recomputed_from`` (a late event it did not read would be billed away: run again); the period
    holds windows of another size (billed in another ``window_size``: the recomputation would bill
    it again); or a window of the period has no final row yet.
    """
    apply_corrections_schema(cfg)
    with connect(cfg.postgres) as conn, conn.transaction():
        conn.execute(apply_lock_sql(cfg.corrections.table))
        changed = scalar(
            conn,
            changed_since_sql(cfg.corrections.table),
            (period.since, period.until, recomputed_from, recomputed_from),
        )
        if changed:
            msg = f"{changed} corrections of {period.label} were recorded or decided while it was recomputed: run the reprocess again"
            raise CorrectionError(msg)
        metered = read_metered(conn, cfg, period)
        if metered.other_sizes:
            msg = (
                f"{metered.other_sizes} usage rows or corrections overlap {period.label} in windows of another size than event_time.window_size "
                f"({cfg.event_time.window_size}): reprocess that part with the size it was metered in"
            )
            raise CorrectionError(msg)
        if metered.not_final:
            w = metered.not_final[0]
            msg = (
                f"{len(metered.not_final)} windows of {period.label} have no final row yet (first: {w.tenant_id}/{w.customer_id}/{w.meter} "
                f"{w.window_start:%Y-%m-%d %H:%M:%S}): the usage job has not closed them; run again once it has"
            )
            raise CorrectionError(msg)
        corrections = [make(d) for d in differences(recomputed, metered.values)]
        known = {
            r[0]
            for r in conn.execute(
                known_corrections_sql(cfg.corrections.table), ([c.correction_id for c in corrections],)
            ).fetchall()
        }
        recorded = []
        for c in corrections:
            if c.correction_id in known:
                continue
            record_correction(conn, cfg, c, now)
            recorded.append(c)
        return recorded


def unrecorded(cfg: JobConfig, events: Sequence[LateEvent]) -> list[LateEvent]:
    """The late events no correction run has recorded yet (corrected or not)."""
    if not events:
        return []
    with connect(cfg.postgres) as conn:
        if not table_exists(conn, cfg.corrections.events_table):
            return list(events)
        known = {
            tuple(r)
            for r in conn.execute(
                known_events_sql(cfg.corrections.events_table),
                [[e.window.tenant_id for e in events], [e.event_id for e in events]],
            ).fetchall()
        }
    return [e for e in events if (e.window.tenant_id, e.event_id) not in known]
