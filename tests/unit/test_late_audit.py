"""Late-event audit: selection, grouping, lateness percentiles and exact output formats."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from decimal import Decimal

import pytest

from meterflow.late_audit import percentile, select, summarize, to_csv, to_json, write_histogram


def _late(tenant, customer, meter, window_start, quantity, lateness_ms, event_time=None):
    return {
        "tenant_id": tenant,
        "customer_id": customer,
        "meter": meter,
        "window_start": window_start,
        "event_time": event_time or window_start,
        "quantity": Decimal(quantity),
        "lateness_ms": lateness_ms,
    }


W1, W2 = datetime(2026, 1, 1, 0, 0), datetime(2026, 1, 1, 0, 1)
RECORDS = [
    _late("t1", "c1", "tokens", W1, "1.5", 100),
    _late("t1", "c1", "tokens", W1, "2.25", 300),
    _late("t1", "c1", "tokens", W1, "0.25", 200),
    _late("t1", "c2", "tokens", W2, "5", 5000),
    _late("t2", "c1", "api_calls", W2, "7", 70_000),
]


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([1], 0.5, 1), ([1, 2, 3, 4], 0.5, 2), ([1, 2, 3, 4], 0.9, 4), (list(range(1, 101)), 0.9, 90), ([5, 6], 1.0, 6)],
)
def test_percentile_nearest_rank(values, q, expected):
    """Nearest-rank percentiles of sorted integer latenesses."""
    assert percentile(values, q) == expected


def test_summarize_by_window_sums_exactly_and_ranks_by_count():
    """Per window: count, exact quantity sum, lateness p50/p90/max; most late events first."""
    rows = summarize(RECORDS, by="window")
    assert [(r.tenant_id, r.customer_id, r.count) for r in rows] == [("t1", "c1", 3), ("t1", "c2", 1), ("t2", "c1", 1)]
    top = rows[0]
    assert top.quantity == Decimal("4.00") and top.window_start == "2026-01-01 00:00:00"
    assert (top.lateness_p50_ms, top.lateness_p90_ms, top.lateness_max_ms) == (200, 300, 300)


def test_summarize_by_tenant_collapses_customers():
    """Grouping by tenant folds customers, meters and windows together."""
    rows = {r.tenant_id: r for r in summarize(RECORDS, by="tenant")}
    assert rows["t1"].count == 4 and rows["t1"].quantity == Decimal("9.00") and rows["t1"].customer_id == "*"


def test_select_filters_tenant_and_time_range():
    """Tenant and [since, until) filters on event_time."""
    assert len(select(RECORDS, tenant="t2")) == 1
    assert len(select(RECORDS, since=W2)) == 2
    assert len(select(RECORDS, until=W2)) == 3


def test_select_compares_aware_times_in_utc():
    """An event time in another zone is compared with the naive UTC bounds as the moment it is:
    01:00:30 at UTC+1 is 00:00:30 UTC, inside [W1, W2)."""
    from datetime import timedelta, timezone

    elsewhere = _late(
        "t3",
        "c1",
        "tokens",
        W1,
        "1",
        10,
        event_time=datetime(2026, 1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))),
    )
    assert select([elsewhere], since=W1, until=W2) == [elsewhere]
    assert select([elsewhere], since=W2) == []


def test_csv_and_json_keep_quantities_exact():
    """Machine formats carry decimal strings, never floats."""
    rows = summarize(RECORDS, by="window")
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert parsed[0]["quantity"] == "4.00" and parsed[0]["count"] == "3"
    assert json.loads(to_json(rows))[0]["quantity"] == "4.00"


def test_histogram_is_a_png(tmp_path):
    """The histogram is written as a PNG file."""
    out = tmp_path / "lateness.png"
    write_histogram([100, 200, 5000, 70_000], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_marks_corrected_and_uncorrectable_events():
    """With the recorded outcomes, each group counts its corrected and its not-correctable late events."""
    records = [{**r, "event_id": f"e{i}"} for i, r in enumerate(RECORDS)]
    outcomes = {
        ("t1", "e0"): "corrected (applied)",
        ("t1", "e1"): "corrected (pending)",
        ("t1", "e2"): "not corrected",
        ("t2", "e3"): "corrected (applied)",
    }
    rows = {(r.customer_id, r.window_start): r for r in summarize(records, by="window", outcomes=outcomes)}
    top = rows[("c1", "2026-01-01 00:00:00")]
    assert (top.count, top.corrected, top.not_corrected) == (3, 2, 1)
    assert (rows[("c2", "2026-01-01 00:01:00")].corrected, rows[("c2", "2026-01-01 00:01:00")].not_corrected) == (
        0,
        0,
    ), "t1/e3 is not t2/e3"
    assert list(csv.DictReader(io.StringIO(to_csv(list(rows.values())))))[0].keys() >= {"corrected", "not_corrected"}
