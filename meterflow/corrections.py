"""Corrections from late events (pure): what a late event changes in its closed window, and whether
the change is applied, held for approval, or only reported.

A late event reached the job after ``window end + allowed_lateness``; the job deduplicated it first
(by ``(tenant_id, event_id)`` within ``event_time.dedup_horizon``), so it was not counted in any
window. This module turns a batch of such events into one correction per window, given:

* the window as Postgres holds it (:class:`WindowState`: the final row, if any, plus the deltas of
  corrections already recorded for it), and
* the events already recorded as corrected or reported (never corrected twice).

Per aggregation (the meter's ``aggregation`` in the config):

* ``SUM``: the delta is the event's quantity.
* ``COUNT``: the delta is one per event.
* ``MAX``: the delta is ``max(0, quantity - current)``, where current is the window's value plus the
  deltas already recorded (a window without a row has no current value: the delta is the quantity).
* ``LATEST``: the window's row does not keep the event time of its latest event, so a late event
  can only be ordered against other late events. It is corrected only when the window has no
  counted events (no row); then the newest late event (greatest event_time, then event_id) wins and
  the delta moves the value to its quantity. Against a counted window it is reported, not corrected.
* ``UNIQUE_COUNT``: the window's row keeps the count, not the set of values, so a late event is
  reported, not corrected.

Quantities are :class:`~decimal.Decimal` throughout; nothing here reads a clock (``now`` is passed in).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from meterflow.config import Aggregation, CorrectionsConfig, JobConfig
from meterflow.config_values import naive_utc
from meterflow.errors import CorrectionError
from meterflow.window_row import epoch_ms
from meterflow.windowing import outside_provider_window

# applied: counted automatically; pending: held for approval; approved / rejected: by an operator;
# reported: older than the provider accepts, shown but never billed.
CorrectionStatus = Literal["applied", "pending", "approved", "rejected", "reported"]
CORRECTION_STATUSES: tuple[str, ...] = ("applied", "pending", "approved", "rejected", "reported")
# The statuses whose delta counts in the corrected total.
COUNTED_STATUSES: tuple[str, ...] = ("applied", "approved")
# The statuses whose delta is part of the window's current value when the next delta is computed.
CURRENT_STATUSES: tuple[str, ...] = ("applied", "pending", "approved", "reported")
# corrected: part of a correction; not_corrected: recorded with the reason it cannot be.
EventOutcome = Literal["corrected", "not_corrected"]
EVENT_OUTCOMES: tuple[str, ...] = ("corrected", "not_corrected")


@dataclass(frozen=True, order=True)
class WindowId:
    """The original window a late event belongs to (the usage table's key)."""

    tenant_id: str
    customer_id: str
    meter: str
    dimensions_key: str
    window_start: datetime  # naive UTC, like the usage table
    window_end: datetime


@dataclass(frozen=True)
class LateEvent:
    """One record of the late-events topic, typed."""

    event_id: str
    window: WindowId
    quantity: Decimal
    event_time: datetime  # naive UTC
    lateness_ms: int
    position: tuple[int, int] | None = None  # (partition, offset) in the late topic, when read incrementally
    seen_at: datetime | None = None  # naive UTC: when the job routed it late (about when it entered the late topic)


@dataclass(frozen=True)
class WindowState:
    """A window as recorded: its final row (if any) and the corrections already recorded for it.

    Attributes:
        row_quantity: the usage row's quantity, None when the window has no row (no counted events).
        row_final: whether the row is final; a late event of a window whose row is not final yet is
            left for a later run (the job has not committed the final row).
        recorded_delta: sum of the deltas of recorded corrections in ``CURRENT_STATUSES``.
        latest: (event_time, event_id) of the newest corrected late event, for LATEST.
    """

    row_quantity: Decimal | None = None
    row_final: bool = True
    recorded_delta: Decimal = Decimal(0)
    latest: tuple[datetime, str] | None = None

    def current(self) -> Decimal | None:
        """The window's value with the recorded corrections, None when it has neither row nor correction."""
        if self.row_quantity is None and self.recorded_delta == 0 and self.latest is None:
            return None
        return (self.row_quantity or Decimal(0)) + self.recorded_delta


@dataclass(frozen=True)
class Correction:
    """One window's correction from a batch of late events."""

    correction_id: str
    window: WindowId
    delta: Decimal
    events: int
    status: CorrectionStatus
    reason: str


@dataclass(frozen=True)
class EventRecord:
    """What became of one late event: part of a correction, or not corrected and why."""

    tenant_id: str
    event_id: str
    window: WindowId
    quantity: Decimal
    event_time: datetime
    outcome: EventOutcome
    correction_id: str | None
    reason: str


@dataclass(frozen=True)
class Plan:
    """The outcome of one batch: corrections, per-event records, and events left for a later run."""

    corrections: tuple[Correction, ...] = ()
    events: tuple[EventRecord, ...] = ()
    deferred: tuple[LateEvent, ...] = ()
    skipped_known: int = 0
    summary: dict[str, int] = field(default_factory=dict)


def dimensions_key(dimensions: Mapping[str, str], group_by: Iterable[str]) -> str:
    """The usage table's ``dimensions_key``, as the job builds it (jvm/ ``EventRules.dimensionsKey``, in the source):
    ``{}`` without grouping, else a compact JSON object of the grouped dimensions, keys sorted, a
    missing dimension as the empty string."""
    keys = sorted(group_by)
    if not keys:
        return "{}"
    return json.dumps({k: dimensions.get(k, "") for k in keys}, separators=(",", ":"), ensure_ascii=False)


def late_event_from_record(
    record: Mapping[str, Any], cfg: JobConfig, position: tuple[int, int] | None = None
) -> LateEvent:
    """A decoded late-events record (avro/late_usage_event.avsc) as a typed event.

    Raises:
        CorrectionError: the record names a meter the configuration does not define.
    """
    meter = cfg.meter(record["meter"])
    if meter is None:
        msg = f"late event {record['event_id']} names meter {record['meter']!r}, which is not configured"
        raise CorrectionError(msg)
    window = WindowId(
        record["tenant_id"],
        record["customer_id"],
        record["meter"],
        dimensions_key(record.get("dimensions") or {}, meter.group_by),
        naive_utc(record["window_start"]),
        naive_utc(record["window_end"]),
    )
    seen_at = record.get("seen_at")
    return LateEvent(
        record["event_id"],
        window,
        Decimal(record["quantity"]),
        naive_utc(record["event_time"]),
        int(record["lateness_ms"]),
        position,
        naive_utc(seen_at) if seen_at is not None else None,
    )


@dataclass(frozen=True)
class Waiting:
    """After an incremental run: the late events left for a later one (their window had no final row
    yet), and how long the oldest has been in the late topic. The topic's retention deletes it at
    some point: the alert MeterflowLateEventsNearRetention compares the two."""

    events: int
    oldest_age_s: float


def waiting(plans: Iterable[Plan], now: datetime) -> Waiting:
    """What an incremental run's batches left waiting, ``now`` naive UTC."""
    deferred = [e for p in plans for e in p.deferred]
    oldest = min((e.seen_at for e in deferred if e.seen_at is not None), default=None)
    return Waiting(len(deferred), max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0)


def correction_id(window: WindowId, event_ids: Iterable[str]) -> str:
    """Deterministic id of a correction: the window key and its events, hashed (same input, same id)."""
    start_ms = epoch_ms(window.window_start)
    canonical = "\x00".join(
        [window.tenant_id, window.customer_id, window.meter, window.dimensions_key, str(start_ms), *sorted(event_ids)]
    )
    return f"cor-{start_ms}-{hashlib.sha256(canonical.encode()).hexdigest()[:40]}"


@dataclass(frozen=True)
class _Delta:
    delta: Decimal
    counted: tuple[LateEvent, ...]
    not_corrected: tuple[tuple[LateEvent, str], ...]


def window_delta(aggregation: Aggregation, state: WindowState, events: list[LateEvent]) -> _Delta:
    """The delta a window's new late events make under its meter's aggregation (see module doc)."""
    if aggregation == "SUM":
        return _Delta(sum((e.quantity for e in events), Decimal(0)), tuple(events), ())
    if aggregation == "COUNT":
        return _Delta(Decimal(len(events)), tuple(events), ())
    if aggregation == "MAX":
        current = state.current()
        new_max = max(e.quantity for e in events)
        if current is None:
            return _Delta(new_max, tuple(events), ())
        return _Delta(max(Decimal(0), new_max - current), tuple(events), ())
    if aggregation == "LATEST":
        if state.row_quantity is not None:
            reason = "LATEST: the window's row does not keep its latest event time, so a late event cannot be ordered against it"
            return _Delta(Decimal(0), (), tuple((e, reason) for e in events))
        newest = max(events, key=lambda e: (e.event_time, e.event_id))
        if state.latest is not None and (newest.event_time, newest.event_id) <= state.latest:
            return _Delta(Decimal(0), tuple(events), ())
        return _Delta(newest.quantity - (state.current() or Decimal(0)), tuple(events), ())
    reason = "UNIQUE_COUNT: the window's row keeps the count, not the set of values"
    return _Delta(Decimal(0), (), tuple((e, reason) for e in events))


def _plain(value: Decimal) -> str:
    """A decimal without trailing zeros or exponent: ``2.000000000`` -> ``2``, ``100`` stays ``100``."""
    return format(value.normalize(), "f")


def approval_threshold(policy: CorrectionsConfig, tenant_id: str) -> Decimal | None:
    """The tenant's threshold (its own, else the default); None means every correction is applied automatically."""
    return policy.tenant_approval_thresholds.get(tenant_id, policy.approval_threshold)


def decide_status(
    delta: Decimal, window: WindowId, policy: CorrectionsConfig, now: datetime, max_age: timedelta, max_ahead: timedelta
) -> tuple[CorrectionStatus, str]:
    """The policy: reported when the provider would refuse the window's timestamp, else held for
    approval when ``|delta|`` exceeds the tenant's threshold, else applied."""
    refused = outside_provider_window(window.window_start, now, max_age, max_ahead)
    if refused:
        return "reported", f"not billable: {refused}"
    threshold = approval_threshold(policy, window.tenant_id)
    if threshold is not None and abs(delta) > threshold:
        return "pending", f"late events; |delta| {_plain(abs(delta))} above the approval threshold {_plain(threshold)}"
    if delta == 0:
        return "applied", "late events; delta 0: nothing to bill"
    return "applied", "late events"


def owes_a_meter_event(status: str, delta: Decimal) -> bool:
    """Whether a correction is owed to the provider as a meter event: counted, and changing the
    total. A zero delta (late MAX events below the window's maximum) is recorded, never sent."""
    return status in COUNTED_STATUSES and delta != 0


def awaits_its_final_row(
    aggregation: Aggregation, state: WindowState, events: Iterable[LateEvent], now: datetime, wait: timedelta
) -> bool:
    """Whether a window's late events wait for a final row that may not be in Postgres yet.

    The late topic and the usage table commit in different committers of the same checkpoint, so a
    late event can be read before its window's final row is written. For SUM and COUNT that does
    not matter (the delta is the late events' own). A MAX or LATEST delta is measured against the
    window's value: a window with no row and no recorded correction waits until ``wait`` has passed
    since its newest late event was routed late, after which it is taken to have had no counted event.
    """
    if aggregation not in ("MAX", "LATEST") or state.current() is not None:
        return False
    seen = [e.seen_at for e in events if e.seen_at is not None]
    if not seen:
        return False
    return naive_utc(now) - max(seen) < wait


def plan_corrections(
    events: Iterable[LateEvent],
    known: set[tuple[str, str]],
    states: Mapping[WindowId, WindowState],
    cfg: JobConfig,
    now: datetime,
) -> Plan:
    """Turn a batch of late events into corrections and per-event records.

    Args:
        events: decoded late events; duplicates of one ``(tenant_id, event_id)`` count once.
        known: ``(tenant_id, event_id)`` already recorded: never corrected again.
        states: the recorded state of every window the batch touches (missing: no row, no correction).
        now: the clock, for the provider's window (aware UTC).
    """
    fresh: dict[tuple[str, str], LateEvent] = {}
    skipped = 0
    for e in events:
        key = (e.window.tenant_id, e.event_id)
        if key in known or key in fresh:
            skipped += 1
            continue
        fresh[key] = e
    by_window: dict[WindowId, list[LateEvent]] = {}
    for e in fresh.values():
        by_window.setdefault(e.window, []).append(e)
    corrections: list[Correction] = []
    records: list[EventRecord] = []
    deferred: list[LateEvent] = []
    for window in sorted(by_window):
        members = sorted(by_window[window], key=lambda e: e.event_id)
        state = states.get(window, WindowState())
        if not state.row_final:
            deferred.extend(members)
            continue
        meter = cfg.meter(window.meter)
        if meter is None:
            msg = f"window of meter {window.meter!r}, which is not configured"
            raise CorrectionError(msg)
        if awaits_its_final_row(meter.aggregation, state, members, now, cfg.corrections.final_row_wait):
            deferred.extend(members)
            continue
        outcome = window_delta(meter.aggregation, state, members)
        records.extend(
            EventRecord(window.tenant_id, e.event_id, window, e.quantity, e.event_time, "not_corrected", None, why)
            for e, why in outcome.not_corrected
        )
        if not outcome.counted:
            continue
        cid = correction_id(window, [e.event_id for e in outcome.counted])
        status, reason = decide_status(
            outcome.delta, window, cfg.corrections, now, cfg.billing.max_window_age, cfg.billing.max_window_ahead
        )
        corrections.append(Correction(cid, window, outcome.delta, len(outcome.counted), status, reason))
        records.extend(
            EventRecord(window.tenant_id, e.event_id, window, e.quantity, e.event_time, "corrected", cid, reason)
            for e in outcome.counted
        )
    summary = {s: sum(1 for c in corrections if c.status == s) for s in CORRECTION_STATUSES}
    summary["not_corrected_events"] = sum(1 for r in records if r.outcome == "not_corrected")
    summary["deferred_events"] = len(deferred)
    summary["known_events"] = skipped
    return Plan(tuple(corrections), tuple(records), tuple(deferred), skipped, summary)


APPROVAL_TRANSITIONS: dict[str, tuple[str, ...]] = {"approve": ("pending",), "reject": ("pending", "applied")}


def check_transition(action: Literal["approve", "reject"], current: str, correction: str) -> CorrectionStatus:
    """The status an operator's action leads to; only a pending correction can be approved, and a
    pending or applied one rejected (reported ones are never billable).

    Raises:
        CorrectionError: the action does not apply to a correction in ``current`` status.
    """
    if current not in APPROVAL_TRANSITIONS[action]:
        msg = f"cannot {action} correction {correction}: it is {current}"
        raise CorrectionError(msg)
    return "approved" if action == "approve" else "rejected"


def corrected_totals(
    rows: Iterable[tuple[WindowId, Decimal | None]], deltas: Mapping[WindowId, Decimal]
) -> dict[WindowId, Decimal]:
    """Window totals plus their counted corrections' deltas (windows with only corrections included)."""
    out = {w: (q or Decimal(0)) + deltas.get(w, Decimal(0)) for w, q in rows}
    for w, d in deltas.items():
        out.setdefault(w, d)
    return out


def offsets_to_store(
    batch: Iterable[LateEvent], deferred: Iterable[LateEvent], held: Mapping[int, int]
) -> tuple[dict[int, int], dict[int, int]]:
    """Where an incremental run may resume per partition after one batch, and the offsets it holds back.

    A partition resumes after the batch's last record, except that it never passes a deferred event
    (its window had no final row yet): from the first one on, this run's records of that partition
    are read again next time (those recorded meanwhile are skipped as known).

    Args:
        batch: the batch's events, each with its ``position``.
        deferred: the batch's events left for a later run.
        held: per partition, the first deferred offset of earlier batches of this run.

    Returns:
        (next offset to store per partition the batch touched, the held offsets including this batch's)
    """
    held = dict(held)
    for e in deferred:
        if e.position is not None:
            partition, offset = e.position
            held[partition] = min(held.get(partition, offset), offset)
    after: dict[int, int] = {}
    for e in batch:
        if e.position is not None:
            partition, offset = e.position
            after[partition] = max(after.get(partition, 0), offset + 1)
    return {p: min(o, held.get(p, o)) for p, o in after.items()}, held
