"""Pure tumbling event-time window math, matching Flink's TUMBLE (epoch-aligned, UTC, end exclusive)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


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
