"""Window math matches Flink's TUMBLE: epoch-aligned, end exclusive, closes at end - 1 ms + lateness.

The lateness rule across config changes (``LATENESS_CASES``) is the parity check with the JVM: it
is written to jvm/src/test/resources/lateness_rule_cases.json, which this module checks against the
table and the Java WindowCloseTest evaluates with ``WindowClose``. After changing the table, rewrite
the file with ``.venv/bin/python -m tests.unit.test_windowing``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from meterflow.windowing import (
    closed_through_ms,
    is_late,
    is_late_after,
    is_window_closed,
    window_bounds,
    window_fires_at_ms,
    window_start_ms,
)
from tests.conftest import REPO_ROOT

FIXTURE = REPO_ROOT / "jvm" / "src" / "test" / "resources" / "lateness_rule_cases.json"


@pytest.mark.parametrize(
    ("ts", "size", "start"),
    [
        (0, 60_000, 0),
        (59_999, 60_000, 0),
        (60_000, 60_000, 60_000),
        (125_000, 60_000, 120_000),
        (1_700_000_000_123, 3_600_000, 1_699_999_200_000),
    ],
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
    assert window_bounds(last, size) == (
        datetime(2026, 3, 1, 10, 0, tzinfo=UTC),
        datetime(2026, 3, 1, 10, 1, tzinfo=UTC),
    )
    assert window_bounds(last + timedelta(milliseconds=1), size)[0] == datetime(2026, 3, 1, 10, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("end", "watermark", "lateness", "closed"),
    [
        (60_000, 59_998, 0, False),
        (60_000, 59_999, 0, True),
        (60_000, 89_998, 30_000, False),
        (60_000, 89_999, 30_000, True),
    ],
)
def test_window_closes_at_end_minus_one_plus_lateness(end, watermark, lateness, closed):
    """A window is final once the watermark reaches end - 1 ms + allowed lateness."""
    assert window_fires_at_ms(end, lateness) == end - 1 + lateness
    assert is_window_closed(end, watermark, lateness) is closed


# (what it shows, [(allowed lateness ms, watermark ms or None), ...] with a config change between any
# two steps, window end ms, late). 10 s windows; W1 = [10 s, 20 s) closes at 29.999 s under 10 s lateness.
LATENESS_CASES: list[tuple[str, list[tuple[int, int | None]], int, bool]] = [
    ("no watermark: on time", [(10_000, None)], 20_000, False),
    ("no watermark across a change: on time", [(10_000, None), (30_000, None)], 20_000, False),
    ("unchanged: exactly at end - 1 ms + lateness", [(10_000, 29_999)], 20_000, True),
    ("unchanged: one ms before", [(10_000, 29_998)], 20_000, False),
    (
        "raised: a window closed before stays closed (end = closed-through)",
        [(10_000, 29_999), (30_000, 29_999)],
        20_000,
        True,
    ),
    ("raised: an older closed window stays closed", [(10_000, 29_999), (30_000, 29_999)], 10_000, True),
    ("raised: one ms short of closing before, open after", [(10_000, 29_998), (30_000, 29_998)], 20_000, False),
    ("raised: a window open before is open longer", [(10_000, 29_999), (30_000, 45_000)], 30_000, False),
    ("raised: it closes at end - 1 ms + the new lateness", [(10_000, 29_999), (30_000, 59_999)], 30_000, True),
    ("raised: one ms before that", [(10_000, 29_999), (30_000, 59_998)], 30_000, False),
    (
        "raised: a window the old lateness would have closed is open",
        [(10_000, 29_999), (30_000, 59_999)],
        40_000,
        False,
    ),
    ("raised twice: the first boundary holds", [(10_000, 29_999), (30_000, 45_000), (60_000, 45_000)], 20_000, True),
    (
        "lowered: a window open before is closed at once, exactly at the new boundary",
        [(10_000, 29_999), (0, 29_999)],
        30_000,
        True,
    ),
    ("lowered: one ms before the new boundary", [(10_000, 29_998), (0, 29_998)], 30_000, False),
    ("lowered: the next window is open", [(10_000, 29_999), (0, 29_999)], 40_000, False),
    (
        "lowered then raised: what the low lateness closed stays closed",
        [(10_000, 29_999), (0, 35_000), (30_000, 35_000)],
        30_000,
        True,
    ),
    ("lowered then raised: a later window is open", [(10_000, 29_999), (0, 35_000), (30_000, 35_000)], 40_000, False),
    ("a live watermark below the held one changes nothing", [(10_000, 29_999), (30_000, 10_000)], 20_000, True),
]


def fixture_text() -> str:
    """The case table as the Java test reads it."""
    rows = [
        {
            "name": name,
            "history": [
                {"allowed_lateness_ms": lateness, "watermark_ms": watermark} for lateness, watermark in history
            ],
            "window_end_ms": end,
            "late": late,
        }
        for name, history, end, late in LATENESS_CASES
    ]
    return json.dumps(rows, indent=1) + "\n"


@pytest.mark.parametrize(("name", "history", "end", "late"), LATENESS_CASES, ids=[c[0] for c in LATENESS_CASES])
def test_lateness_rule_across_config_changes(name, history, end, late):
    """A window closed before a config change stays closed after it; the current lateness closes the rest."""
    assert is_late_after(history, end) is late, name


def test_the_committed_lateness_fixture_is_the_table():
    """The Java test reads what this table makes today (rewrite it with `python -m tests.unit.test_windowing`)."""
    assert FIXTURE.read_text() == fixture_text()


def test_closed_through_is_the_highest_end_closed():
    """end - 1 ms + lateness <= watermark iff end <= watermark - lateness + 1 ms; it never goes down."""
    assert closed_through_ms(None, None, 10_000) is None
    assert closed_through_ms(None, 29_999, 10_000) == 20_000
    assert is_window_closed(20_000, 29_999, 10_000) and not is_window_closed(20_001, 29_999, 10_000)
    assert closed_through_ms(20_000, 29_999, 30_000) == 20_000
    assert closed_through_ms(20_000, 59_999, 30_000) == 30_000
    assert is_late(20_000, 30_000, 29_999, 20_000) and not is_late(20_001, 30_000, 29_999, 20_000)


if __name__ == "__main__":
    FIXTURE.write_text(fixture_text())
    print(f"wrote {len(LATENESS_CASES)} cases to {FIXTURE}")
