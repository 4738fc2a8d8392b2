"""Provider values (pure): the provider's value rules, and whole numbers that carry the fraction.

Stripe's meter events take whole numbers only (decimals only on accounts that asked for them, and
then at most 15 significant digits); negative values are allowed. Rounding each window on its own
bills up to one unit wrong per window, which adds up over a month. With ``billing_rounding: carry``
each delivery sends the whole units its quantity completes in the running total of its (customer,
meter, billing period):

    value = floor(total before + quantity) - floor(total before)

so the values sent in a period add up to floor(exact total): never more than the exact total, and
less by under one unit. The fraction below one unit is carried to the next delivery of the period.
The running total lives in the ledger (sinks/ledger_schema.py, ``carry_value_sql``), updated in the
transaction that fixes the delivery's value, in the order deliveries are first attempted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_FLOOR, Decimal, InvalidOperation


def carried_value(total_before: Decimal, quantity: Decimal) -> Decimal:
    """The whole value a delivery of ``quantity`` sends when ``total_before`` was claimed before it in its period."""
    after = total_before + quantity
    return after.to_integral_value(rounding=ROUND_FLOOR) - total_before.to_integral_value(rounding=ROUND_FLOOR)


def billing_period_start(window_start: datetime) -> datetime:
    """The billing period a window's usage is carried in: its calendar month, UTC."""
    at = window_start.astimezone(UTC) if window_start.tzinfo else window_start.replace(tzinfo=UTC)
    return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_period_start(period_start: datetime) -> datetime:
    """The start of the month after ``period_start`` (a month's start), in the same zone form."""
    return (
        period_start.replace(year=period_start.year + 1, month=1)
        if period_start.month == 12
        else period_start.replace(month=period_start.month + 1)
    )


@dataclass(frozen=True)
class ValueRules:
    """What a provider accepts as a meter event's value."""

    whole_numbers: bool
    max_significant_digits: int | None
    negative: bool


# Stripe v1 meter events (docs, "Record usage for billing with the API"); `decimals` is an account option.
STRIPE_WHOLE = ValueRules(whole_numbers=True, max_significant_digits=None, negative=True)
STRIPE_DECIMALS = ValueRules(whole_numbers=False, max_significant_digits=15, negative=True)


def value_refusal(value: str, rules: ValueRules) -> str | None:
    """Why the provider would refuse ``value``, or None."""
    try:
        number = Decimal(value)
    except InvalidOperation:
        return f"value {value!r} is not a number"
    if not number.is_finite():
        return f"value {value!r} is not a number"
    if rules.whole_numbers and number != number.to_integral_value():
        return f"value {value} is not a whole number, and the provider takes whole numbers only (billing_rounding: carry bills the whole part and carries the fraction)"
    digits = len(number.normalize().as_tuple().digits) if number else 1
    if rules.max_significant_digits is not None and digits > rules.max_significant_digits:
        return (
            f"value {value} has {digits} significant digits, the provider takes at most {rules.max_significant_digits}"
        )
    if not rules.negative and number < 0:
        return f"value {value} is negative, and the provider takes none"
    return None
