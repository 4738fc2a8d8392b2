"""meterflow tune's core: the per-partition watermark replay, and recommendations that reach their targets."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from meterflow.tune import (
    Sample,
    evaluate,
    on_time_curve,
    quantile,
    recommend,
    replay_needs,
    write_chart,
)
from meterflow.windowing import is_window_closed

SIZE = 10_000  # window size, ms
AHEAD = 300_000
T0 = 1_700_000_000_000  # a window start


def _samples(partition: int, times: list[int]) -> list[Sample]:
    return [Sample(partition, t, t) for t in times]


def _late_by_simulation(samples: list[Sample], delay_ms: int, lateness_ms: int) -> int:
    """Late events by the job's rule itself: per partition, watermark = highest event time so far - delay."""
    highest: dict[int, int] = {}
    late = 0
    for s in samples:
        if s.event_time_ms > s.kafka_time_ms + AHEAD:
            continue
        highest[s.partition] = max(highest.get(s.partition, s.event_time_ms), s.event_time_ms)
        end = s.event_time_ms - s.event_time_ms % SIZE + SIZE
        late += is_window_closed(end, highest[s.partition] - delay_ms, lateness_ms)
    return late


def test_need_at_the_window_boundary():
    """An event of window [T0, T0+10s) after its partition reached T0+10s-1ms+x needs x+1 ms."""
    needs = replay_needs(_samples(0, [T0 + 5_000, T0 + 12_000, T0 + 1_000, T0 + 9_999]), SIZE, AHEAD)
    assert needs == [0, 0, 12_000 - 9_999 + 1, 12_000 - 9_999 + 1]


def test_partitions_have_their_own_watermarks():
    """A partition far ahead does not make another partition's events late (the replay is per partition)."""
    samples = [Sample(0, T0 + 60_000, T0 + 60_000), Sample(1, T0 + 1_000, T0 + 1_000)]
    assert replay_needs(samples, SIZE, AHEAD) == [0, 0]


def test_events_dated_too_far_ahead_are_left_out_and_do_not_raise_the_watermark():
    samples = [Sample(0, T0 + 1_000_000, T0), Sample(0, T0 + 1_000, T0 + 1_000)]
    assert replay_needs(samples, SIZE, AHEAD) == [0]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_evaluate_agrees_with_the_close_rule(seed):
    """Late counts from the needs equal a direct replay of the close rule, for several settings."""
    rng = random.Random(seed)
    samples = []
    for p in range(3):
        times = [T0 + i * 100 for i in range(500)]
        samples += _samples(p, [t - (rng.expovariate(1 / 3_000) if rng.random() < 0.2 else 0) for t in times])
    samples = [Sample(s.partition, int(s.event_time_ms), int(s.kafka_time_ms)) for s in samples]
    needs = replay_needs(samples, SIZE, AHEAD)
    for delay, lateness in ((0, 0), (1_000, 0), (2_000, 3_000), (5_000, 10_000)):
        choice = evaluate(needs, "x", timedelta(milliseconds=delay), timedelta(milliseconds=lateness))
        assert choice.late_events == _late_by_simulation(samples, delay, lateness), (delay, lateness)


def test_quantile_is_nearest_rank():
    values = list(range(1, 10_001))
    assert quantile(values, 0.999) == 9_990
    assert quantile(values, 0.9999) == 9_999
    assert quantile(values, 1.0) == 10_000
    assert quantile([5], 0.5) == 5
    with pytest.raises(ValueError):
        quantile([], 0.5)
    with pytest.raises(ValueError):
        quantile(values, 0)


def test_recommendations_reach_their_targets_at_the_lowest_whole_second():
    # 10 000 events: 9 900 need nothing, 90 need up to 3 s, 9 need 20 s, one needs 2 minutes.
    needs = [0] * 9_900 + [(i % 3 + 1) * 1_000 for i in range(90)] + [20_000] * 9 + [120_000]
    wanted = recommend(needs, [0.999, 0.9999, 1.0], first_share=0.99)
    assert [c.label for c in wanted] == ["99.90%", "99.99%", "100%"]
    assert [(c.watermark_delay, c.allowed_lateness) for c in wanted] == [
        (timedelta(0), timedelta(seconds=3)),
        (timedelta(0), timedelta(seconds=20)),
        (timedelta(0), timedelta(minutes=2)),
    ]
    for c, target in zip(wanted, (0.999, 0.9999, 1.0), strict=True):
        assert c.on_time_share >= target
        # A second less would miss the target: the recommendation is the cheapest in whole seconds.
        cheaper = evaluate(needs, "", c.watermark_delay, c.allowed_lateness - timedelta(seconds=1))
        assert cheaper.on_time_share < target
        assert c.final_after == c.watermark_delay + c.allowed_lateness
    assert wanted[0].refire_share == pytest.approx(90 / 10_000)
    # With every event in the first result wanted, everything goes to the delay: no re-fires.
    (all_first,) = recommend(needs, [0.999], first_share=1.0)
    assert (all_first.watermark_delay, all_first.allowed_lateness, all_first.refire_share) == (
        timedelta(seconds=3),
        timedelta(0),
        0.0,
    )
    assert all_first.first_result_after == timedelta(seconds=3)


def test_curve_and_chart(tmp_path):
    needs = [0, 0, 1_000, 5_000]
    xs, ys = on_time_curve(needs)
    assert (xs[0], ys[0]) == (0.0, 0.5) and (xs[-1], ys[-1]) == (5.0, 1.0)
    path = tmp_path / "tune.png"
    write_chart(needs, recommend(needs, [0.75]), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
