"""Billing cycles: calendar and anniversary periods in a customer's timezone, days under daylight
saving, and periods and days always whole quarter hours in UTC (what the rollups are kept in)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from meterflow.billing_cycle import BillingCycle


def test_a_calendar_month_in_utc_is_the_default():
    assert BillingCycle().period_of(datetime(2026, 12, 7, 18, 0)) == (datetime(2026, 12, 1), datetime(2027, 1, 1))
    assert BillingCycle().anchor == "calendar"


def test_an_anniversary_period_spans_a_month_boundary_in_the_customers_timezone():
    cycle = BillingCycle(15, "Europe/Paris")
    # 2026-03-14 23:30 UTC is already the 15th in Paris (UTC+1): the new period has started.
    assert cycle.period_of(datetime(2026, 3, 14, 23, 30)) == (
        datetime(2026, 3, 14, 23, 0),
        datetime(2026, 4, 14, 22, 0),
    )
    # One minute before local midnight of the 15th belongs to the period before.
    assert cycle.period_of(datetime(2026, 3, 14, 22, 59))[1] == datetime(2026, 3, 14, 23, 0)


def test_days_and_names_are_the_customers_local_ones():
    cycle = BillingCycle(15, "Europe/Paris")
    # The last Sunday of March: the local day is 23 hours long.
    assert cycle.day_of(datetime(2026, 3, 29, 12, 0)) == (datetime(2026, 3, 28, 23, 0), datetime(2026, 3, 29, 22, 0))
    start, end = cycle.period_of(datetime(2026, 3, 14, 23, 30))
    assert cycle.label(start, end) == "2026-03-15/2026-04-15 Europe/Paris"
    assert cycle.label(*cycle.day_of(datetime(2026, 3, 14, 23, 30)), day=True) == "2026-03-15 Europe/Paris"
    assert BillingCycle().label(datetime(2026, 2, 1), datetime(2026, 3, 1)) == "2026-02"


def test_an_anchor_past_a_months_end_starts_on_its_last_day():
    cycle = BillingCycle(31)
    assert cycle.periods(datetime(2026, 2, 1), datetime(2026, 3, 31)) == [
        (datetime(2026, 1, 31), datetime(2026, 2, 28)),
        (datetime(2026, 2, 28), datetime(2026, 3, 31)),
    ]


def test_periods_and_days_tile_time_without_gap_or_overlap():
    for cycle in (BillingCycle(), BillingCycle(29, "America/New_York"), BillingCycle(None, "Asia/Kathmandu")):
        since, until = datetime(2026, 1, 1), datetime(2027, 1, 1)
        for spans in (cycle.periods(since, until), cycle.days(since, until)):
            assert spans[0][0] <= since and spans[-1][1] >= until
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            # Whole quarter hours in UTC, whatever the offset (Kathmandu is UTC+5:45).
            assert all(s.minute % 15 == 0 and s.second == 0 for s, _ in spans)


def test_a_day_under_daylight_saving_is_23_or_25_hours():
    days = BillingCycle(None, "Europe/Paris").days(datetime(2026, 3, 28, 23), datetime(2026, 3, 30))
    assert [e - s for s, e in days] == [timedelta(hours=23), timedelta(hours=24)]
    fall = BillingCycle(None, "Europe/Paris").days(datetime(2026, 10, 24, 22), datetime(2026, 10, 25, 23))
    assert fall[0][1] - fall[0][0] == timedelta(hours=25)


@pytest.mark.parametrize(
    ("anchor_day", "timezone"), [(0, "UTC"), (32, "UTC"), (None, "Mars/Olympus"), (None, "../etc")]
)
def test_a_cycle_one_past_its_limits_is_refused(anchor_day, timezone):
    with pytest.raises(ValueError):
        BillingCycle(anchor_day, timezone)


def test_the_anchor_days_at_the_limits_are_taken():
    assert BillingCycle(1).anchor == "anniversary" and BillingCycle(31).anchor_day == 31
