"""Reprocessing a period (pure): which windows it covers, what it compares, and the corrections it bills.

``meterflow reprocess`` recomputes every window of a closed period from the usage-events topic
(jobs/reprocess_plan.py: the same input contract, every unique event of the period counted, late
or not) and compares each window with what was metered for it: its final row plus the corrections
recorded for it (late events, earlier reprocesses). Only the difference is billed, as one
correction per window, so a period reprocessed twice, or one whose late events were already billed
as corrections, is never billed twice.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from meterflow.config import JobConfig
from meterflow.config_values import naive_utc
from meterflow.corrections import Correction, CorrectionStatus, WindowId
from meterflow.errors import ConfigError
from meterflow.window_row import epoch_ms
from meterflow.windowing import outside_provider_window


@dataclass(frozen=True)
class Period:
    """Whole windows ``[since, until)``, naive UTC, every one of them closed."""

    since: datetime
    until: datetime

    @property
    def label(self) -> str:
        return f"{self.since:%Y-%m-%d %H:%M:%S}..{self.until:%Y-%m-%d %H:%M:%S}"


def reprocess_period(since: datetime, until: datetime, cfg: JobConfig, now: datetime) -> Period:
    """The period to reprocess, or why not (:class:`ConfigError` naming the fix).

    Both bounds must fall on window boundaries (a window is recomputed whole or not at all), and
    every window must be closed: its end + allowed lateness + watermark delay is behind ``now``, so
    the job has written its final row and routed its later events late.
    """
    since, until, now = naive_utc(since), naive_utc(until), naive_utc(now)
    size = cfg.event_time.window_size
    for name, bound in (("--since", since), ("--until", until)):
        offset = (bound - datetime(1970, 1, 1)) % size
        if offset:
            msg = f"{name} {bound:%Y-%m-%d %H:%M:%S} is not on a window boundary of event_time.window_size {size}: use {bound - offset:%Y-%m-%d %H:%M:%S} or {bound - offset + size:%Y-%m-%d %H:%M:%S}"
            raise ConfigError(msg)
    if until <= since:
        msg = f"--until {until:%Y-%m-%d %H:%M:%S} must be after --since {since:%Y-%m-%d %H:%M:%S}"
        raise ConfigError(msg)
    closed_by = until + cfg.event_time.allowed_lateness + cfg.event_time.watermark_delay
    if closed_by > now:
        msg = (
            f"the period's last window closes at {closed_by:%Y-%m-%d %H:%M:%S} UTC (its end + event_time.allowed_lateness + "
            f"event_time.watermark_delay), after now: reprocess up to {_last_closed(now, cfg):%Y-%m-%d %H:%M:%S} at most"
        )
        raise ConfigError(msg)
    return Period(since, until)


def _last_closed(now: datetime, cfg: JobConfig) -> datetime:
    latest = now - cfg.event_time.allowed_lateness - cfg.event_time.watermark_delay
    return latest - (latest - datetime(1970, 1, 1)) % cfg.event_time.window_size


def read_from_ms(period: Period, cfg: JobConfig) -> int:
    """Where reading the usage-events topic starts (its LogAppendTime, epoch ms): an event of the
    period is appended no earlier than ``event_time.max_event_ahead`` before its event time (the input
    contract rejects one dated further ahead)."""
    return int((period.since - cfg.event_time.max_event_ahead).replace(tzinfo=UTC).timestamp() * 1000)


@dataclass(frozen=True)
class WindowTotal:
    """One window's value and the events it covers."""

    window: WindowId
    quantity: Decimal
    events: int


@dataclass(frozen=True)
class WindowDifference:
    """A window whose recomputed value differs from the metered one (final row + recorded corrections)."""

    window: WindowId
    metered: Decimal
    recomputed: Decimal
    recomputed_events: int

    @property
    def delta(self) -> Decimal:
        return self.recomputed - self.metered


def differences(recomputed: Iterable[WindowTotal], metered: Mapping[WindowId, Decimal]) -> list[WindowDifference]:
    """Every window of either side whose values differ (a window missing on one side is 0 there), in window order."""
    again = {t.window: t for t in recomputed}
    found = []
    for window in again.keys() | metered.keys():
        new = again.get(window)
        value, events = (new.quantity, new.events) if new else (Decimal(0), 0)
        before = metered.get(window, Decimal(0))
        if value != before:
            found.append(WindowDifference(window, before, value, events))
    return sorted(
        found,
        key=lambda d: (
            d.window.window_start,
            d.window.tenant_id,
            d.window.customer_id,
            d.window.meter,
            d.window.dimensions_key,
        ),
    )


@dataclass(frozen=True)
class CustomerDifference:
    """Per (tenant, customer, meter): what was metered and what the period recomputes to."""

    tenant_id: str
    customer_id: str
    meter: str
    windows: int
    metered: Decimal
    recomputed: Decimal

    @property
    def difference(self) -> Decimal:
        return self.recomputed - self.metered


def per_customer(
    recomputed: Iterable[WindowTotal], metered: Mapping[WindowId, Decimal], found: Iterable[WindowDifference]
) -> list[CustomerDifference]:
    """Totals per (tenant, customer, meter) of both sides, and how many of its windows differ."""
    totals: dict[tuple[str, str, str], list] = defaultdict(lambda: [0, Decimal(0), Decimal(0)])
    for window, value in metered.items():
        totals[(window.tenant_id, window.customer_id, window.meter)][1] += value
    for t in recomputed:
        totals[(t.window.tenant_id, t.window.customer_id, t.window.meter)][2] += t.quantity
    for d in found:
        totals[(d.window.tenant_id, d.window.customer_id, d.window.meter)][0] += 1
    return [CustomerDifference(*key, *value) for key, value in sorted(totals.items())]


def reprocess_correction_id(d: WindowDifference) -> str:
    """Deterministic id of the correction that bills a window's difference: the window, its span and
    both values hashed. A rerun on the same data finds no difference once it is recorded."""
    w = d.window
    start_ms, end_ms = epoch_ms(w.window_start), epoch_ms(w.window_end)
    canonical = "\x00".join(
        [
            w.tenant_id,
            w.customer_id,
            w.meter,
            w.dimensions_key,
            str(start_ms),
            str(end_ms),
            str(d.metered),
            str(d.recomputed),
        ]
    )
    return f"rep-{start_ms}-{hashlib.sha256(canonical.encode()).hexdigest()[:40]}"


def reprocess_correction(
    d: WindowDifference,
    period: Period,
    now: datetime,
    max_age: timedelta,
    max_ahead: timedelta,
    threshold: Decimal | None = None,
) -> Correction:
    """The correction that bills a window's difference: reported when the provider no longer
    accepts the window (shown, never billed), held for approval when ``|delta|`` is above the
    tenant's ``threshold`` (corrections.approval_threshold), else applied.

    ``events`` is the number of events the recomputed window covers (at least 1, as every
    correction counts one: a window the recomputation found empty should not have been billed at all).
    """
    reason = f"reprocess {period.label}: recomputed {_plain(d.recomputed)}, metered {_plain(d.metered)}"
    refused = outside_provider_window(d.window.window_start, now, max_age, max_ahead)
    status: CorrectionStatus = "applied"
    if refused:
        status, reason = "reported", f"{reason}; not billable: {refused}"
    elif threshold is not None and abs(d.delta) > threshold:
        status, reason = (
            "pending",
            f"{reason}; |delta| {_plain(abs(d.delta))} above the approval threshold {_plain(threshold)}",
        )
    return Correction(reprocess_correction_id(d), d.window, d.delta, max(d.recomputed_events, 1), status, reason)


def retention_gaps(first_retained: Mapping[int, tuple[int, int | None]], read_from: int) -> list[int]:
    """Partitions whose log no longer holds what the period needs: records were deleted (its start
    offset is past 0) and the first one kept is younger than ``read_from`` (epoch ms). A
    recomputation would miss the deleted events and bill them away."""
    return sorted(
        p
        for p, (start_offset, first_ms) in first_retained.items()
        if start_offset > 0 and (first_ms is None or first_ms > read_from)
    )


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f") if value else "0"
