"""Window math matches Flink's TUMBLE: epoch-aligned, end exclusive, closes at end - 1 ms + lateness."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobs.windowing import is_window_closed, window_bounds, window_fires_at_ms, window_start_ms


@pytest.mark.parametrize(
    ("ts", "size", "start"),
    [(0, 60_000, 0), (59_999, 60_000, 0), (60_000, 60_000, 60_000), (125_000, 60_000, 120_000), (1_700_000_000_123, 3_600_000, 1_699_999_200_000)],
)
def test_window_start(ts, size, start):
    """Windows start at multiples of the size since the epoch."""
    assert window_start_ms(ts, size) == start


def test_window_size_must_be_positive():
    """A zero size is refused."""
    with pytest.raises(ValueError, match="positive"):
        window_start_ms(1, 0)


def test_window_bounds_are_utc_and_end_exclusive():
    """The last millisecond belongs to the window; the end belongs to the next."""
    size = timedelta(minutes=1)
    last = datetime(2026, 3, 1, 10, 0, 59, 999000, tzinfo=UTC)
    assert window_bounds(last, size) == (datetime(2026, 3, 1, 10, 0, tzinfo=UTC), datetime(2026, 3, 1, 10, 1, tzinfo=UTC))
    assert window_bounds(last + timedelta(milliseconds=1), size)[0] == datetime(2026, 3, 1, 10, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("end", "watermark", "lateness", "closed"),
    [(60_000, 59_998, 0, False), (60_000, 59_999, 0, True), (60_000, 89_998, 30_000, False), (60_000, 89_999, 30_000, True)],
)
def test_window_closes_at_end_minus_one_plus_lateness(end, watermark, lateness, closed):
    """A window is final once the watermark reaches end - 1 ms + allowed lateness."""
    assert window_fires_at_ms(end, lateness) == end - 1 + lateness
    assert is_window_closed(end, watermark, lateness) is closed
