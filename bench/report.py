"""Rendering of the benchmark results: targets, the Markdown report and the chart.

``evaluate_targets`` and ``render_markdown`` are pure functions of the results document
(bench/results.json); ``render_chart`` writes a PNG with matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.stats import Target, ratio

Results = dict[str, Any]


def find(results: Results, name: str, parallelism: int) -> dict[str, Any] | None:
    """The pipeline entry with this name and parallelism, if it was measured."""
    return next((p for p in results["pipelines"] if p["name"] == name and p["parallelism"] == parallelism), None)


def _rate(entry: dict[str, Any] | None) -> float | None:
    """End-to-end events/s (records / time until the output was correct) where known, else consumption rate."""
    if not entry:
        return None
    return entry.get("e2e_events_per_s") or entry.get("events_per_s")


def _fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def _steady(entry: dict[str, Any] | None) -> float | None:
    """Events/s in the second half of the input (the JIT's warm-up left out), else the whole run's rate."""
    if not entry:
        return None
    return entry.get("steady_events_per_s") or _rate(entry)


def _steady_cpu(entry: dict[str, Any] | None) -> float | None:
    if not entry:
        return None
    return entry.get("steady_cpu_s_per_million") or entry.get("cpu_s_per_million")


# The shipped flink.checkpoint_interval, for a results document written before the freshness phase recorded it.
SHIPPED_CHECKPOINT_INTERVAL_S = 5.0


def evaluate_targets(results: Results) -> list[Target]:
    """The throughput targets against this run's figures (``met`` is None when a figure is missing).

    Rates and CPU are the steady state: the second half of the input, where a job that runs for days
    spends its time; the whole run's figures, the JIT's warm-up included, are in the pipeline table.
    """
    mf1, mf2 = find(results, "meterflow", 1), find(results, "meterflow", 2)
    a, b1, ceil1 = find(results, "baseline A", 1), find(results, "baseline B", 1), find(results, "ceiling", 1)
    per_slot = [r / p["parallelism"] for p in (mf1, mf2) if p and (r := _steady(p)) is not None]
    best_slot = max(per_slot) if per_slot else None
    cpu = _steady_cpu(mf1)
    vs_a, vs_b = ratio(_steady(mf1), _steady(a)), ratio(_steady(mf1), _steady(b1))
    # The ceiling reads the topic in 1 to 3 s: its second half is two or three samples, so its whole rate stands.
    vs_ceiling = ratio(_rate(ceil1), _steady(mf1))
    fresh = results.get("freshness") or {}
    p99 = fresh.get("p99_s")
    fresh_goal = fresh.get("checkpoint_interval_s", SHIPPED_CHECKPOINT_INTERVAL_S) + 1
    pipelines = results["pipelines"]
    # The target is meterflow's; a baseline's totals are shown in its row (baseline A's can be off: bench/analysis.md).
    checked = [p for p in pipelines if p.get("correct") is not None and p["name"].startswith("meterflow")]

    def met(value: float | None, ok: bool) -> bool | None:
        return None if value is None else ok

    return [
        Target(
            "throughput per task slot (steady)",
            ">= 100,000 events/s",
            _fmt(best_slot, 0, " events/s"),
            met(best_slot, best_slot is not None and best_slot >= 100_000),
        ),
        Target(
            "CPU per million events (p=1, steady)",
            "<= 12 s",
            _fmt(cpu, 1, " s"),
            met(cpu, cpu is not None and cpu <= 12),
        ),
        Target("vs baseline A (p=1, steady)", ">= 5x", _fmt(vs_a, 1, "x"), met(vs_a, vs_a is not None and vs_a >= 5)),
        Target("vs baseline B (p=1, steady)", ">= 10x", _fmt(vs_b, 1, "x"), met(vs_b, vs_b is not None and vs_b >= 10)),
        Target(
            "ceiling / meterflow (p=1, steady)",
            "<= 5x",
            _fmt(vs_ceiling, 1, "x"),
            met(vs_ceiling, vs_ceiling is not None and vs_ceiling <= 5),
        ),
        Target(
            "freshness p99 (early firing)",
            f"<= checkpoint interval + 1 s ({fresh_goal:g} s)",
            _fmt(p99, 2, " s"),
            met(p99, p99 is not None and p99 <= fresh_goal),
        ),
        Target(
            "exact totals",
            "every meterflow run = oracle",
            f"{sum(1 for p in checked if p['correct'])} of {len(checked)} exact",
            met(1.0 if checked else None, all(p["correct"] for p in checked)),
        ),
    ]


def _mark(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[met]


def pipeline_table(results: Results) -> str:
    """The main table, one row per measured pipeline."""
    lines = [
        "| pipeline | parallelism | records | events/s consumed | events/s end to end | events/s, second half | CPU s per 1M events | CPU s per 1M, second half | Kafka + Postgres CPU s per 1M | peak RSS | consume time | until correct in Postgres | totals vs oracle |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in results["pipelines"]:
        if p.get("correct") is None:
            verdict = "not checked (discards)"
        elif p["correct"]:
            verdict = f"exact ({p['comparison']['expected_windows']:,} windows)"
        else:
            c = p["comparison"]
            verdict = f"**{c['missing']} missing, {c['unexpected']} unexpected, {c['different']} different**"
        name = p["name"] + (" (prefix, see note)" if p.get("prefix") else "")
        lines.append(
            f"| {name} | {p['parallelism']} | {p['records']:,} | {_fmt(p.get('events_per_s'))} | {_fmt(p.get('e2e_events_per_s'))} | {_fmt(p.get('steady_events_per_s'))} | "
            f"{_fmt(p.get('cpu_s_per_million'), 1)} | {_fmt(p.get('steady_cpu_s_per_million'), 1)} | "
            f"{_fmt(p.get('other_cpu_s_per_million'), 1)} | {_fmt(p.get('peak_rss_mb'), 0, ' MB')} | {_fmt(p.get('seconds'), 1, ' s')} | "
            f"{_fmt(p.get('e2e_seconds'), 1, ' s')} | {verdict} |"
        )
    return "\n".join(lines)


def _cell(text: str, width: int = 110) -> str:
    """Text for a Markdown table cell: shortened, its pipes escaped."""
    short = text if len(text) <= width else text[: width - 3] + "..."
    return short.replace("|", "\\|")


def profile_table(profile: dict[str, dict[str, float]]) -> str:
    """Busy / back-pressured / idle ms per second of each vertex."""
    lines = ["| vertex (operator chain) | busy ms/s | back-pressured ms/s | idle ms/s |", "|---|---:|---:|---:|"]
    for vertex, m in sorted(profile.items(), key=lambda kv: -kv[1].get("busyTimeMsPerSecond", 0)):
        lines.append(
            f"| {_cell(vertex)} | {_fmt(m.get('busyTimeMsPerSecond'))} | {_fmt(m.get('backPressuredTimeMsPerSecond'))} | {_fmt(m.get('idleTimeMsPerSecond'))} |"
        )
    return "\n".join(lines)


def render_markdown(results: Results, notes: str = "") -> str:
    """The whole docs/benchmarks.md."""
    run, machine, data = results["run"], results["machine"], results["dataset"]
    out = [
        "# Benchmarks",
        "",
        f"Generated by `{run['command']}` on {run['started']} (total run time {run['duration_s'] / 60:.1f} min). "
        f"Raw figures: [bench/results.json](../bench/results.json). Data set: **{data['records']:,} records**.",
        "",
        "![throughput and CPU per pipeline](img/benchmarks.png)",
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu_model']}, `nproc` = {machine['nproc']}",
        f"- Memory: {machine['memory_gib']:.1f} GiB",
        f"- {machine['os']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
        "- Absolute figures drift between runs on this machine; ratios within one run are the comparison.",
        "",
        "## Data set",
        "",
        f"{data['records']:,} Avro records on one topic with {data['partitions']} partitions: {data['unique']:,} unique events, "
        f"{data['duplicates']:,} duplicates (a recent event re-sent with the same id), {data['late']:,} events dated "
        f"{data['late_by_s']:.0f} s or more behind the stream (late: they belong in the late-events output), and "
        f"{data['closers']} watermark-closing records. {data['tenants']} tenants x {data['customers']} customers x "
        f"{data['meters']} meters, event time spread over {data['span_s'] / 60:.0f} min, {data['window_s']:.0f} s tumbling windows "
        f"-> {data['windows']:,} expected window rows. Production took {data['produce_s']:.0f} s "
        f"({data['records'] / data['produce_s']:,.0f} records/s with the project's producer). The oracle sums quantities as integers "
        "of 1e-9 units in Python, keeps the first copy of each (tenant, event id) and classifies late events with its own "
        "per-partition watermark.",
        "",
        "## Results",
        "",
        pipeline_table(results),
        "",
        "- **events/s**: records consumed between the first and the last record, startup excluded. For Flink jobs from the REST "
        "metric `Source__<source>.numRecordsOut` summed over subtasks (minimum over source vertices when a job reads the topic "
        "more than once), sampled every 0.5 s; for baseline A from the count it writes after each committed batch.",
        "- **CPU s per 1M events**: utime + stime from /proc of the TaskManager JVM and its Python worker processes (or of the "
        "baseline A process) over the same interval, per million records. Kafka broker + Postgres CPU is shown separately.",
        "- **peak RSS**: largest sampled sum of resident memory of the same processes (the TaskManager JVM keeps its heap "
        "between jobs, so its RSS mostly reflects its configured memory).",
        "- **until correct in Postgres** / **events/s end to end**: from the first sample that shows progress (where the consumed "
        "rate starts too) until the table equals the oracle (includes records still queued inside the job when its sources "
        "finished, window firing, the last checkpoint and the commit of the window rows); the records consumed after that first "
        "sample divided by that time. The targets use this rate where no second half was measured.",
        "- **second half**: the same figures from the first sample at half the records consumed to the last record. A run of a "
        "minute spends much of its CPU in the JIT compiler (see the profile below); the second half is closer to a job that runs for days. "
        "The targets use it: they are the steady state.",
        "",
    ]
    graph = run.get("options", {}).get("usage_graph")
    if graph and graph != "sql":
        out += [
            f"> The meterflow runs use `flink.usage_graph: {graph}`; the shipped default is `sql`. Everything else is as shipped "
            "(RocksDB, exactly-once checkpoints every 5 s), but for the TaskManager's slots.",
            "",
        ]
    prefix_runs = [p for p in results["pipelines"] if p.get("prefix")]
    for p in prefix_runs:
        out += [
            f"> Note: {p['name']} ran on the first {p['records']:,} records of the topic only (`--baseline-b-events`); its rate is "
            "measured on that prefix and its totals are checked against the oracle of that prefix.",
            "",
        ]
    out += ["## Targets", "", "| target | goal | this run | |", "|---|---|---|---|"]
    out += [f"| {t.name} | {t.goal} | {t.measured} | {_mark(t.met)} |" for t in evaluate_targets(results)]
    fresh = results.get("freshness")
    if fresh:
        out += [
            "",
            "## Freshness",
            "",
            f"The meterflow job (parallelism {fresh['parallelism']}, `event_time.early_fire_interval` = {fresh['early_fire']}) read a fresh topic "
            f"while {fresh['workers']} producer processes sent {fresh['events']:,} live events (event time = now) at a target of "
            f"{fresh['rate']:,.0f} events/s for {fresh['seconds']:.0f} s (achieved {fresh['achieved_rate']:,.0f}/s). "
            f"Each event's produce time was recorded; Postgres was polled every {fresh['poll_interval_s'] * 1000:.0f} ms "
            f"(one query took {fresh['mean_poll_s'] * 1000:.0f} ms on average) and an event counts as visible at the first poll whose "
            "row `event_count` reaches the event's position in its window. Latencies are therefore upper bounds, resolution one poll.",
            "",
            "| p50 | p90 | p99 | max | visible | never visible |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {_fmt(fresh['p50_s'], 2, ' s')} | {_fmt(fresh['p90_s'], 2, ' s')} | {_fmt(fresh['p99_s'], 2, ' s')} | {_fmt(fresh['max_s'], 2, ' s')} | "
            f"{fresh['visible']:,} | {fresh['never_visible']:,} |",
        ]
    profiled = [p for p in results["pipelines"] if p.get("profile")]
    if profiled:
        out += ["", "## Profile (Flink REST metrics, averaged over the consumption window)", ""]
        for p in profiled:
            out += [f"### {p['name']}, parallelism {p['parallelism']}", "", profile_table(p["profile"]), ""]
    sampled = [p for p in results["pipelines"] if p.get("cpu_by_thread")]
    if sampled:
        out += [
            "",
            "## Where the TaskManager's CPU goes (async-profiler)",
            "",
            "async-profiler ran in the TaskManager as a JVM agent and sampled every thread on CPU (`itimer`, every 10 ms of CPU) "
            "while each pipeline consumed. Shares are of all samples in that interval, the JIT compiler and garbage collector "
            "threads included. Operator threads are named by their chain; the flame graphs draw each thread's stacks from the root up.",
        ]
        for p in sampled:
            out += ["", f"### {p['name']}, parallelism {p['parallelism']}", ""]
            if p.get("flame_graph"):
                out += [f"![flame graph: {p['name']}, parallelism {p['parallelism']}](img/{p['flame_graph']})", ""]
            out += ["| thread | share of CPU samples |", "|---|---:|"]
            out += [f"| {_cell(thread)} | {share:.1%} |" for thread, share in p["cpu_by_thread"]]
    if notes.strip():
        out += ["", notes.strip()]
    out += [
        "",
        "## Reproduce",
        "",
        f"```bash\n{run['command']}\n```",
        "",
        "Options: `.venv/bin/python -m bench.run --help`. The run starts its own stack (free ports, uuid topics, temporary state "
        "directory), measures the pipelines one after another, and stops and removes the stack at the end.",
        "",
    ]
    return "\n".join(out)


def _short(value: float) -> str:
    return f"{value:,.1f}" if value < 10 else f"{value:,.0f}"


def render_chart(results: Results, path: Path) -> None:
    """Bar charts of events/s and CPU seconds per million events for each pipeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [p for p in results["pipelines"] if p.get("events_per_s")]
    # One word group per line, so neighbouring labels never run into each other.
    labels = [f"{p['name'].replace(' + ', chr(10) + '+ ')}\np={p['parallelism']}" for p in entries]
    colors = [
        "#2b6cb0" if p["name"].startswith("meterflow") else "#a0aec0" if p["name"] == "ceiling" else "#dd6b20"
        for p in entries
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    bars = ax1.bar(labels, [p["events_per_s"] for p in entries], color=colors)
    ax1.bar_label(bars, labels=[f"{p['events_per_s']:,.0f}" for p in entries], fontsize=8)
    ax1.set_ylabel("events/s (consumed, startup excluded)")
    ax1.set_yscale("log")
    ax1.set_title(f"Throughput, {results['dataset']['records']:,} records")
    bars = ax2.bar(labels, [p.get("cpu_s_per_million") or 0 for p in entries], color=colors)
    ax2.bar_label(bars, labels=[_short(p.get("cpu_s_per_million") or 0) for p in entries], fontsize=8)
    ax2.set_ylabel("CPU s per 1M events (pipeline processes)")
    ax2.set_yscale("log")
    ax2.set_title("CPU cost")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
