"""Pure tumbling event-time window math, matching Flink's TUMBLE (epoch-aligned, UTC, end exclusive), the
close rule, and the time range a billing provider accepts a window's events in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from meterflow.config_values import format_duration


def window_start_ms(event_time_ms: int, size_ms: int) -> int:
    """Start of the tumbling window containing ``event_time_ms`` (floor to a multiple of the size)."""
    if size_ms <= 0:
        msg = f"window size must be positive, got {size_ms}"
        raise ValueError(msg)
    return event_time_ms - (event_time_ms % size_ms)


def window_bounds(event_time: datetime, size: timedelta) -> tuple[datetime, datetime]:
    """[start, end) of the window containing ``event_time`` (an aware datetime), as aware UTC datetimes."""
    size_ms = int(size / timedelta(milliseconds=1))
    ms = int(event_time.timestamp() * 1000)
    start = window_start_ms(ms, size_ms)
    return datetime.fromtimestamp(start / 1000, UTC), datetime.fromtimestamp((start + size_ms) / 1000, UTC)


def window_fires_at_ms(window_end_ms: int, allowed_lateness_ms: int = 0) -> int:
    """Watermark at which a window is final: Flink keeps it until watermark >= end - 1 ms + lateness."""
    return window_end_ms - 1 + allowed_lateness_ms


def is_window_closed(window_end_ms: int, watermark_ms: int, allowed_lateness_ms: int = 0) -> bool:
    """Whether a window can no longer change at this watermark."""
    return watermark_ms >= window_fires_at_ms(window_end_ms, allowed_lateness_ms)


def closed_through_ms(previous: int | None, watermark_ms: int | None, allowed_lateness_ms: int) -> int | None:
    """The highest window end judged closed so far, after a watermark under the lateness in force now.

    A window closes at watermark >= end - 1 ms + lateness, so at this watermark every window ending at
    or before watermark - lateness + 1 ms is closed. Kept across restores (jvm/ LatenessClassifier), it
    keeps a window closed before a savepoint closed after one, whatever the new allowed lateness.
    ``None``: no watermark yet, nothing closed. Twin of jvm/ ``WindowClose.closedThrough``.
    """
    if watermark_ms is None:
        return previous
    now = watermark_ms - allowed_lateness_ms + 1
    return now if previous is None else max(previous, now)


def is_late(window_end_ms: int, allowed_lateness_ms: int, watermark_ms: int | None, closed_through: int | None) -> bool:
    """An event is late iff its window is closed under the current lateness or was closed before (end <= closed-through).

    Twin of jvm/ ``WindowClose.isLate(end, lateness, watermark, closedThrough)``.
    """
    if watermark_ms is not None and is_window_closed(window_end_ms, watermark_ms, allowed_lateness_ms):
        return True
    return closed_through is not None and window_end_ms <= closed_through


def is_late_after(history: list[tuple[int, int | None]], window_end_ms: int) -> bool:
    """The decision after a history of (allowed lateness, watermark) steps, a config change between any two.

    The watermark held is the highest seen (a live one below it changes nothing), as the classifier holds it.
    """
    held: int | None = None
    closed: int | None = None
    lateness = 0
    for lateness, watermark in history:
        if watermark is not None:
            held = watermark if held is None else max(held, watermark)
        closed = closed_through_ms(closed, held, lateness)
    return is_late(window_end_ms, lateness, held, closed)


def outside_provider_window(
    window_start: datetime,
    now: datetime,
    max_age: timedelta = timedelta(days=35),
    max_ahead: timedelta = timedelta(minutes=5),
) -> str | None:
    """Why the provider would refuse the meter events of a window, or None.

    A window's events, its own and its corrections', are timestamped at the window's start
    (billing/deliveries.py ``build_meter_event``), so that is what the provider's range is checked on,
    by billing and by corrections alike.
    """
    if window_start.tzinfo is None:
        window_start = window_start.replace(tzinfo=UTC)
    if window_start < now - max_age:
        return f"window started {window_start.isoformat()}, more than {format_duration(max_age)} ago: the provider no longer accepts it"
    if window_start > now + max_ahead:
        return f"window starts {window_start.isoformat()}, in the future"
    return None
