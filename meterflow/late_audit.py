"""Late-event audit: summarise the late-events topic by tenant/customer/meter/window (pure)."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from meterflow.config_values import naive_utc

GroupBy = Literal["window", "customer", "tenant"]
_KEYS: dict[str, tuple[str, ...]] = {
    "window": ("tenant_id", "customer_id", "meter", "window_start"),
    "customer": ("tenant_id", "customer_id", "meter"),
    "tenant": ("tenant_id",),
}


@dataclass(frozen=True)
class LateSummary:
    """Late events of one group: how many, how much usage, how late (ms), and how many of them
    ``corrections apply`` made part of a correction (``corrected``) or recorded as not correctable."""

    tenant_id: str
    customer_id: str
    meter: str
    window_start: str
    count: int
    quantity: Decimal
    lateness_p50_ms: int
    lateness_p90_ms: int
    lateness_max_ms: int
    corrected: int = 0
    not_corrected: int = 0


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (q in [0, 1])."""
    if not sorted_values:
        msg = "percentile of an empty list"
        raise ValueError(msg)
    rank = max(1, -(-int(q * 1000) * len(sorted_values) // 1000))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def select(
    records: Iterable[dict[str, Any]],
    tenant: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """Late records of one tenant and/or with event_time in [since, until) (naive UTC datetimes)."""
    return [
        r
        for r in records
        if (tenant is None or r["tenant_id"] == tenant)
        and (since is None or naive_utc(r["event_time"]) >= since)
        and (until is None or naive_utc(r["event_time"]) < until)
    ]


def summarize(
    records: Iterable[dict[str, Any]], by: GroupBy = "window", outcomes: Mapping[tuple[str, str], str] | None = None
) -> list[LateSummary]:
    """Count, quantity and lateness distribution per group, largest count first.

    Args:
        outcomes: per recorded ``(tenant_id, event_id)``, what ``corrections apply`` made of it
            (``"corrected ..."`` or ``"not corrected"``); events not in it count in neither column.
    """
    outcomes = outcomes or {}
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in _KEYS[by])].append(r)
    out = []
    for key, members in groups.items():
        named = dict(zip(_KEYS[by], key, strict=True))
        lateness = sorted(int(m["lateness_ms"]) for m in members)
        marks = [outcomes.get((m["tenant_id"], m["event_id"]), "") for m in members] if outcomes else []
        out.append(
            LateSummary(
                tenant_id=named["tenant_id"],
                customer_id=named.get("customer_id", "*"),
                meter=named.get("meter", "*"),
                window_start=naive_utc(named["window_start"]).isoformat(sep=" ") if "window_start" in named else "*",
                count=len(members),
                quantity=sum((Decimal(m["quantity"]) for m in members), Decimal(0)),
                lateness_p50_ms=percentile(lateness, 0.5),
                lateness_p90_ms=percentile(lateness, 0.9),
                lateness_max_ms=lateness[-1],
                corrected=sum(1 for mark in marks if mark.startswith("corrected")),
                not_corrected=sum(1 for mark in marks if mark == "not corrected"),
            )
        )
    return sorted(out, key=lambda s: (-s.count, s.tenant_id, s.customer_id, s.meter, s.window_start))


def to_csv(rows: list[LateSummary]) -> str:
    """CSV with a header; quantities as exact decimal strings."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(LateSummary.__dataclass_fields__))
    writer.writeheader()
    for row in rows:
        writer.writerow({**asdict(row), "quantity": format(row.quantity, "f")})
    return out.getvalue()


def to_json(rows: list[LateSummary]) -> str:
    """JSON array; quantities as exact decimal strings."""
    return json.dumps([{**asdict(r), "quantity": format(r.quantity, "f")} for r in rows], indent=2)


def write_histogram(lateness_ms: list[int], path: str, title: str = "Lateness of late events") -> None:
    """A PNG histogram of lateness in seconds (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.hist(
        [ms / 1000 for ms in lateness_ms],
        bins=min(50, max(5, len(lateness_ms) // 5)),
        color="#4c72b0",
        edgecolor="white",
    )
    ax.set_xlabel("lateness: watermark - event_time (s)")
    ax.set_ylabel("late events")
    ax.set_title(f"{title} (n = {len(lateness_ms)})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
