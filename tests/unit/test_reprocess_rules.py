"""Reprocessing rules: the period, the comparison, the per-customer view, the corrections it bills, and its SQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from jobs.reprocess_plan import RESULT_COLUMNS, recompute_statements, reprocess_source_options, unique_events_query
from meterflow.config import JobConfig
from meterflow.corrections import WindowId
from meterflow.errors import ConfigError
from meterflow.reprocess import (
    Period,
    WindowDifference,
    WindowTotal,
    differences,
    per_customer,
    read_from_ms,
    reprocess_correction,
    reprocess_correction_id,
    reprocess_period,
    retention_gaps,
)
from sinks.reprocess_schema import (
    changed_since_sql,
    clear_shadow_sql,
    other_sizes_sql,
    period_corrections_sql,
    period_rows_sql,
    shadow_table_ddl,
)

CFG = JobConfig.model_validate(
    {
        "event_time": {
            "window_size": "1m",
            "allowed_lateness": "30s",
            "watermark_delay": "5s",
            "max_event_ahead": "5m",
        },
        "meters": [{"name": "tokens"}],
    }
)
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
T0 = datetime(2026, 12, 6, 10, 0)


def w(customer: str = "c1", minute: int = 0, size: int = 1) -> WindowId:
    start = T0 + timedelta(minutes=minute)
    return WindowId("t1", customer, "tokens", "{}", start, start + timedelta(minutes=size))


def test_a_period_is_whole_closed_windows():
    """Bounds on window boundaries, until after since, and the last window closed (end + lateness + delay behind now)."""
    assert reprocess_period(T0, T0 + timedelta(hours=1), CFG, NOW) == Period(T0, T0 + timedelta(hours=1))
    assert reprocess_period(T0.replace(tzinfo=UTC), datetime(2026, 12, 6, 11, 0, tzinfo=UTC), CFG, NOW).since == T0
    with pytest.raises(ConfigError, match="not on a window boundary .* use 2026-12-06 10:00:00 or 2026-12-06 10:01:00"):
        reprocess_period(T0 + timedelta(seconds=30), T0 + timedelta(hours=1), CFG, NOW)
    with pytest.raises(ConfigError, match="must be after --since"):
        reprocess_period(T0, T0, CFG, NOW)
    last_closed = datetime(2026, 12, 6, 11, 59)  # 11:59 + 30 s + 5 s is behind 12:00; 12:00 + 35 s is not
    assert reprocess_period(T0, last_closed, CFG, NOW).until == last_closed
    with pytest.raises(ConfigError, match="after now: reprocess up to 2026-12-06 11:59:00 at most"):
        reprocess_period(T0, last_closed + timedelta(minutes=1), CFG, NOW)


def test_reading_starts_where_the_periods_first_event_can_be_appended():
    """An event dated at --since is appended at most event_time.max_event_ahead before it."""
    assert read_from_ms(Period(T0, T0 + timedelta(hours=1)), CFG) == int(
        (T0 - timedelta(minutes=5)).replace(tzinfo=UTC).timestamp() * 1000
    )


def test_differences_cover_both_sides_and_skip_equal_windows():
    recomputed = [
        WindowTotal(w("c1", 0), Decimal("5"), 5),
        WindowTotal(w("c1", 1), Decimal("3"), 3),
        WindowTotal(w("c2", 0), Decimal("2"), 2),
    ]
    metered = {w("c1", 0): Decimal("5"), w("c1", 1): Decimal("4"), w("c3", 0): Decimal("1")}
    found = differences(recomputed, metered)
    assert [(d.window.customer_id, d.metered, d.recomputed, d.delta) for d in found] == [
        ("c2", Decimal(0), Decimal(2), Decimal(2)),  # never metered (events the job lost)
        ("c3", Decimal(1), Decimal(0), Decimal(-1)),  # metered, nothing countable found: refunded
        ("c1", Decimal(4), Decimal(3), Decimal(-1)),  # counted twice (a copy past the dedup horizon)
    ]
    assert differences(recomputed[:1], {w("c1", 0): Decimal("5")}) == []
    totals = per_customer(recomputed, metered, found)
    assert [(c.customer_id, c.windows, c.metered, c.recomputed, c.difference) for c in totals] == [
        ("c1", 1, Decimal(9), Decimal(8), Decimal(-1)),
        ("c2", 1, Decimal(0), Decimal(2), Decimal(2)),
        ("c3", 1, Decimal(1), Decimal(0), Decimal(-1)),
    ]


def test_windows_of_another_size_are_other_windows():
    """A 5-minute window starting with a 1-minute one is not its metered value."""
    found = differences([WindowTotal(w(size=1), Decimal(1), 1)], {w(size=5): Decimal(1)})
    assert sorted((d.window.window_end - d.window.window_start, d.delta) for d in found) == [
        (timedelta(minutes=1), Decimal(1)),
        (timedelta(minutes=5), Decimal(-1)),
    ]


def test_the_correction_bills_the_difference_under_a_deterministic_id():
    d = WindowDifference(w(), Decimal("4"), Decimal("3"), 3)
    period = Period(T0, T0 + timedelta(hours=1))
    c = reprocess_correction(d, period, NOW, timedelta(days=35), timedelta(minutes=5))
    assert (c.delta, c.events, c.status, c.window) == (Decimal(-1), 3, "applied", w())
    assert c.reason == "reprocess 2026-12-06 10:00:00..2026-12-06 11:00:00: recomputed 3, metered 4"
    assert c.correction_id == reprocess_correction_id(d) and c.correction_id.startswith(
        f"rep-{int(T0.replace(tzinfo=UTC).timestamp() * 1000)}-"
    )
    assert reprocess_correction_id(WindowDifference(w(), Decimal("4"), Decimal("2"), 2)) != c.correction_id, (
        "another difference, another correction"
    )
    assert reprocess_correction_id(WindowDifference(w(size=5), Decimal("4"), Decimal("3"), 3)) != c.correction_id, (
        "another span, another correction"
    )
    empty = reprocess_correction(
        WindowDifference(w(), Decimal("2"), Decimal("0"), 0), period, NOW, timedelta(days=35), timedelta(minutes=5)
    )
    assert (empty.delta, empty.events) == (Decimal(-2), 1)
    old = reprocess_correction(d, period, NOW + timedelta(days=40), timedelta(days=35), timedelta(minutes=5))
    assert old.status == "reported" and "not billable" in old.reason


def test_the_recompute_reads_the_jobs_source_bounded_and_counts_each_event_once():
    period = Period(T0, T0 + timedelta(hours=1))
    options = reprocess_source_options(CFG, period)
    assert options["scan.startup.mode"] == "timestamp" and options["scan.bounded.mode"] == "latest-offset"
    assert options["scan.startup.timestamp-millis"] == str(read_from_ms(period, CFG))
    assert (
        options["properties.group.id"] == f"{CFG.kafka.consumer_group}-reprocess"
        and options["format"] == "meterflow-avro"
    )
    setup, query = recompute_statements(CFG, period)
    assert "'scan.bounded.mode' = 'latest-offset'" in setup[0] and "WATERMARK FOR" in setup[0]
    unique = unique_events_query(period)
    assert (
        "PARTITION BY `tenant_id`, `event_id` ORDER BY `kafka_timestamp`, `source_partition`, `source_offset`" in unique
    )
    assert (
        "`reject_reason` IS NULL" in unique
        and "`event_time` >= TIMESTAMP '2026-12-06 10:00:00' AND `event_time` < TIMESTAMP '2026-12-06 11:00:00'"
        in unique
    )
    assert unique.index("ROW_NUMBER") < unique.index("`event_time` >="), "dedup before the period filter"
    assert query.startswith("SELECT " + ", ".join(f"`{c}`" for c in RESULT_COLUMNS))


def test_the_shadow_table_and_the_metered_side_are_keyed_by_window_and_span():
    assert (
        "PRIMARY KEY (tenant_id, customer_id, meter, dimensions_key, window_start, window_end)"
        in shadow_table_ddl("usage_windows_reprocessed")[0]
    )
    for sql in (clear_shadow_sql("s"), period_rows_sql("u"), period_corrections_sql("c")):
        assert "window_end - window_start = %s" in sql
    assert "status" not in period_corrections_sql("c"), (
        "every recorded correction counts, a rejected one too: the operator's decision stands"
    )
    assert "window_end - window_start <> %s" in other_sizes_sql(
        "u"
    ) and "applied_at >= %s OR decided_at >= %s" in changed_since_sql("c")
    with pytest.raises(ValueError):
        shadow_table_ddl("usage; DROP TABLE x")


def test_a_difference_above_the_approval_threshold_waits_for_an_operator():
    d = WindowDifference(w(), Decimal("4"), Decimal("10"), 10)
    period = Period(T0, T0 + timedelta(hours=1))
    held = reprocess_correction(d, period, NOW, timedelta(days=35), timedelta(minutes=5), threshold=Decimal("5"))
    assert held.status == "pending" and "above the approval threshold 5" in held.reason
    assert (
        reprocess_correction(d, period, NOW, timedelta(days=35), timedelta(minutes=5), threshold=Decimal("6")).status
        == "applied"
    )


def test_a_period_whose_start_retention_deleted_is_refused():
    """A partition that lost records (log start past 0) and keeps none older than where reading starts."""
    read_from = 1_000_000
    kept = {0: (0, 2_000_000), 1: (50, 900_000), 2: (50, 1_000_001), 3: (7, None), 4: (0, None)}
    assert retention_gaps(kept, read_from) == [2, 3], (
        "0: nothing deleted; 1: older records still kept; 4: empty, never written"
    )
