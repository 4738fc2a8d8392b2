"""Whole-number values with the fraction carried, and the provider's value rules (billing/whole_values.py)."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billing.whole_values import STRIPE_DECIMALS, STRIPE_WHOLE, billing_period_start, carried_value, value_refusal


@pytest.mark.parametrize(
    ("before", "quantity", "value"),
    [
        ("0", "0.4", "0"),
        ("0.4", "0.599999999", "0"),  # one nano below the unit
        ("0.4", "0.6", "1"),  # exactly at it
        ("0.999999999", "0.000000001", "1"),
        ("12.5", "2.5", "3"),
        ("0", "7", "7"),
        ("3.2", "-0.3", "-1"),  # 2.9: the unit billed is taken back
        ("3.2", "-0.2", "0"),  # back to exactly 3: 3 billed still
        ("3.2", "-0.200000001", "-1"),  # one nano below 3
        ("-0.5", "0.5", "1"),
    ],
)
def test_carried_value_at_the_unit_boundary(before, quantity, value):
    assert carried_value(Decimal(before), Decimal(quantity)) == Decimal(value)


def test_a_month_of_fractions_bills_the_whole_part_never_more():
    """Values sent add up to floor(exact total) after every delivery: never above it, less by under one unit."""
    rng = random.Random(7)
    total, sent = Decimal(0), Decimal(0)
    for _ in range(43_200):  # a 30-day month of 1-minute windows, some corrections down
        quantity = Decimal(rng.randint(-2_000, 500_000)).scaleb(-3)
        sent += carried_value(total, quantity)
        total += quantity
        assert sent <= total < sent + 1
        assert sent == sent.to_integral_value()


def test_the_billing_period_is_the_utc_month_of_the_window():
    assert billing_period_start(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)) == datetime(2026, 12, 1, tzinfo=UTC)
    assert billing_period_start(datetime(2027, 1, 1, tzinfo=UTC)) == datetime(2027, 1, 1, tzinfo=UTC)
    assert billing_period_start(datetime(2026, 12, 5, 12)) == datetime(2026, 12, 1, tzinfo=UTC), "naive times are UTC"


@pytest.mark.parametrize(
    ("value", "rules", "refused"),
    [
        ("12", STRIPE_WHOLE, None),
        ("-3", STRIPE_WHOLE, None),
        ("0", STRIPE_WHOLE, None),
        ("12.5", STRIPE_WHOLE, "is not a whole number"),
        ("0.000000001", STRIPE_WHOLE, "is not a whole number"),
        ("12.5", STRIPE_DECIMALS, None),
        ("123456789012345", STRIPE_DECIMALS, None),  # 15 significant digits: at the limit
        ("1234567890123456", STRIPE_DECIMALS, "16 significant digits"),  # one past
        ("0.123456789012345", STRIPE_DECIMALS, None),
        ("1.23456789012345E+20", STRIPE_DECIMALS, None),
        ("NaN", STRIPE_DECIMALS, "is not a number"),
        ("twelve", STRIPE_WHOLE, "is not a number"),
    ],
)
def test_stripe_value_rules(value, rules, refused):
    reason = value_refusal(value, rules)
    assert (reason is None) if refused is None else (reason is not None and refused in reason), reason
