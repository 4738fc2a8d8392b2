"""Choosing ``event_time.watermark_delay`` and ``event_time.allowed_lateness`` from the data (pure).

The job's rule, replayed per Kafka partition in offset order: a partition's watermark is its highest
event time so far minus ``watermark_delay`` (the source's ``WATERMARK FOR event_time AS event_time -
delay``), and an event is late once the watermark has reached its window's end - 1 ms +
``allowed_lateness`` (meterflow.windowing, the twin of jvm/ WindowClose). So an event is counted on time
exactly when ``watermark_delay + allowed_lateness`` is at least its *need*::

    need = max(0, highest event time of its partition so far - (window end - 1 ms) + 1 ms)

and it is in its window's *first* result (not a re-fire within the allowed lateness) when
``watermark_delay`` alone covers its need. The job's real watermark is the minimum over the
partitions it reads, never above any one partition's: the replay is the pessimistic bound (it may
call an event late that the job counted, never the reverse). Events dated further ahead than
``event_time.max_event_ahead`` go to the dead letters and never raise the watermark: they are left
out, as the job leaves them out.

Freshness: a window's first result is visible ``watermark_delay`` after its end (in event time), its
final value (what is billed) ``watermark_delay + allowed_lateness`` after it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from meterflow.config_values import format_duration
from meterflow.windowing import window_fires_at_ms, window_start_ms


@dataclass(frozen=True)
class Sample:
    """One usage event as the scan read it: its partition, event time and Kafka timestamp (epoch ms)."""

    partition: int
    event_time_ms: int
    kafka_time_ms: int


@dataclass(frozen=True)
class Choice:
    """A setting and what it costs: the share of events counted on time, and how late windows are final."""

    label: str
    watermark_delay: timedelta
    allowed_lateness: timedelta
    on_time_share: float  # measured on the scanned events
    late_events: int
    refire_share: float  # events counted only through a re-fire within the allowed lateness

    @property
    def first_result_after(self) -> timedelta:
        """How long after a window's end (event time) its first result is visible."""
        return self.watermark_delay

    @property
    def final_after(self) -> timedelta:
        """How long after a window's end (event time) its value is final, and billed."""
        return self.watermark_delay + self.allowed_lateness


def replay_needs(samples: Iterable[Sample], window_size_ms: int, max_event_ahead_ms: int) -> list[int]:
    """Each counted event's need (ms of watermark_delay + allowed_lateness), replaying the watermark per partition in the given order."""
    highest: dict[int, int] = {}
    needs = []
    for s in samples:
        if s.event_time_ms > s.kafka_time_ms + max_event_ahead_ms:
            continue  # a dead letter: never counted, never raises the watermark
        top = max(highest.get(s.partition, s.event_time_ms), s.event_time_ms)
        highest[s.partition] = top
        end = window_start_ms(s.event_time_ms, window_size_ms) + window_size_ms
        needs.append(max(0, top - window_fires_at_ms(end) + 1))
    return needs


def quantile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank quantile of an ascending sequence (the smallest value with at least q of them at or below it)."""
    if not sorted_values:
        msg = "quantile of no values"
        raise ValueError(msg)
    if not 0 < q <= 1:
        msg = f"quantile must be in (0, 1], got {q}"
        raise ValueError(msg)
    rank = math.ceil(round(q * len(sorted_values), 9))
    return sorted_values[max(rank, 1) - 1]


def evaluate(needs: Sequence[int], label: str, delay: timedelta, lateness: timedelta) -> Choice:
    """The share of these events a setting counts on time, and how many only through a re-fire."""
    if not needs:
        msg = "no events to evaluate"
        raise ValueError(msg)
    d, lat = _ms(delay), _ms(lateness)
    on_time = sum(1 for n in needs if n <= d + lat)
    refired = sum(1 for n in needs if d < n <= d + lat)
    return Choice(label, delay, lateness, on_time / len(needs), len(needs) - on_time, refired / len(needs))


def recommend(
    needs: Sequence[int], targets: Sequence[float], *, first_share: float = 0.99, step: timedelta = timedelta(seconds=1)
) -> list[Choice]:
    """For each target share of events counted on time, the settings that reach it on these events.

    ``watermark_delay + allowed_lateness`` is the target quantile of the needs; ``watermark_delay``
    alone covers ``first_share`` of them (or all of the sum when the target is lower), so most
    events are in their window's first result and the allowed lateness catches the stragglers.
    Both are rounded up to a multiple of ``step``.
    """
    ordered = sorted(needs)
    out = []
    for target in targets:
        total = _ceil(quantile(ordered, target), step)
        delay = min(total, _ceil(quantile(ordered, first_share), step))
        out.append(evaluate(ordered, f"{target:.2%}".replace(".00%", "%"), delay, total - delay))
    return out


def on_time_curve(needs: Sequence[int], points: int = 200) -> tuple[list[float], list[float]]:
    """(watermark_delay + allowed_lateness in seconds, share counted on time) at each distinct need, for a chart."""
    ordered = sorted(needs)
    n = len(ordered)
    xs, ys = [], []
    stride = max(1, n // points)
    for i in [*range(0, n, stride), n - 1]:
        # Share counted with exactly this need's setting: every event with a need at most it.
        j = i
        while j + 1 < n and ordered[j + 1] == ordered[i]:
            j += 1
        xs.append(ordered[i] / 1000)
        ys.append((j + 1) / n)
    return xs, ys


def write_chart(needs: Sequence[int], choices: Sequence[Choice], path: str) -> None:
    """A PNG of the share counted on time against watermark_delay + allowed_lateness, with each choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = on_time_curve(needs)
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    ax.step(xs, [y * 100 for y in ys], where="post", color="#4c72b0", label="share counted on time")
    for c, color in zip(choices, ("#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"), strict=False):
        ax.axvline(
            c.final_after.total_seconds(),
            color=color,
            linestyle="--",
            label=f"{c.label}: final after {_fmt(c.final_after)} (delay {_fmt(c.watermark_delay)} + lateness {_fmt(c.allowed_lateness)}), {c.on_time_share:.3%}",
        )
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)  # a duration: no negative ticks
    ax.set_xlabel("watermark_delay + allowed_lateness (s) = how long after its end a window is final")
    ax.set_ylabel("events counted on time (%)")
    ax.set_ylim(max(0, min(ys) * 100 - 5), 100.5)
    ax.set_title(f"Lateness of {len(needs)} events, replayed per partition")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _ms(d: timedelta) -> int:
    return int(d / timedelta(milliseconds=1))


def _ceil(ms: int, step: timedelta) -> timedelta:
    s = _ms(step)
    return timedelta(milliseconds=-(-ms // s) * s)


def _fmt(d: timedelta) -> str:
    return format_duration(d)
