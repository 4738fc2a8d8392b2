"""Reconciliation (pure): final windows in Postgres against what the ledger says the provider accepted.

Compared window by window, then summed per (tenant, customer, meter, period) for the report.
Windows finalised within the grace period are not yet expected in the ledger (billing runs beside
the final write), so they are left out rather than reported as missing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

Period = Literal["day", "month"]
DiscrepancyKind = Literal["not billed", "billed differently", "billed without a final window"]


@dataclass(frozen=True)
class _Window:
    """A window's key and quantity, as both sides of the comparison hold them."""

    tenant_id: str
    customer_id: str
    meter: str
    dimensions_key: str
    window_start: datetime
    quantity: Decimal

    @property
    def key(self) -> tuple:
        return (self.tenant_id, self.customer_id, self.meter, self.dimensions_key, self.window_start)


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


@dataclass(frozen=True)
class Correction:
    """A correction delivery, for the report: which window, from which revision, by how much."""

    tenant_id: str
    customer_id: str
    meter: str
    dimensions_key: str
    window_start: datetime
    revision: int
    quantity: Decimal
    status: str


@dataclass(frozen=True)
class Discrepancy:
    kind: DiscrepancyKind
    tenant_id: str
    customer_id: str
    meter: str
    dimensions_key: str
    window_start: datetime
    final_quantity: Decimal | None
    billed_quantity: Decimal | None
    detail: str


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

    @property
    def agrees(self) -> bool:
        return self.final_quantity == self.billed_quantity


def period_of(moment: datetime, period: Period) -> str:
    """The billing period a window start falls in: ``2026-11-22`` or ``2026-11``."""
    return moment.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


def reconcile(final_windows: Iterable[FinalWindow], ledger: Iterable[LedgerWindow], period: Period = "month") -> tuple[list[PeriodTotal], list[Discrepancy]]:
    """Per-period totals and every window-level discrepancy (an empty list means the two agree).

    A window is billed with the sum of its accepted deliveries: its own event plus its corrections.
    """
    finals = {w.key: w for w in final_windows}
    by_window: dict[tuple, list[LedgerWindow]] = defaultdict(list)
    for d in ledger:
        by_window[d.key].append(d)
    discrepancies: list[Discrepancy] = []
    totals: dict[tuple, list] = defaultdict(lambda: [0, Decimal(0), Decimal(0), 0])
    for k, final in finals.items():
        if not final.settled:
            continue
        deliveries = by_window.get(k, [])
        own = next((d for d in deliveries if d.kind == "window"), None)
        sent = [d for d in deliveries if d.status == "sent"]
        billed = sum((d.quantity for d in sent), Decimal(0)) if own is not None and own.status == "sent" else None
        total = totals[(final.tenant_id, final.customer_id, final.meter, period_of(final.window_start, period))]
        total[0] += 1
        total[1] += final.quantity
        total[2] += billed or Decimal(0)
        total[3] += sum(1 for d in deliveries if d.kind == "correction")
        if billed is None:
            detail = "no delivery in the ledger" if own is None else f"{own.status}" + (f": {own.last_error}" if own.last_error else "")
            discrepancies.append(Discrepancy("not billed", *k, final.quantity, None, detail))
        elif billed != final.quantity:
            open_corrections = [d for d in deliveries if d.kind == "correction" and d.status != "sent"]
            pending = f"; correction {', '.join(f'r{d.revision} {d.quantity} {d.status}' for d in open_corrections)} not accepted yet" if open_corrections else ""
            discrepancies.append(Discrepancy("billed differently", *k, final.quantity, billed, f"billed {billed}, final {final.quantity}{pending}"))
    for k, deliveries in by_window.items():
        accepted = [d for d in deliveries if d.status == "sent"]
        if accepted and k not in finals:
            quantity = sum((d.quantity for d in accepted), Decimal(0))
            discrepancies.append(Discrepancy("billed without a final window", *k, None, quantity, "the provider accepted a window Postgres has no final row for"))
    period_totals = [PeriodTotal(*k, *v) for k, v in sorted(totals.items())]
    discrepancies.sort(key=lambda d: (d.window_start, d.tenant_id, d.customer_id, d.meter, d.dimensions_key))
    return period_totals, discrepancies


def corrections_of(ledger: Iterable[LedgerWindow]) -> list[Correction]:
    """Every correction delivery, oldest window first."""
    found = [Correction(*d.key, d.revision, d.quantity, d.status) for d in ledger if d.kind == "correction"]
    return sorted(found, key=lambda c: (c.window_start, c.tenant_id, c.customer_id, c.meter, c.dimensions_key, c.revision))
