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
    status: str
    last_error: str | None


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

    @property
    def agrees(self) -> bool:
        return self.final_quantity == self.billed_quantity


def period_of(moment: datetime, period: Period) -> str:
    """The billing period a window start falls in: ``2026-11-22`` or ``2026-11``."""
    return moment.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


def reconcile(final_windows: Iterable[FinalWindow], ledger: Iterable[LedgerWindow], period: Period = "month") -> tuple[list[PeriodTotal], list[Discrepancy]]:
    """Per-period totals and every window-level discrepancy (an empty list means the two agree)."""
    finals = {w.key: w for w in final_windows}
    deliveries = {d.key: d for d in ledger}
    discrepancies: list[Discrepancy] = []
    totals: dict[tuple, list] = defaultdict(lambda: [0, Decimal(0), Decimal(0)])
    for k, final in finals.items():
        if not final.settled:
            continue
        delivery = deliveries.get(k)
        billed = delivery.quantity if delivery and delivery.status == "sent" else None
        total = totals[(final.tenant_id, final.customer_id, final.meter, period_of(final.window_start, period))]
        total[0] += 1
        total[1] += final.quantity
        total[2] += billed or Decimal(0)
        if billed is None:
            detail = "no delivery in the ledger" if delivery is None else f"{delivery.status}" + (f": {delivery.last_error}" if delivery.last_error else "")
            discrepancies.append(Discrepancy("not billed", *k, final.quantity, None, detail))
        elif billed != final.quantity:
            discrepancies.append(Discrepancy("billed differently", *k, final.quantity, billed, f"billed {billed}, final {final.quantity}"))
    for k, delivery in deliveries.items():
        if delivery.status == "sent" and k not in finals:
            discrepancies.append(Discrepancy("billed without a final window", *k, None, delivery.quantity, "the provider accepted a window Postgres has no final row for"))
    period_totals = [PeriodTotal(*k, *v) for k, v in sorted(totals.items())]
    discrepancies.sort(key=lambda d: (d.window_start, d.tenant_id, d.customer_id, d.meter, d.dimensions_key))
    return period_totals, discrepancies
