"""Reconciliation: final windows against the ledger, window by window and per billing period."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from billing.reconcile import FinalWindow, LedgerWindow, period_of, reconcile
from meterflow.billing_cycle import BillingCycle

T1, T2, T3 = datetime(2026, 10, 31, 23, 59), datetime(2026, 11, 1, 0, 0), datetime(2026, 11, 1, 0, 1)
MINUTE = timedelta(minutes=1)


def final(start: datetime, quantity: str, settled: bool = True, customer: str = "c1") -> FinalWindow:
    return FinalWindow("t1", customer, "tokens", "{}", start, start + MINUTE, Decimal(quantity), settled)


def billed(
    start: datetime, quantity: str, status: str = "sent", error: str | None = None, customer: str = "c1"
) -> LedgerWindow:
    return LedgerWindow("t1", customer, "tokens", "{}", start, start + MINUTE, Decimal(quantity), status, error)


def test_agreement_has_no_discrepancies_and_totals_per_period():
    """Matching windows agree; totals split at the month boundary."""
    totals, issues = reconcile(
        [final(T1, "1.5"), final(T2, "2"), final(T3, "3.25")], [billed(T1, "1.5"), billed(T2, "2"), billed(T3, "3.25")]
    )
    assert issues == []
    assert [(t.period, t.windows, t.final_quantity, t.agrees) for t in totals] == [
        ("2026-10", 1, Decimal("1.5"), True),
        ("2026-11", 2, Decimal("5.25"), True),
    ]


def test_each_kind_of_discrepancy_is_reported_with_its_detail():
    """Dead, missing, different quantity, and billed without a final window are all listed."""
    finals = [final(T1, "1"), final(T2, "2"), final(T3, "3", customer="c2"), final(T3, "4")]
    ledger = [
        billed(T1, "1", status="dead", error="no billing customer mapped"),
        billed(T2, "2.5"),
        billed(T1, "9", customer="c3"),
    ]
    totals, issues = reconcile(finals, ledger, "day")
    kinds = sorted((i.kind, i.customer_id, i.detail) for i in issues)
    assert kinds == [
        ("billed differently", "c1", "billed 2.5, final 2"),
        ("billed without a final window", "c3", "the provider accepted a window Postgres has no final row for"),
        ("not billed", "c1", "dead: no billing customer mapped"),
        ("not billed", "c1", "no delivery in the ledger"),
        ("not billed", "c2", "no delivery in the ledger"),
    ]
    assert not any(t.agrees for t in totals if t.customer_id == "c1")


def test_windows_inside_the_grace_period_are_not_yet_expected():
    """A window finalised moments ago may still be in flight to the provider: not a discrepancy yet."""
    totals, issues = reconcile([final(T1, "1", settled=False)], [])
    assert issues == [] and totals == []


def test_period_of():
    assert period_of(T1, "day") == ("2026-10-31", datetime(2026, 10, 31), datetime(2026, 11, 1))
    assert (
        period_of(T1, "month") == period_of(T1, "period") == ("2026-10", datetime(2026, 10, 1), datetime(2026, 11, 1))
    )


def test_period_of_follows_the_customers_cycle_and_timezone():
    """A period and a day are the customer's own; ``month`` stays the calendar month in UTC."""
    cycle = BillingCycle(15, "America/New_York")
    # 2026-11-15 04:30 UTC is still the 14th in New York (UTC-5): the period that began on October 15.
    before, after = datetime(2026, 11, 15, 4, 30), datetime(2026, 11, 15, 5, 30)
    assert period_of(before, "period", cycle) == (
        "2026-10-15/2026-11-15 America/New_York",
        datetime(2026, 10, 15, 4, 0),  # daylight saving time until November 1
        datetime(2026, 11, 15, 5, 0),
    )
    assert period_of(after, "period", cycle)[0] == "2026-11-15/2026-12-15 America/New_York"
    assert period_of(before, "day", cycle) == (
        "2026-11-14 America/New_York",
        datetime(2026, 11, 14, 5, 0),
        datetime(2026, 11, 15, 5, 0),
    )
    assert (
        period_of(before, "month", cycle)
        == period_of(after, "month", cycle)
        == (
            "2026-11",
            datetime(2026, 11, 1),
            datetime(2026, 12, 1),
        )
    )
    assert period_of(T1, "period", BillingCycle(None, "Asia/Tokyo"))[0] == "2026-11 Asia/Tokyo"


def test_totals_are_per_each_customers_own_period():
    """Two windows an hour apart: one period for a calendar customer in UTC, two for an anniversary customer
    whose period turns between them, while the other customers of the same windows keep theirs."""
    early, late_ = datetime(2026, 11, 15, 4, 30), datetime(2026, 11, 15, 5, 30)
    finals = [final(early, "1", customer=c) for c in ("c1", "c2")] + [
        final(late_, "2", customer=c) for c in ("c1", "c2")
    ]
    ledger = [billed(early, "1", customer=c) for c in ("c1", "c2")] + [
        billed(late_, "2", customer=c) for c in ("c1", "c2")
    ]
    cycles = {("t1", "c2"): BillingCycle(15, "America/New_York")}
    totals, issues = reconcile(finals, ledger, cycles=cycles)
    assert issues == []
    assert [(t.customer_id, t.period, t.windows, t.final_quantity, t.period_start) for t in totals] == [
        ("c1", "2026-11", 2, Decimal(3), datetime(2026, 11, 1)),
        ("c2", "2026-10-15/2026-11-15 America/New_York", 1, Decimal(1), datetime(2026, 10, 15, 4, 0)),
        ("c2", "2026-11-15/2026-12-15 America/New_York", 1, Decimal(2), datetime(2026, 11, 15, 5, 0)),
    ]
    by_month, _ = reconcile(finals, ledger, "month", cycles=cycles)
    assert [(t.customer_id, t.period, t.windows) for t in by_month] == [("c1", "2026-11", 2), ("c2", "2026-11", 2)]


def test_corrections_add_up_with_the_window_and_are_listed():
    """A window billed 10, then corrected by +2.5: agrees with a final 12.5; a correction not yet accepted is named."""
    from billing.reconcile import corrections_of

    ledger = [
        billed(T1, "10"),
        LedgerWindow("t1", "c1", "tokens", "{}", T1, T1 + MINUTE, Decimal("2.5"), "sent", None, "correction", 5),
    ]
    totals, issues = reconcile([final(T1, "12.5")], ledger)
    assert issues == [] and totals[0].corrections == 1 and totals[0].billed_quantity == Decimal("12.5")
    pending = [
        billed(T1, "10"),
        LedgerWindow("t1", "c1", "tokens", "{}", T1, T1 + MINUTE, Decimal("2.5"), "failed", "503", "correction", 5),
    ]
    _, issues = reconcile([final(T1, "12.5")], pending)
    assert [i.kind for i in issues] == ["billed differently"] and "correction r5 2.5 failed not accepted yet" in issues[
        0
    ].detail
    [c] = corrections_of(ledger)
    assert (c.revision, c.quantity, c.status) == (5, Decimal("2.5"), "sent")


def late(start: datetime, delta: str, status: str = "sent", customer: str = "c1", cid: str = "cor-1") -> LedgerWindow:
    return LedgerWindow(
        "t1", customer, "tokens", "{}", start, start + MINUTE, Decimal(delta), status, None, "correction", 0, cid
    )


def counted(start: datetime, delta: str, customer: str = "c1", cid: str = "cor-1", settled: bool = True):
    from billing.reconcile import LateCorrection

    return LateCorrection("t1", customer, "tokens", "{}", start, start + MINUTE, Decimal(delta), cid, settled)


def test_a_window_is_owed_its_final_plus_its_counted_corrections_from_late_events():
    """Final 10 + late 3: billed 10 + 3 agrees; the late correction not accepted yet is named; billed
    without the correction counting (rejected) is a discrepancy too."""
    from billing.reconcile import corrections_of

    totals, issues = reconcile(
        [final(T1, "10")], [billed(T1, "10"), late(T1, "3")], late_corrections=[counted(T1, "3")]
    )
    assert issues == [] and (totals[0].final_quantity, totals[0].billed_quantity) == (Decimal(13), Decimal(13))
    _, issues = reconcile(
        [final(T1, "10")], [billed(T1, "10"), late(T1, "3", "pending")], late_corrections=[counted(T1, "3")]
    )
    assert [i.kind for i in issues] == ["billed differently"]
    assert (
        "final 10 + corrections from late events 3" in issues[0].detail
        and "late cor-1 3 pending not accepted yet" in issues[0].detail
    )
    _, issues = reconcile([final(T1, "10")], [billed(T1, "10"), late(T1, "3")])
    assert [(i.kind, i.final_quantity, i.billed_quantity) for i in issues] == [
        ("billed differently", Decimal(10), Decimal(13))
    ]
    [c] = corrections_of([billed(T1, "10"), late(T1, "3")])
    assert (c.origin, c.revision) == ("late events", 0)


def test_a_window_only_late_events_reached_is_owed_their_corrections():
    """No final row: the late correction alone is owed; billed, it agrees; unsent, it is not billed;
    a correction counted within the grace period is not expected yet."""
    totals, issues = reconcile([], [late(T2, "4", customer="c9")], late_corrections=[counted(T2, "4", customer="c9")])
    assert issues == [] and totals[0].billed_quantity == Decimal(4)
    _, issues = reconcile(
        [], [late(T2, "4", "failed", customer="c9")], late_corrections=[counted(T2, "4", customer="c9")]
    )
    assert [(i.kind, i.final_quantity, i.billed_quantity) for i in issues] == [
        ("not billed", Decimal(4), None)
    ] and "failed" in issues[0].detail
    assert reconcile([], [], late_corrections=[counted(T2, "4", customer="c9", settled=False)]) == ([], [])


def test_values_sent_follow_each_meters_rounding():
    """Carried: a month's values add up to the whole part of their quantities, whatever their status;
    one unit more (or less) is a discrepancy. Other roundings: each value is its quantity, rounded."""
    from billing.reconcile import value_discrepancies

    def fixed(start: datetime, quantity: str, value: str, meter: str = "tokens", status: str = "sent") -> LedgerWindow:
        return LedgerWindow(
            "t1", "c1", meter, "{}", start, start + MINUTE, Decimal(quantity), status, None, value=value
        )

    october = [fixed(T1, "0.4", "0"), fixed(T1, "0.4", "0", status="dead"), fixed(T1, "0.4", "1")]
    november = [fixed(T2, "2.5", "2"), fixed(T3, "-0.6", "-1")]
    assert value_discrepancies(october + november + [billed(T3, "9")], {"tokens": "carry"}) == [], (
        "a value not fixed yet is not judged"
    )
    [issue] = value_discrepancies(october[:2] + [fixed(T1, "0.4", "2")] + november, {"tokens": "carry"})
    assert (issue.kind, issue.window_start, issue.final_quantity, issue.billed_quantity) == (
        "values sent differ",
        datetime(2026, 10, 1),
        Decimal(1),
        Decimal(2),
    )
    assert "whole part, 1" in issue.detail
    rounded = [
        fixed(T1, "2.5", "3", meter="api_calls"),
        fixed(T2, "2.5", "2", meter="api_calls"),
        fixed(T3, "2.5", "2.5", meter="api_calls"),
    ]
    issues = value_discrepancies(rounded, {"api_calls": "half_up"})
    assert [(i.window_start, i.billed_quantity) for i in issues] == [(T2, Decimal(2)), (T3, Decimal("2.5"))]
    assert value_discrepancies([fixed(T1, "2.5", "2.5", meter="api_calls")], {"api_calls": "decimal"}) == []
    [exact] = value_discrepancies([fixed(T1, "2.5", "2", meter="api_calls")], {"api_calls": "exact"})
    assert "not a whole number" in exact.detail


def test_the_providers_monthly_totals_are_compared_with_the_values_sent():
    """A month whose provider total is the sum of the values sent agrees; any other total is a difference, either way."""
    from billing.reconcile import SentGroup, provider_differences

    month, sent_at = datetime(2026, 11, 1), datetime(2026, 11, 30, 12, 0)
    groups = [
        SentGroup("cus_1", "tokens", month, Decimal(12), 3, sent_at),
        SentGroup("cus_2", "tokens", month, Decimal(5), 1, sent_at),
        SentGroup("cus_3", "tokens", month, Decimal(7), 2, sent_at),
    ]
    totals = {
        ("cus_1", "tokens", month): Decimal(12),
        ("cus_2", "tokens", month): Decimal(6),
        ("cus_3", "tokens", month): Decimal("6.5"),
    }
    found = provider_differences(groups, totals)
    assert [(d.provider_customer_id, d.sent, d.provider_total) for d in found] == [
        ("cus_2", Decimal(5), Decimal(6)),
        ("cus_3", Decimal(7), Decimal("6.5")),
    ]
    assert found[0].detail == "the provider holds 6 for 2026-11, the ledger sent 5"


def test_a_provider_summary_covers_the_month_or_up_to_now():
    """A past month whole; the running month to the minute after now + the events' allowed lead."""
    from datetime import UTC

    from billing.reconcile import summary_bounds

    november, december = datetime(2026, 11, 1), datetime(2026, 12, 1)
    now = datetime(2026, 12, 6, 10, 0, 30, tzinfo=UTC)
    assert summary_bounds(november, now, 300) == (
        int(datetime(2026, 11, 1, tzinfo=UTC).timestamp()),
        int(datetime(2026, 12, 1, tzinfo=UTC).timestamp()),
    )
    start, end = summary_bounds(december, now, 300)
    assert (start, end) == (
        int(datetime(2026, 12, 1, tzinfo=UTC).timestamp()),
        int(datetime(2026, 12, 6, 10, 6, tzinfo=UTC).timestamp()),
    )
    assert end % 60 == 0


def test_a_customer_moved_at_a_month_boundary_is_reconciled_per_destination():
    """October at Stripe, November at Metronome: each month agrees at its own destination; a window
    whose correction is owed is reported at the destination that billed it."""
    from dataclasses import replace

    finals = [final(T1, "1.5"), final(T2, "2"), final(T3, "3")]
    ledger = [
        billed(T1, "1.5"),
        replace(billed(T2, "2"), destination="metronome"),
        replace(billed(T3, "4"), destination="metronome"),
        LedgerWindow(
            "t1",
            "c1",
            "tokens",
            "{}",
            T3,
            T3 + MINUTE,
            Decimal(-1),
            "dead",
            "owed: metronome ...",
            "correction",
            2,
            destination="metronome",
        ),
    ]
    totals, issues = reconcile(finals, ledger)
    assert [(t.destination, t.period, t.final_quantity, t.billed_quantity) for t in totals] == [
        ("stripe", "2026-10", Decimal("1.5"), Decimal("1.5")),
        ("metronome", "2026-11", Decimal("5"), Decimal("6")),
    ]
    [owed] = issues
    assert (owed.kind, owed.destination, owed.window_start) == ("billed differently", "metronome", T3)
    assert "correction r2 -1 dead not accepted yet" in owed.detail


def test_carried_values_add_up_per_the_customers_own_period():
    """An anniversary customer's fraction carried across a calendar month's end, within its period, is no discrepancy."""
    from billing.reconcile import value_discrepancies
    from meterflow.billing_cycle import BillingCycle

    def fixed(start: datetime, quantity: str, value: str) -> LedgerWindow:
        return LedgerWindow(
            "t1", "c1", "tokens", "{}", start, start + MINUTE, Decimal(quantity), "sent", None, value=value
        )

    across = [fixed(datetime(2026, 11, 30, 22), "0.6", "0"), fixed(datetime(2026, 12, 1), "0.6", "1")]
    cycles = {("t1", "c1"): BillingCycle(15, "Europe/Paris")}
    assert value_discrepancies(across, {"tokens": "carry"}, cycles) == []
    [issue] = value_discrepancies(across, {"tokens": "carry"})
    assert issue.window_start == datetime(2026, 12, 1) and issue.window_end == datetime(2027, 1, 1)
