"""psycopg adapter for corrections: apply a batch of late events in one transaction, list, decide.

Thin over meterflow/corrections.py (the rules) and sinks/corrections_schema.py (the SQL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Literal

import psycopg

from billing.deliveries import ClosedWindow, late_correction_delivery
from meterflow.config import JobConfig
from meterflow.corrections import (
    COUNTED_STATUSES,
    Correction,
    LateEvent,
    Plan,
    WindowId,
    WindowState,
    check_transition,
    offsets_to_store,
    owes_a_meter_event,
    plan_corrections,
)
from meterflow.errors import CorrectionError, SinkError
from sinks.corrections_schema import (
    WINDOW_KEY,
    apply_lock_sql,
    correction_status_for_update_sql,
    corrections_ddl,
    counted_deltas_sql,
    decide_sql,
    insert_correction_sql,
    insert_event_sql,
    known_events_sql,
    latest_corrected_sql,
    list_corrections_sql,
    offsets_ddl,
    recorded_deltas_sql,
    recorded_event_outcomes_sql,
    store_offset_sql,
    stored_offsets_sql,
    window_rows_sql,
)
from sinks.ledger_schema import billing_tables_ddl, owe_late_correction_sql, withdraw_late_correction_sql
from sinks.postgres import connect, table_exists


@dataclass(frozen=True)
class CorrectionRow:
    """A correction as stored."""

    correction: Correction
    applied_at: datetime
    decided_at: datetime | None
    decided_by: str | None


def apply_corrections_schema(cfg: JobConfig) -> None:
    """Create both corrections tables, and the billing tables when billing is on; idempotent. The
    usage table is the job's and is left alone."""
    statements = corrections_ddl(cfg.corrections.table, cfg.corrections.events_table) + offsets_ddl(
        cfg.corrections.offsets_table
    )
    if cfg.billing.enabled:
        statements += billing_tables_ddl(
            cfg.billing.customers_table, cfg.billing.ledger_table, cfg.billing.carry_table, cfg.billing.cycles_table
        )
    with connect(cfg.postgres) as conn, conn.transaction():
        for statement in statements:
            conn.execute(statement)


@dataclass
class ResumePoint:
    """An incremental run's place in the late topic: stored with each batch, in its transaction."""

    topic: str
    held: dict[int, int] = field(default_factory=dict)  # per partition: the first offset a deferred event holds back


def stored_offsets(cfg: JobConfig, topic: str) -> dict[int, int]:
    """The next offset per partition where the last incremental run's committed batches ended."""
    with connect(cfg.postgres) as conn:
        if not table_exists(conn, cfg.corrections.offsets_table):
            return {}
        return dict(conn.execute(stored_offsets_sql(cfg.corrections.offsets_table), [topic]).fetchall())


def record_correction(conn: psycopg.Connection, cfg: JobConfig, c: Correction, now: datetime) -> None:
    """Store a correction, and the meter event it owes in the billing ledger (``owe_delivery``).
    Part of the caller's transaction: ``corrections apply`` and ``reprocess --bill`` both record
    corrections this way."""
    w = c.window
    conn.execute(
        insert_correction_sql(cfg.corrections.table),
        [
            c.correction_id,
            w.tenant_id,
            w.customer_id,
            w.meter,
            w.dimensions_key,
            w.window_start,
            w.window_end,
            c.delta,
            c.events,
            c.status,
            c.reason,
            now,
        ],
    )
    if owes_a_meter_event(c.status, c.delta):
        owe_delivery(conn, cfg, c)


def owe_delivery(conn: psycopg.Connection, cfg: JobConfig, c: Correction) -> None:
    """Record the correction's meter event as owed in the billing ledger (pending, due now), when
    billing is on; the billing job's retry scan delivers it. Part of the caller's transaction."""
    if not cfg.billing.enabled:
        return
    w = c.window
    window = ClosedWindow(
        w.tenant_id, w.customer_id, w.meter, w.dimensions_key, w.window_start, w.window_end, c.delta, c.events, 0
    )
    delivery = late_correction_delivery(window, c.correction_id, cfg.billing.identifier_prefix)
    meter = cfg.meter(w.meter)
    params = {
        "identifier": delivery.identifier,
        "provider": cfg.billing.provider,
        "destinations": list(cfg.billing.destination_names()),
        "window_identifier": delivery.window_identifier,
        "correction_id": c.correction_id,
        "tenant_id": w.tenant_id,
        "customer_id": w.customer_id,
        "meter": w.meter,
        "dimensions_key": w.dimensions_key,
        "window_start": w.window_start,
        "window_end": w.window_end,
        "quantity": c.delta,
        "event_count": c.events,
        "event_name": meter.event_name if meter else w.meter,
    }
    conn.execute(owe_late_correction_sql(cfg.billing.ledger_table, cfg.billing.customers_table), params)


def withdraw_delivery(conn: psycopg.Connection, cfg: JobConfig, correction_id: str) -> None:
    """Take back a rejected correction's owed meter event; refused once an attempt has started."""
    if not cfg.billing.enabled or not table_exists(conn, cfg.billing.ledger_table):
        return
    row = conn.execute(
        withdraw_late_correction_sql(cfg.billing.ledger_table),
        {"correction_id": correction_id, "reason": "correction rejected"},
    ).fetchone()
    if row is None or row[1] or row[0] == "dead":
        return
    msg = f"cannot reject correction {correction_id}: its meter event is {row[0]} at the provider's side of the ledger (delivery started); the billed usage stays"
    raise CorrectionError(msg)


def _key_arrays(windows: Sequence[WindowId]) -> list[list]:
    return [[getattr(w, c) for w in windows] for c in WINDOW_KEY]


def _states(conn: psycopg.Connection, cfg: JobConfig, windows: Sequence[WindowId]) -> dict[WindowId, WindowState]:
    by_key = {tuple(getattr(w, c) for c in WINDOW_KEY): w for w in windows}
    args = _key_arrays(windows)
    states = {w: WindowState() for w in windows}
    usage_rows = (
        conn.execute(window_rows_sql(cfg.postgres.usage_table), args).fetchall()
        if table_exists(conn, cfg.postgres.usage_table)
        else []
    )
    for *key, quantity, is_final in usage_rows:
        w = by_key[tuple(key)]
        states[w] = WindowState(row_quantity=quantity, row_final=is_final)
    for *key, delta in conn.execute(recorded_deltas_sql(cfg.corrections.table), args).fetchall():
        w = by_key[tuple(key)]
        states[w] = WindowState(states[w].row_quantity, states[w].row_final, delta, states[w].latest)
    for *key, event_time, event_id in conn.execute(
        latest_corrected_sql(cfg.corrections.table, cfg.corrections.events_table), args
    ).fetchall():
        w = by_key[tuple(key)]
        s = states[w]
        states[w] = WindowState(s.row_quantity, s.row_final, s.recorded_delta, (event_time, event_id))
    return states


def apply_batch(
    cfg: JobConfig,
    events: Sequence[LateEvent],
    now: datetime,
    *,
    dry_run: bool = False,
    resume: ResumePoint | None = None,
) -> Plan:
    """Plan and record the corrections of one batch of late events in one transaction.

    Runs serialise on an advisory lock; events already recorded are skipped; every event row is
    inserted with ``ON CONFLICT DO NOTHING`` and, should one nevertheless exist, the whole batch is
    rolled back (:class:`CorrectionError`) rather than record a correction without all its events.
    With ``dry_run`` the plan is computed against the same data and nothing is written. With
    ``resume`` the batch also stores where an incremental run resumes (never past a deferred event).
    """
    if not events:
        return plan_corrections((), set(), {}, cfg, now)
    try:
        with connect(cfg.postgres) as conn, conn.transaction() as tx:
            conn.execute(apply_lock_sql(cfg.corrections.table))
            known = {
                (t, e)
                for t, e in conn.execute(
                    known_events_sql(cfg.corrections.events_table),
                    [[e.window.tenant_id for e in events], [e.event_id for e in events]],
                ).fetchall()
            }
            windows = sorted({e.window for e in events})
            plan = plan_corrections(events, known, _states(conn, cfg, windows), cfg, now)
            if dry_run:
                raise psycopg.Rollback(tx)
            for c in plan.corrections:
                record_correction(conn, cfg, c, now)
            for r in plan.events:
                w = r.window
                row = conn.execute(
                    insert_event_sql(cfg.corrections.events_table),
                    [
                        r.tenant_id,
                        r.event_id,
                        w.customer_id,
                        w.meter,
                        w.dimensions_key,
                        w.window_start,
                        w.window_end,
                        r.quantity,
                        r.event_time,
                        r.outcome,
                        r.correction_id,
                        r.reason,
                    ],
                ).fetchone()
                if row is None:
                    msg = f"late event {r.tenant_id}/{r.event_id} was recorded by another run meanwhile; batch rolled back"
                    raise CorrectionError(msg)
            if resume is not None:
                store, held = offsets_to_store(events, plan.deferred, resume.held)
                for partition, offset in sorted(store.items()):
                    conn.execute(store_offset_sql(cfg.corrections.offsets_table), [resume.topic, partition, offset])
                resume.held = held
        return plan
    except psycopg.Error as e:
        msg = f"corrections batch rolled back: {e}"
        raise SinkError(msg) from e


def apply_all(
    cfg: JobConfig,
    events: Sequence[LateEvent],
    now: datetime,
    *,
    dry_run: bool = False,
    on_batch: Callable[[Plan], None] | None = None,
    resume: ResumePoint | None = None,
) -> list[Plan]:
    """Apply ``events`` in batches of ``corrections.batch_size``, one transaction each, in order."""
    size = cfg.corrections.batch_size
    plans = []
    for i in range(0, len(events), size):
        plan = apply_batch(cfg, events[i : i + size], now, dry_run=dry_run, resume=resume)
        plans.append(plan)
        if on_batch:
            on_batch(plan)
    return plans


def fetch_corrections(cfg: JobConfig, tenant: str | None = None, status: str | None = None) -> list[CorrectionRow]:
    """Stored corrections, oldest window first."""
    args = [v for v in (tenant, status) if v is not None]
    with connect(cfg.postgres) as conn:
        rows = conn.execute(
            list_corrections_sql(cfg.corrections.table, tenant=tenant is not None, status=status is not None), args
        ).fetchall()
    return _rows(rows)


def _rows(rows: list[tuple]) -> list[CorrectionRow]:
    out = []
    for (
        cid,
        tenant_id,
        customer_id,
        meter,
        dims,
        start,
        end,
        delta,
        events,
        st,
        reason,
        applied_at,
        decided_at,
        decided_by,
    ) in rows:
        correction = Correction(
            cid, WindowId(tenant_id, customer_id, meter, dims, start, end), delta, events, st, reason
        )
        out.append(CorrectionRow(correction, applied_at, decided_at, decided_by))
    return out


def decide(
    cfg: JobConfig, correction_id: str, action: Literal["approve", "reject"], who: str, note: str | None, now: datetime
) -> str:
    """Approve or reject one correction (see :func:`meterflow.corrections.check_transition`); returns the new status."""
    with connect(cfg.postgres) as conn, conn.transaction():
        row = conn.execute(correction_status_for_update_sql(cfg.corrections.table), [correction_id]).fetchone()
        if row is None:
            msg = f"no correction {correction_id}"
            raise CorrectionError(msg)
        status = check_transition(action, row[0], correction_id)
        conn.execute(decide_sql(cfg.corrections.table), [status, who, now, note, correction_id])
        if status in COUNTED_STATUSES:
            [stored] = [
                r.correction
                for r in _rows(
                    conn.execute(
                        list_corrections_sql(cfg.corrections.table, correction_id=True), [correction_id]
                    ).fetchall()
                )
            ]
            if owes_a_meter_event(status, stored.delta):
                owe_delivery(conn, cfg, stored)
        else:
            withdraw_delivery(conn, cfg, correction_id)
    return status


def counted_deltas(cfg: JobConfig) -> dict[WindowId, tuple[Decimal, int]]:
    """Per window, the deltas that count in its corrected total and how many corrections (empty when
    no correction was ever recorded: the table does not exist yet)."""
    with connect(cfg.postgres) as conn:
        if not table_exists(conn, cfg.corrections.table):
            return {}
        rows = conn.execute(counted_deltas_sql(cfg.corrections.table)).fetchall()
    return {WindowId(*key): (delta, n) for *key, delta, n in rows}


def event_outcomes(cfg: JobConfig) -> dict[tuple[str, str], str]:
    """Per recorded late event ``(tenant_id, event_id)``: ``corrected (<status>)`` or ``not corrected``."""
    with connect(cfg.postgres) as conn:
        if not table_exists(conn, cfg.corrections.events_table):
            return {}
        rows = conn.execute(recorded_event_outcomes_sql(cfg.corrections.events_table, cfg.corrections.table)).fetchall()
    return {
        (t, e): (f"corrected ({status})" if outcome == "corrected" else "not corrected")
        for t, e, outcome, status in rows
    }
