"""Billing core: deterministic identifiers, value formatting, provider window, backoff, rate limit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from billing.identifiers import (
    MAX_IDENTIFIER_LENGTH,
    WindowKey,
    derive_identifier,
    format_meter_value,
)
from billing.retry import BackoffPolicy, TokenBucket
from meterflow.window_row import from_epoch_ms
from meterflow.windowing import outside_provider_window

KEY = WindowKey(
    "tenant-1", "cust-9", "tokens", "{}", from_epoch_ms(1_767_225_600_000), from_epoch_ms(1_767_225_660_000)
)


def test_an_identifier_is_the_one_the_provider_already_holds():
    """Identifiers are stored at the provider: the same window always derives these exact bytes,
    whatever form the window's times take in Python."""
    key = WindowKey("tenant-1", "cust-9", "tokens", '{"model":"a"}', datetime(2026, 1, 1), datetime(2026, 1, 1, 0, 1))
    assert derive_identifier(key) == "mf-1767225600000-1ee86abc83590d93d56a1cdde6d64803aa70b64c42ea43c8a5ed8540e9e30842"


def test_identifier_is_deterministic_and_short_enough():
    """Same window, same identifier; within the provider's 100 characters."""
    assert derive_identifier(KEY) == derive_identifier(WindowKey(**KEY.__dict__))
    assert len(derive_identifier(KEY)) <= MAX_IDENTIFIER_LENGTH
    assert derive_identifier(KEY).startswith("mf-1767225600000-")


@pytest.mark.parametrize(
    "other",
    [
        WindowKey(
            "tenant-1", "cust-9", "tokens", "{}", from_epoch_ms(1_767_225_660_000), from_epoch_ms(1_767_225_720_000)
        ),
        WindowKey(
            "tenant-1", "cust-9", "api_calls", "{}", from_epoch_ms(1_767_225_600_000), from_epoch_ms(1_767_225_660_000)
        ),
        WindowKey(
            "tenant-1",
            "cust-9",
            "tokens",
            '{"model":"a"}',
            from_epoch_ms(1_767_225_600_000),
            from_epoch_ms(1_767_225_660_000),
        ),
        WindowKey(
            "tenant-1c", "ust-9", "tokens", "{}", from_epoch_ms(1_767_225_600_000), from_epoch_ms(1_767_225_660_000)
        ),
        WindowKey(
            "tenant-1", "cust-9", "tokens", "{}", from_epoch_ms(1_767_225_600_000), from_epoch_ms(1_767_225_900_000)
        ),  # same start, 5 minutes
    ],
)
def test_identifier_differs_for_any_other_window(other):
    """Any change of the key or the span, including shifted concatenations, changes the identifier:
    a 5-minute window never shares the identifier of the 1-minute window that starts with it."""
    assert derive_identifier(other) != derive_identifier(KEY)


@pytest.mark.parametrize(
    ("quantity", "rounding", "value"),
    [
        (Decimal("12.000000000"), "exact", "12"),
        (Decimal("12.5"), "half_up", "13"),
        (Decimal("12.1"), "ceil", "13"),
        (Decimal("12.9"), "floor", "12"),
        (Decimal("0"), "exact", "0"),
        (Decimal("12.500000000"), "decimal", "12.5"),
        (Decimal("1E+3"), "decimal", "1000"),
        (Decimal("-0.000000100"), "decimal", "-0.0000001"),
        (Decimal("7.000"), "decimal", "7"),
    ],
)
def test_format_meter_value(quantity, rounding, value):
    """Provider values are exact decimal strings or whole numbers, rounded only as configured."""
    assert format_meter_value(quantity, rounding) == value


def test_exact_refuses_fractions():
    """A fractional quantity is never rounded silently."""
    with pytest.raises(ValueError, match="not a whole number"):
        format_meter_value(Decimal("1.5"))


def test_provider_window():
    """Windows older than 35 days or in the future are refused with a reason."""
    now = datetime(2026, 6, 1, tzinfo=UTC)
    assert outside_provider_window(now - timedelta(days=1), now) is None
    assert "more than 35d ago" in outside_provider_window(now - timedelta(days=36), now)
    assert "future" in outside_provider_window(now + timedelta(hours=1), now)


def test_backoff_grows_caps_and_gives_up():
    """Delays grow exponentially under full jitter, are capped, and stop after max attempts."""
    policy = BackoffPolicy(max_attempts=5, initial_delay=1, max_delay=6)
    assert [policy.next_delay(a, rng=lambda: 1.0) for a in range(1, 6)] == [1, 2, 4, 6, None]
    assert policy.next_delay(3, rng=lambda: 0.25) == 1.0


def test_backoff_honours_retry_after():
    """Retry-After is a lower bound (capped by max_delay)."""
    policy = BackoffPolicy(max_delay=10)
    assert policy.next_delay(1, retry_after=7, rng=lambda: 0.0) == 7
    assert policy.next_delay(1, retry_after=60, rng=lambda: 0.0) == 10


@pytest.mark.parametrize(
    ("status", "retry"), [(None, True), (429, True), (500, True), (503, True), (400, False), (401, False), (404, False)]
)
def test_retryable_statuses(status, retry):
    """Timeouts, 429 and 5xx retry; client errors are final (dead letter)."""
    assert BackoffPolicy().is_retryable(status) is retry


def test_token_bucket_limits_rate_without_sleeping():
    """A burst up to capacity, then one call per 1/rate seconds, driven by an injected clock."""
    now = [0.0]
    bucket = TokenBucket(rate=10, capacity=2, clock=lambda: now[0])
    assert [bucket.wait_time(), bucket.wait_time()] == [0.0, 0.0]
    assert bucket.wait_time() == pytest.approx(0.1)
    now[0] = 0.1
    assert bucket.wait_time() == 0.0


def test_rate_reservations_give_each_caller_its_own_slot():
    """A burst up to capacity, then one slot every 1/rate seconds, even when many callers reserve at once."""
    from billing.retry import RateReservations

    now = [0.0]
    limiter = RateReservations(rate=10, capacity=2, clock=lambda: now[0])
    assert [limiter.reserve() for _ in range(5)] == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.3])
    now[0] = 10.0
    assert limiter.reserve() == 0.0, "an idle limiter refills"


def test_correction_identifiers_are_deterministic_and_bounded():
    """Window identifier + revision; different revisions differ; never over 100 characters."""
    from billing.identifiers import derive_correction_identifier

    window_id = derive_identifier(KEY)
    assert derive_correction_identifier(window_id, 5) == f"{window_id}-r5" != derive_correction_identifier(window_id, 6)
    long_id = derive_identifier(KEY, "p" * 16)
    assert len(derive_correction_identifier(long_id, 10**12)) <= MAX_IDENTIFIER_LENGTH
    assert derive_correction_identifier(long_id, 10**12) == derive_correction_identifier(long_id, 10**12)


def test_a_carried_value_is_never_rounded_per_window():
    """carry: the value comes from the month's running total in the ledger; asked per window, the answer is a clear refusal."""
    with pytest.raises(ValueError, match="fixed by the ledger"):
        format_meter_value(Decimal("1.5"), "carry")


def test_billing_and_corrections_judge_a_window_by_the_timestamp_its_events_carry():
    """A day-long window that started 35 days and an hour ago and ended 34 days ago: its events carry
    its start, which the provider refuses, so billing refuses it and corrections report it alike."""
    from billing.deliveries import ClosedWindow, delivery_refusal, window_delivery
    from meterflow.config import CorrectionsConfig, MeterConfig
    from meterflow.corrections import WindowId, decide_status

    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    start = now - timedelta(days=35, hours=1)
    end = start + timedelta(days=1)
    closed = ClosedWindow.from_fields(
        ("t", "c", "tokens", "{}", int(start.timestamp() * 1000), int(end.timestamp() * 1000), Decimal(1), 1, 1)
    )
    refused = delivery_refusal(
        window_delivery(closed, "mf"),
        MeterConfig(name="tokens"),
        "cus_1",
        now,
        timedelta(days=35),
        timedelta(minutes=5),
    )
    status, reason = decide_status(
        Decimal(1),
        WindowId("t", "c", "tokens", "{}", start.replace(tzinfo=None), end.replace(tzinfo=None)),
        CorrectionsConfig(),
        now,
        timedelta(days=35),
        timedelta(minutes=5),
    )
    assert refused is not None and "more than 35d ago" in refused
    assert status == "reported" and refused in reason
