"""Reconciliation (pure): final windows in Postgres against what the ledger says the provider accepted.

Compared window by window, then summed per (tenant, customer, meter, period) for the report.
A window is owed its final value plus the corrections from late events that count (applied or
approved); a window that only late events reached is owed their corrections alone. Windows
finalised (or corrected) within the grace period are not yet expected in the ledger (billing runs
beside the final write), so they are left out rather than reported as missing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_FLOOR, Decimal
from typing import Literal

from billing.identifiers import Rounding, format_meter_value
from billing.whole_values import next_period_start
from meterflow.billing_cycle import BillingCycle, to_utc

# "period": the customer's billing period (its cycle; a calendar month in UTC without one); "day": the
# customer's local day; "month": the calendar month in UTC, whatever the customer's cycle.
Period = Literal["period", "day", "month"]
UTC_MONTHS = BillingCycle()  # a customer without a cycle of its own
DiscrepancyKind = Literal["not billed", "billed differently", "billed without a final window", "values sent differ"]


# A window's key and span: tenant, customer, meter, dimensions key, start, end.
WindowKey = tuple[str, str, str, str, datetime, datetime]


@dataclass(frozen=True)
class _Window:
    """A window's key, span and quantity, as both sides of the comparison hold them."""

    tenant_id: str
    customer_id: str
    meter: str
    dimensions_key: str
    window_start: datetime
    window_end: datetime
    quantity: Decimal

    @property
    def key(self) -> WindowKey:
        """Key and span: windows of two sizes that start together are two windows."""
        return (self.tenant_id, self.customer_id, self.meter, self.dimensions_key, self.window_start, self.window_end)


@dataclass(frozen=True)
class FinalWindow(_Window):
    settled: bool  # finalised before the grace cut-off


@dataclass(frozen=True)
class LedgerWindow(_Window):
    """One delivery: the window's own event (``kind = 'window'``) or a correction (its difference)."""

    status: str
    last_error: str | None
    kind: str = "window"
    revision: int = 0
    correction_id: str | None = None  # set on a correction from late events
    value: str | None = (
        None  # the provider's value, once fixed (at the first attempt of a carried meter's delivery, else when sent)
    )
    destination: str = "stripe"  # where it is billed (billing/routing.py)


@dataclass(frozen=True)
class LateCorrection(_Window):
    """A correction from late events that counts (applied or approved): ``quantity`` is its delta."""

    correction_id: str
    settled: bool  # recorded or decided before the grace cut-off


@dataclass(frozen=True)
class Correction:
    """A correction delivery, for the report: which window, from which revision, by how much."""

    tenant_id: str
    customer_id: str
    meter: str
    dimensions_key: str
    window_start: datetime
    window_end: datetime
    revision: int
    quantity: Decimal
    status: str
    origin: str = "changed final"  # or "late events"


@dataclass(frozen=True)
class Discrepancy:
    kind: DiscrepancyKind
    tenant_id: str
    customer_id: str
    meter: str
    dimensions_key: str
    window_start: datetime
    window_end: datetime  # a carried meter's month: the next month's start
    final_quantity: Decimal | None
    billed_quantity: Decimal | None
    detail: str
    destination: str = ""  # where the window is billed; empty where no delivery says


@dataclass(frozen=True)
class PeriodTotal:
    tenant_id: str
    customer_id: str
    meter: str
    period: str
    windows: int
    final_quantity: Decimal
    billed_quantity: Decimal
    corrections: int = 0
    destination: str = ""  # where the period's windows are billed; empty for windows no delivery names
    period_start: datetime | None = None  # the period [start, end) in UTC
    period_end: datetime | None = None

    @property
    def agrees(self) -> bool:
        return self.final_quantity == self.billed_quantity


def period_of(moment: datetime, period: Period, cycle: BillingCycle = UTC_MONTHS) -> tuple[str, datetime, datetime]:
    """The reporting period a window start falls in: its name (``BillingCycle.label``) and ``[start, end)``
    in UTC. ``period`` and ``day`` follow the customer's cycle and timezone; ``month`` is UTC's."""
    moment = to_utc(moment)
    if period == "month":
        cycle = UTC_MONTHS
    start, end = cycle.day_of(moment) if period == "day" else cycle.period_of(moment)
    return cycle.label(start, end, day=period == "day"), start, end


@dataclass(frozen=True)
class _Owed:
    """What one window is owed: its final value (if it has a final row) plus its counted late corrections."""

    window: _Window  # the final row, or the first late correction of a window without one
    quantity: Decimal
    settled: bool  # the final row and every correction are older than the grace cut-off
    has_final: bool


def _owed(final_windows: Iterable[FinalWindow], late_corrections: Iterable[LateCorrection]) -> dict[WindowKey, _Owed]:
    """Per window key, what it is owed."""
    owed = {w.key: _Owed(w, w.quantity, w.settled, has_final=True) for w in final_windows}
    for c in late_corrections:
        before = owed.get(c.key, _Owed(c, Decimal(0), settled=True, has_final=False))
        owed[c.key] = _Owed(before.window, before.quantity + c.quantity, before.settled and c.settled, before.has_final)
    return owed


def _label(d: LedgerWindow) -> str:
    return f"{'late ' + (d.correction_id or '')[:16] if d.correction_id else f'r{d.revision}'} {d.quantity} {d.status}"


def reconcile(
    final_windows: Iterable[FinalWindow],
    ledger: Iterable[LedgerWindow],
    period: Period = "period",
    late_corrections: Iterable[LateCorrection] = (),
    cycles: Mapping[tuple[str, str], BillingCycle] | None = None,
) -> tuple[list[PeriodTotal], list[Discrepancy]]:
    """Per-period totals and every window-level discrepancy (an empty list means the two agree).

    Totals are per ``period`` (``period_of``), each customer's by its cycle of ``cycles`` (a customer
    without one: calendar months in UTC).

    A window is billed with the sum of its accepted deliveries: its own event plus its corrections
    (of a changed final, and from late events). It is owed its final value plus its counted
    corrections from late events; a window with no final row is owed those corrections alone.
    """
    owed = _owed(final_windows, late_corrections)
    by_window: dict[WindowKey, list[LedgerWindow]] = defaultdict(list)
    for d in ledger:
        by_window[d.key].append(d)
    discrepancies: list[Discrepancy] = []
    totals: dict[tuple, list] = defaultdict(lambda: [0, Decimal(0), Decimal(0), 0])
    cycles = cycles or {}
    for k, o in owed.items():
        if not o.settled:
            continue
        window, quantity, has_final = o.window, o.quantity, o.has_final
        deliveries = by_window.get(k, [])
        own = next((d for d in deliveries if d.kind == "window"), None)
        sent = [d for d in deliveries if d.status == "sent"]
        billed_at_all = own.status == "sent" if own is not None else (not has_final and bool(sent))
        billed = sum((d.quantity for d in sent), Decimal(0)) if billed_at_all else None
        destination = own.destination if own is not None else (deliveries[0].destination if deliveries else "")
        cycle = cycles.get((window.tenant_id, window.customer_id), UTC_MONTHS)
        label, start, end = period_of(window.window_start, period, cycle)
        total = totals[(window.tenant_id, window.customer_id, window.meter, start, label, end, destination)]
        total[0] += 1
        total[1] += quantity
        total[2] += billed or Decimal(0)
        total[3] += sum(1 for d in deliveries if d.kind == "correction")
        if billed is None:
            if own is not None:
                detail = own.status + (f": {own.last_error}" if own.last_error else "")
            else:
                detail = "; ".join(_label(d) for d in deliveries) if deliveries else "no delivery in the ledger"
            discrepancies.append(Discrepancy("not billed", *k, quantity, None, detail, destination))
        elif billed != quantity:
            open_corrections = [d for d in deliveries if d.kind == "correction" and d.status != "sent"]
            pending = (
                f"; correction {', '.join(_label(d) for d in open_corrections)} not accepted yet"
                if open_corrections
                else ""
            )
            late = quantity - window.quantity if has_final else quantity
            owed_text = f"final {window.quantity}" if has_final else "no final window"
            owed_text += f" + corrections from late events {late}" if late or not has_final else ""
            discrepancies.append(
                Discrepancy(
                    "billed differently", *k, quantity, billed, f"billed {billed}, {owed_text}{pending}", destination
                )
            )
    for k, deliveries in by_window.items():
        accepted = [d for d in deliveries if d.status == "sent"]
        if accepted and k not in owed:
            quantity = sum((d.quantity for d in accepted), Decimal(0))
            discrepancies.append(
                Discrepancy(
                    "billed without a final window",
                    *k,
                    None,
                    quantity,
                    "the provider accepted a window Postgres has no final row for",
                    accepted[0].destination,
                )
            )
    period_totals = [
        PeriodTotal(t, c, m, label, windows, final, billed, corrections, destination, start, end)
        for (t, c, m, start, label, end, destination), (windows, final, billed, corrections) in sorted(totals.items())
    ]
    discrepancies.sort(key=lambda d: (d.window_start, d.tenant_id, d.customer_id, d.meter, d.dimensions_key))
    return period_totals, discrepancies


def value_discrepancies(
    ledger: Iterable[LedgerWindow],
    roundings: Mapping[str, Rounding],
    cycles: Mapping[tuple[str, str], BillingCycle] | None = None,
) -> list[Discrepancy]:
    """Where the values sent, or fixed to be sent, break the meter's value rule (billing/whole_values.py).

    A carried meter's values of one (tenant, customer, meter, billing period: the customer's cycle
    of ``cycles``, else its calendar month in UTC) add up to the whole part of
    the quantities they were fixed for, whatever their status; so once every delivery is sent (the
    window comparison), the provider holds the whole part of what was metered. Any other meter's
    value is its delivery's quantity, rounded as configured. ``window_start`` and ``window_end`` of
    a carried discrepancy are its period's; ``dimensions_key`` is ``*``.
    """
    issues: list[Discrepancy] = []
    months: dict[tuple, list[LedgerWindow]] = defaultdict(list)
    cycles = cycles or {}
    for d in ledger:
        if d.value is None:
            continue
        rounding = roundings.get(d.meter, "carry")
        if rounding == "carry":
            cycle = cycles.get((d.tenant_id, d.customer_id), BillingCycle())
            months[(d.tenant_id, d.customer_id, d.meter, cycle.period_of(to_utc(d.window_start)))].append(d)
            continue
        try:
            expected = Decimal(format_meter_value(d.quantity, rounding))
        except ValueError as e:  # exact: a fraction is never to be sent
            issues.append(
                Discrepancy(
                    "values sent differ",
                    *d.key,
                    d.quantity,
                    Decimal(d.value),
                    f"value {d.value} for quantity {d.quantity}: {e}",
                )
            )
            continue
        if Decimal(d.value) != expected:
            issues.append(
                Discrepancy(
                    "values sent differ",
                    *d.key,
                    expected,
                    Decimal(d.value),
                    f"value {d.value} for quantity {d.quantity}, {rounding}: expected {expected}",
                )
            )
    for (tenant, customer, meter, (month, month_end)), group in sorted(months.items()):
        quantity = sum((d.quantity for d in group), Decimal(0))
        sent = sum((Decimal(d.value) for d in group if d.value is not None), Decimal(0))  # all are: see above
        whole = quantity.to_integral_value(rounding=ROUND_FLOOR)
        if sent != whole:
            detail = f"values {sent} for quantities {quantity} in the period from {month:%Y-%m-%d %H:%M} UTC: carried values add up to its whole part, {whole}"
            issues.append(
                Discrepancy(
                    "values sent differ",
                    tenant,
                    customer,
                    meter,
                    "*",
                    month,
                    month_end,
                    whole,
                    sent,
                    detail,
                )
            )
    return issues


def corrections_of(ledger: Iterable[LedgerWindow]) -> list[Correction]:
    """Every correction delivery, oldest window first."""
    found = [
        Correction(*d.key, d.revision, d.quantity, d.status, "late events" if d.correction_id else "changed final")
        for d in ledger
        if d.kind == "correction"
    ]
    return sorted(
        found, key=lambda c: (c.window_start, c.tenant_id, c.customer_id, c.meter, c.dimensions_key, c.revision)
    )


def unpublished(finals: Iterable[tuple[tuple, int, Decimal]], ledger: Iterable[LedgerWindow]) -> list[tuple]:
    """Keys of final windows billing never saw at their final revision: no delivery of the window in
    the ledger, or only of an older revision, with a total other than the final quantity
    (deliveries of late-event corrections aside; a newer close with the same quantity leaves billing
    nothing to record, so it is not chosen again and again).

    ``finals`` holds (window key, revision, quantity) of each settled final row. These are the
    windows whose closed-window record did not reach billing (an output transaction Kafka aborted
    after an outage longer than kafka.transaction_timeout): ``meterflow billing republish``
    publishes them again, and billing bills each once, or the difference to what it billed.
    """
    seen: dict[tuple, tuple[int, Decimal]] = {}
    for d in ledger:
        if d.correction_id is None:
            revision, total = seen.get(d.key, (0, Decimal(0)))
            seen[d.key] = (max(revision, d.revision), total + d.quantity)
    chosen = []
    for key, revision, quantity in finals:
        if key not in seen or (seen[key][0] < revision and seen[key][1] != quantity):
            chosen.append(key)
    return sorted(chosen)


@dataclass(frozen=True)
class SentGroup:
    """What the ledger says one provider customer's meter was sent in a month (values accepted)."""

    provider_customer_id: str
    event_name: str
    month: datetime  # naive UTC, the month's first instant
    value: Decimal
    deliveries: int
    last_sent_at: datetime
    unsettled: int = 0  # deliveries still pending or failed: one may have reached the provider already


@dataclass(frozen=True)
class ProviderDifference:
    """A month whose total at the provider differs from the values the ledger says it accepted."""

    provider_customer_id: str
    event_name: str
    month: datetime
    sent: Decimal
    provider_total: Decimal

    @property
    def detail(self) -> str:
        return f"the provider holds {self.provider_total} for {self.month:%Y-%m}, the ledger sent {self.sent}"


def provider_differences(
    groups: Iterable[SentGroup], totals: Mapping[tuple[str, str, datetime], Decimal]
) -> list[ProviderDifference]:
    """Every group whose provider total (keyed by customer, event name and month) is not the sum of the values sent."""
    found = []
    for g in groups:
        total = totals[(g.provider_customer_id, g.event_name, g.month)]
        if total != g.value:
            found.append(ProviderDifference(g.provider_customer_id, g.event_name, g.month, g.value, total))
    return found


def summary_bounds(month: datetime, now: datetime, ahead_s: int) -> tuple[int, int]:
    """The provider summary's [start, end) in unix seconds for a month: its first minute to its end,
    or to the minute after ``now`` + ``ahead_s`` while the month runs (events may be dated that far
    ahead; a summary ends on a minute boundary)."""
    start = int(month.replace(tzinfo=UTC).timestamp())
    month_end = int(next_period_start(month).replace(tzinfo=UTC).timestamp())
    latest = int(now.timestamp()) + ahead_s
    return start, min(month_end, latest - latest % 60 + 60)
