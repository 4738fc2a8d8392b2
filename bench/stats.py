"""Pure figures from measurements: throughput, CPU per event, percentiles, freshness latencies, targets."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple


class Sample(NamedTuple):
    """One observation during a run: wall time, records consumed so far, cumulative CPU seconds, RSS."""

    t: float
    consumed: int
    cpu_s: float
    rss_bytes: int
    other_cpu_s: float = 0.0


@dataclass(frozen=True)
class Throughput:
    """Figures over the consumption window (first sample with progress to the first one at the total)."""

    events: int
    seconds: float
    events_per_s: float
    cpu_s: float
    cpu_s_per_million: float
    peak_rss_bytes: int
    other_cpu_s_per_million: float


def consumption_window(samples: Sequence[Sample], total: int) -> tuple[Sample, Sample] | None:
    """The first sample that shows progress and the first that shows ``total`` consumed (None if never)."""
    first = next((s for s in samples if s.consumed > 0), None)
    last = next((s for s in samples if s.consumed >= total), None)
    if first is None or last is None or last.t <= first.t:
        return None
    return first, last


def _between(samples: Sequence[Sample], first: Sample, last: Sample) -> Throughput:
    events = last.consumed - first.consumed
    seconds = last.t - first.t
    cpu = last.cpu_s - first.cpu_s
    other = last.other_cpu_s - first.other_cpu_s
    inside = [s for s in samples if first.t <= s.t <= last.t]
    per_million = 1e6 / events if events else math.nan
    return Throughput(
        events, seconds, events / seconds, cpu, cpu * per_million, max(s.rss_bytes for s in inside), other * per_million
    )


def throughput(samples: Sequence[Sample], total: int) -> Throughput | None:
    """Events/s, CPU s per million events and peak RSS between the first and last consumption samples.

    Startup (before the first record) is excluded; events counted are those consumed inside the
    window, so a first sample that already shows progress does not inflate the rate.
    """
    window = consumption_window(samples, total)
    return None if window is None else _between(samples, *window)


def steady_throughput(samples: Sequence[Sample], total: int, from_share: float = 0.5) -> Throughput | None:
    """The same figures over the last part of the consumption only: from the first sample at
    ``from_share`` of ``total`` consumed to the first at ``total``.

    A short run spends much of its CPU compiling (the JIT compiles the SQL operators' generated
    code anew for every job); the later part is closer to the job as it runs for days.
    """
    window = consumption_window(samples, total)
    if window is None:
        return None
    middle = next(s for s in samples if s.consumed >= from_share * total)
    return None if middle.t >= window[1].t else _between(samples, middle, window[1])


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sequence."""
    if not values:
        msg = "percentile of no values"
        raise ValueError(msg)
    if not 0 <= q <= 100:
        msg = f"percentile must be in [0, 100], got {q}"
        raise ValueError(msg)
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def visibility_latencies(
    produced: Mapping[Hashable, Sequence[float]], polls: Iterable[tuple[float, Mapping[Hashable, int]]]
) -> tuple[list[float], int]:
    """Latency from produce time to first visibility of each event; and how many were never seen.

    ``produced[key]`` holds the produce times of a window row's events in send order; a poll at time
    ``t`` that shows the row with ``event_count >= i`` makes its first ``i`` events visible at ``t``
    (an upper bound, within one poll interval).
    """
    shown = dict.fromkeys(produced, 0)
    latencies: list[float] = []
    for t, counts in polls:
        for key, count in counts.items():
            times = produced.get(key)
            if times is None:
                continue
            upto = min(count, len(times))
            for i in range(shown[key], upto):
                latencies.append(t - times[i])
            shown[key] = max(shown[key], upto)
    never = sum(len(times) - shown[key] for key, times in produced.items())
    return latencies, never


@dataclass(frozen=True)
class Target:
    """A stated goal and whether this run met it."""

    name: str
    goal: str
    measured: str
    met: bool | None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is unknown or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b
