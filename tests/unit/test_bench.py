"""The benchmark's pure parts: data set, oracle, comparison, throughput and latency math, report."""

from __future__ import annotations

from decimal import Decimal

import pytest

from bench.dataset import (
    CLOSER_TENANT,
    DatasetSpec,
    Oracle,
    Record,
    closers,
    compare,
    decimal_to_nanos,
    generate,
    partition_of,
    to_usage_event,
)
from bench.produce import split_partitions
from bench.report import evaluate_targets, render_markdown
from bench.stats import Sample, percentile, steady_throughput, throughput, visibility_latencies

WINDOW = 60_000
SPEC = DatasetSpec(
    events=20_000,
    tenants=3,
    customers=7,
    duplicate_ratio=0.1,
    late_ratio=0.01,
    partitions=3,
    start_ms=1_700_000_000_000 - 1_700_000_000_000 % WINDOW,
    span_ms=1_800_000,
)


def _oracle(spec: DatasetSpec = SPEC) -> Oracle:
    oracle = Oracle(spec.partitions, spec.window_ms, watermark_delay_ms=5_000)
    for r in generate(spec):
        oracle.add(r)
    return oracle


def test_generate_is_deterministic_and_keeps_customers_on_one_partition():
    """Same spec, same records; every record sits on its customer's partition."""
    first, second = list(generate(SPEC)), list(generate(SPEC))
    assert first == second
    assert len(first) == SPEC.events
    assert all(r.partition == partition_of(r.tenant_id, r.customer_id, SPEC.partitions) for r in first)


def test_generate_mixes_duplicates_and_late_events_in_the_requested_shares():
    """Duplicates repeat an earlier record; late events are dated far behind their position."""
    records = list(generate(SPEC))
    ids = [r.event_id for r in records]
    duplicates = len(ids) - len(set(ids))
    assert 0.08 * SPEC.events < duplicates < 0.12 * SPEC.events
    behind = [
        j
        for j, r in enumerate(records)
        if r.event_time_ms < SPEC.start_ms + SPEC.span_ms * j // SPEC.events - SPEC.late_by_ms
    ]
    assert 0.005 * SPEC.events < len(behind) < 0.015 * SPEC.events
    # From the second window on, not only once the stream is late_by_ms old: a prefix has late events too.
    first_late_position = SPEC.span_ms * behind[0] // SPEC.events
    assert SPEC.late_from_windows * WINDOW <= first_late_position < SPEC.late_from_windows * WINDOW + 60_000
    assert records[behind[0]].event_time_ms < SPEC.start_ms


def test_oracle_fates_add_up_and_match_the_generated_kinds():
    """Every record is counted, a duplicate or late; the oracle's own watermark finds exactly the late ones."""
    oracle = _oracle()
    totals = oracle.totals()
    assert totals.counted + totals.duplicates + totals.late == SPEC.events
    records = list(generate(SPEC))
    assert totals.duplicates == len(records) - len({r.event_id for r in records})
    expected_late = sum(
        1
        for j, r in enumerate(records)
        if r.event_time_ms < SPEC.start_ms + SPEC.span_ms * j // SPEC.events - SPEC.late_by_ms
    )
    assert totals.late == expected_late
    assert sum(count for _, count in totals.windows.values()) == totals.counted


def test_oracle_sums_exact_integers_per_window():
    """Quantities add up exactly (1e-9 units) per (tenant, customer, meter, window)."""
    oracle = Oracle(partitions=1, window_ms=WINDOW, watermark_delay_ms=0)
    oracle.add(Record("a", "t", "c", "tokens", 100_000_001, 5, 0))
    oracle.add(Record("b", "t", "c", "tokens", 200_000_002, 59_999, 0))
    oracle.add(Record("b", "t", "c", "tokens", 999, 59_999, 0))  # duplicate id: ignored
    oracle.add(Record("c", "t", "c", "tokens", 7, 60_000, 0))
    assert oracle.totals().windows == {("t", "c", "tokens", 0): (300_000_003, 2), ("t", "c", "tokens", 60_000): (7, 1)}


def test_oracle_classifies_late_only_after_every_partition_passed_the_window():
    """Late iff min over partitions of (max time - delay) >= window end - 1 + lateness."""
    oracle = Oracle(partitions=2, window_ms=WINDOW, watermark_delay_ms=1_000, allowed_lateness_ms=0)
    oracle.add(Record("x", "t", "c", "api_calls", 1, 200_000, 0))
    assert oracle.add(Record("old1", "t", "c", "api_calls", 1, 10, 0)) == "counted"  # partition 1 unseen: no watermark
    oracle.add(Record("y", "t", "d", "api_calls", 1, 200_000, 1))
    assert oracle.add(Record("old2", "t", "c", "api_calls", 1, 10, 0)) == "late"
    assert oracle.add(Record("edge", "t", "c", "api_calls", 1, 180_000, 0)) == "counted"


def test_closers_are_counted_but_not_in_the_windows():
    """Watermark closers land one per partition and never in the expected windows."""
    oracle = Oracle(partitions=3, window_ms=WINDOW, watermark_delay_ms=0)
    cs = closers(10**12, 3)
    assert sorted(c.partition for c in cs) == [0, 1, 2]
    for c in cs:
        assert oracle.add(c) == "counted"
    assert oracle.totals().windows == {}
    assert all(c.tenant_id == CLOSER_TENANT for c in cs)


def test_to_usage_event_keeps_quantity_and_time_exact():
    """The Avro-level event carries the exact decimal and millisecond time."""
    e = to_usage_event(Record("i", "t", "c", "tokens", 123_456_789_001, 1_700_000_000_123, 0))
    assert e["quantity"] == Decimal("123.456789001")
    assert round(e["event_time"].timestamp() * 1000) == 1_700_000_000_123
    assert decimal_to_nanos(e["quantity"]) == 123_456_789_001


def test_decimal_to_nanos_refuses_finer_values():
    """A value that is not a whole number of 1e-9 units is an error, never rounded."""
    with pytest.raises(ValueError):
        decimal_to_nanos(Decimal("0.0000000001"))


def test_compare_reports_each_kind_of_difference():
    """Missing, unexpected and different windows are counted separately."""
    expected = {("t", "c", "m", 0): (1, 1), ("t", "c", "m", 1): (2, 1), ("t", "c", "m", 2): (3, 1)}
    actual = {("t", "c", "m", 0): (1, 1), ("t", "c", "m", 1): (2, 2), ("t", "c", "m", 9): (3, 1)}
    c = compare(expected, actual)
    assert (c.missing, c.unexpected, c.different, c.exact) == (1, 1, 1, False)
    assert compare(expected, dict(expected)).exact


def test_throughput_excludes_startup_and_uses_consumed_difference():
    """Rate is measured from the first sample with progress to the first at the total."""
    samples = [
        Sample(0, 0, 0.0, 100),
        Sample(10, 0, 5.0, 100),
        Sample(11, 1_000, 6.0, 300),
        Sample(13, 5_000, 8.0, 200),
        Sample(14, 5_000, 9.0, 900),
    ]
    t = throughput(samples, 5_000)
    assert t is not None
    assert t.events == 4_000 and t.seconds == 2
    assert t.events_per_s == 2_000
    assert t.cpu_s == 2.0 and t.cpu_s_per_million == pytest.approx(500)
    assert t.peak_rss_bytes == 300


def test_throughput_is_none_when_the_total_was_never_reached():
    """An unfinished run has no rate."""
    assert throughput([Sample(0, 10, 0, 0), Sample(1, 20, 0, 0)], 100) is None


def test_steady_throughput_starts_at_half_the_total():
    """The second half alone: a slow, CPU-heavy start (JIT compilation) does not count."""
    samples = [
        Sample(0, 0, 0.0, 1),
        Sample(1, 1_000, 4.0, 1),
        Sample(2, 2_000, 8.0, 1),
        Sample(3, 6_000, 10.0, 5),
        Sample(4, 10_000, 12.0, 2),
    ]
    whole, steady = throughput(samples, 10_000), steady_throughput(samples, 10_000)
    assert whole is not None and steady is not None
    assert whole.events_per_s == 3_000
    assert (steady.events, steady.seconds, steady.events_per_s) == (
        4_000,
        1,
        4_000,
    )  # from 6,000 (first sample at >= 5,000)
    assert steady.cpu_s_per_million == pytest.approx(500)
    assert steady.peak_rss_bytes == 5
    assert steady_throughput(samples[:3], 10_000) is None


@pytest.mark.parametrize(("q", "expected"), [(0, 1), (50, 5), (90, 9), (99, 10), (100, 10)])
def test_percentile_nearest_rank(q, expected):
    """Nearest-rank percentiles of 1..10."""
    assert percentile(list(range(10, 0, -1)), q) == expected


def test_visibility_latencies_use_first_poll_reaching_each_index():
    """An event is visible at the first poll whose count reaches its position in the window."""
    produced = {"w1": [0.0, 0.5, 1.0], "w2": [0.2]}
    polls = [(0.8, {"w1": 1}), (1.1, {"w1": 2, "w2": 1}), (2.0, {"w1": 2})]
    latencies, never = visibility_latencies(produced, polls)
    assert sorted(latencies) == pytest.approx(sorted([0.8, 0.6, 0.9]))
    assert never == 1


def test_split_partitions_covers_each_partition_once():
    """Producer shares are disjoint and complete."""
    shares = split_partitions(5, 2)
    assert sorted(p for s in shares for p in s) == [0, 1, 2, 3, 4]
    assert split_partitions(1, 2) == [(0,)]


def _results(
    mf1: float, a: float, b: float, ceiling: float, p99: float, correct: bool = True, cpu: float = 10.0
) -> dict:
    comparison = {
        "expected_windows": 10,
        "actual_windows": 10,
        "missing": 0,
        "unexpected": 0,
        "different": 0 if correct else 2,
        "examples": [],
    }

    def entry(name, p, rate, checked=True):
        return {
            "name": name,
            "parallelism": p,
            "records": 1000,
            "events_per_s": rate,
            "cpu_s_per_million": cpu,
            "correct": (correct if name == "meterflow" else True) if checked else None,
            "comparison": comparison,
        }

    return {
        "run": {"started": "now", "command": "bench/run", "duration_s": 60},
        "machine": {"cpu_model": "cpu", "nproc": 2, "memory_gib": 1.0, "os": "Linux", "versions": {"Flink": "2.3.0"}},
        "dataset": {
            "records": 1000,
            "unique": 900,
            "duplicates": 90,
            "late": 7,
            "closers": 3,
            "windows": 10,
            "partitions": 3,
            "tenants": 1,
            "customers": 1,
            "meters": 2,
            "span_s": 600,
            "window_s": 60,
            "late_by_s": 600,
            "produce_s": 2,
        },
        "pipelines": [
            entry("ceiling", 1, ceiling, False),
            entry("meterflow", 1, mf1),
            entry("baseline A", 1, a),
            entry("baseline B", 1, b),
        ],
        "freshness": {
            "p50_s": p99 / 2,
            "p90_s": p99,
            "p99_s": p99,
            "max_s": p99,
            "visible": 100,
            "never_visible": 0,
            "events": 100,
            "parallelism": 1,
            "early_fire": "1s",
            "rate": 100.0,
            "seconds": 1.0,
            "achieved_rate": 100.0,
            "poll_interval_s": 0.1,
            "mean_poll_s": 0.01,
            "workers": 2,
        },
    }


def test_targets_follow_the_measured_figures():
    """Each target is judged from the run's own numbers."""
    met = {t.name: t.met for t in evaluate_targets(_results(mf1=120_000, a=10_000, b=5_000, ceiling=300_000, p99=1.5))}
    assert all(met.values())
    missed = {
        t.name: t.met
        for t in evaluate_targets(
            _results(mf1=40_000, a=10_000, b=4_000, ceiling=400_000, p99=6.5, correct=False, cpu=12.5)
        )
    }
    assert missed["throughput per task slot (steady)"] is False
    assert missed["CPU per million events (p=1, steady)"] is False
    assert missed["vs baseline A (p=1, steady)"] is False
    assert missed["vs baseline B (p=1, steady)"] is True
    assert missed["ceiling / meterflow (p=1, steady)"] is False
    assert missed["freshness p99 (early firing)"] is False
    assert missed["exact totals"] is False
    baseline_off = _results(mf1=120_000, a=10_000, b=5_000, ceiling=300_000, p99=1.5)
    baseline_off["pipelines"][2]["correct"] = False  # a baseline's own mismatch is not meterflow's target
    assert {t.name: t.met for t in evaluate_targets(baseline_off)}["exact totals"] is True


def test_targets_take_the_steady_state_and_the_runs_checkpoint_interval():
    """The second half's rate and CPU where measured, not the whole run's with the JIT's warm-up; the
    freshness goal is the checkpoint interval the freshness job ran with, plus 1 s."""
    results = _results(mf1=80_000, a=10_000, b=5_000, ceiling=300_000, p99=5.9, cpu=18.0)
    by_name = {t.name: t for t in evaluate_targets(results)}
    assert by_name["throughput per task slot (steady)"].met is False
    assert by_name["freshness p99 (early firing)"].met is True  # the shipped 5 s + 1 s
    results["pipelines"][1] |= {"steady_events_per_s": 100_000, "steady_cpu_s_per_million": 11.9}
    results["freshness"]["checkpoint_interval_s"] = 4.0
    by_name = {t.name: t for t in evaluate_targets(results)}
    assert by_name["throughput per task slot (steady)"].measured == "100,000 events/s"
    assert by_name["throughput per task slot (steady)"].met is True
    assert by_name["CPU per million events (p=1, steady)"].met is True
    assert by_name["vs baseline A (p=1, steady)"].measured == "10.0x"
    results["pipelines"][0]["steady_events_per_s"] = 50_000  # two samples of a run of a second: not its rate
    by_name = {t.name: t for t in evaluate_targets(results)}
    assert by_name["ceiling / meterflow (p=1, steady)"].measured == "3.0x"
    assert by_name["freshness p99 (early firing)"].goal == "<= checkpoint interval + 1 s (5 s)"
    assert by_name["freshness p99 (early firing)"].met is False


def test_report_shows_figures_mismatches_and_notes():
    """The Markdown names each pipeline's rate, flags a mismatch and includes the notes."""
    text = render_markdown(
        _results(mf1=50_000, a=10_000, b=5_000, ceiling=400_000, p99=2.5, correct=False),
        notes="## What bounds it\nthe decoder",
    )
    assert "| meterflow | 1 | 1,000 | 50,000 | n/a | n/a | 10.0 |" in text
    assert "2 different" in text
    assert "**not met**" in text
    assert "the decoder" in text


def test_parse_options_splits_on_the_first_equals_sign():
    """KEY=VALUE pairs become a mapping; a pair without '=' is refused."""
    from bench.private_stack import parse_options

    assert parse_options(("python.execution-mode=thread", "a.b=x=y")) == {
        "python.execution-mode": "thread",
        "a.b": "x=y",
    }
    with pytest.raises(ValueError):
        parse_options(("novalue",))


def test_targets_prefer_the_end_to_end_rate_where_no_steady_rate_was_measured():
    """A pipeline whose output lagged its sources is judged by records / time until correct."""
    results = _results(mf1=200_000, a=1_000, b=1_000, ceiling=250_000, p99=1.0)
    results["pipelines"][1]["e2e_events_per_s"] = 20_000
    met = {t.name: t for t in evaluate_targets(results)}
    assert met["throughput per task slot (steady)"].met is False
    assert met["throughput per task slot (steady)"].measured == "20,000 events/s"


def test_billing_section_is_spliced_and_kept_across_regenerations(tmp_path):
    """bench/billing.py replaces its own section; bench/run keeps it when it rewrites the report."""
    from bench.billing_report import SECTION_END, SECTION_START, keep_section, splice_section

    section = f"{SECTION_START}\n## Billing\nfigures\n{SECTION_END}\n"
    once = splice_section("# Benchmarks\n\nbody\n", section)
    assert once.endswith(section) and once.startswith("# Benchmarks")
    again = splice_section(once, section.replace("figures", "new figures"))
    assert again.count(SECTION_START) == 1 and "new figures" in again and "\nfigures" not in again
    old = tmp_path / "benchmarks.md"
    old.write_text(again)
    kept = keep_section(old, "# Benchmarks\n\nregenerated\n")
    assert "regenerated" in kept and "new figures" in kept
