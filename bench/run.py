"""One command for the whole benchmark: ``.venv/bin/python -m bench.run`` (or ``bench/run``).

Starts a private stack, pre-produces the data set, computes the oracle, measures the ceiling,
meterflow (parallelism 1 and 2), baseline A (plain Python consumer) and baseline B (naive PyFlink
DataStream job) one after another on the same data, then the freshness phase; writes
bench/results.json, docs/benchmarks.md and docs/img/benchmarks.png; stops and removes the stack.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress

from bench import flink as bflink
from bench.dataset import DatasetSpec, Oracle, Totals, closers, compare, generate
from bench.freshness import freshness_phase
from bench.machine import machine_info
from bench.pipelines import (
    Measurement,
    mean_profile,
    run_baseline_a,
    run_flink_job,
    scalar,
    stack_pids,
    wait_for_totals,
)
from bench.private_stack import BenchStack, parse_options, private_stack
from bench.produce import split_partitions, start_bulk
from bench.profiler import agent_option, extract_library, profile_pipeline
from bench.report import render_chart, render_markdown
from bench.stats import steady_throughput, throughput
from meterflow.config import JobConfig
from meterflow.local import flink_jobs
from meterflow.local.flink import FlinkCluster

REPO = Path(__file__).resolve().parent.parent
PIPELINES = ("ceiling", "meterflow", "baseline-a", "baseline-b", "freshness")
console = Console()
OFF_THE_TASKMANAGER = {"baseline A"}  # a plain Python process: the TaskManager's profile says nothing of it


def summarize(name: str, parallelism: int, records: int, m: Measurement, **extra: Any) -> dict[str, Any]:
    """One pipeline's entry in results.json."""
    t = throughput(m.samples, records)
    entry: dict[str, Any] = {"name": name, "parallelism": parallelism, "records": records, "finished": m.finished}
    if t is not None:
        entry.update(
            events_per_s=t.events_per_s,
            seconds=t.seconds,
            cpu_s=t.cpu_s,
            cpu_s_per_million=t.cpu_s_per_million,
            other_cpu_s_per_million=t.other_cpu_s_per_million,
            peak_rss_mb=t.peak_rss_bytes / 2**20,
        )
        first = next(s for s in m.samples if s.consumed > 0)
        entry["first_consumed_at"], entry["consumed_at_first_sample"] = first.t, first.consumed
    if (steady := steady_throughput(m.samples, records)) is not None:
        entry.update(steady_events_per_s=steady.events_per_s, steady_cpu_s_per_million=steady.cpu_s_per_million)
    if m.profiles:
        entry["profile"] = mean_profile(m.profiles)
    entry.update(extra)
    return entry


def check(entry: dict[str, Any], expected: Totals, actual: dict, correct_at: float | None) -> None:
    """Record the comparison with the oracle and the time until Postgres was correct."""
    c = compare(expected.windows, actual)
    entry["correct"] = c.exact
    entry["comparison"] = asdict(c)
    if correct_at is not None and "first_consumed_at" in entry:
        entry["e2e_seconds"] = correct_at - entry["first_consumed_at"]
        # Counted like the consumed rate: only the records consumed after the first sample that showed progress.
        entry["e2e_events_per_s"] = (entry["records"] - entry.get("consumed_at_first_sample", 0)) / entry["e2e_seconds"]
    status = (
        "[green]exact"
        if c.exact
        else f"[red]MISMATCH {c.missing} missing, {c.unexpected} unexpected, {c.different} different"
    )
    console.print(
        f"  {entry['name']} p={entry['parallelism']}: {entry.get('events_per_s', 0):,.0f} events/s, totals {status}"
    )
    for example in c.examples:
        console.print(f"    {example}")


def produce(
    stack: BenchStack, spec: DatasetSpec, closer_ms: int, prefix: int
) -> tuple[Totals, Totals, list[int], list[int], float]:
    """Produce the data set (in background processes) while computing the oracle; returns the
    full and prefix totals, per-partition record counts (all, prefix) and the production time."""
    cfg, _ = stack.config("base")
    started = time.time()
    procs, counter = start_bulk(
        spec,
        closer_ms,
        cfg.kafka.bootstrap_servers,
        cfg.kafka.usage_events_topic,
        workers=len(split_partitions(spec.partitions, 2)),
    )
    oracle = Oracle(
        spec.partitions,
        spec.window_ms,
        int(cfg.event_time.watermark_delay.total_seconds() * 1000),
        int(cfg.event_time.allowed_lateness.total_seconds() * 1000),
    )
    counts, prefix_counts = [0] * spec.partitions, [0] * spec.partitions
    prefix_totals: Totals | None = None
    total = spec.events + spec.partitions
    with Progress(console=console) as bar:
        task = bar.add_task("producing (project producer)", total=total)
        oracle_task = bar.add_task("oracle", total=spec.events)
        for i, record in enumerate(generate(spec)):
            if i == prefix:
                prefix_totals, prefix_counts = oracle.totals(), list(counts)
            oracle.add(record)
            counts[record.partition] += 1
            if i % 50_000 == 0:
                bar.update(task, completed=counter.value)
                bar.update(oracle_task, completed=i)
        bar.update(oracle_task, completed=spec.events)
        if prefix_totals is None:
            prefix_totals, prefix_counts = oracle.totals(), list(counts)
        for c in closers(closer_ms, spec.partitions):
            oracle.add(c)
            counts[c.partition] += 1
        while any(p.is_alive() for p in procs):
            bar.update(task, completed=counter.value)
            time.sleep(0.3)
        bar.update(task, completed=counter.value)
    if any(p.exitcode for p in procs) or counter.value != total:
        msg = f"production failed: {counter.value} of {total} records acknowledged, exit codes {[p.exitcode for p in procs]}"
        raise click.ClickException(msg)
    return oracle.totals(), prefix_totals, counts, prefix_counts, time.time() - started


def checkpoint_summary(cfg: Any, job_id: str) -> dict[str, Any]:
    """The job's completed checkpoints so far: duration and size (REST summary), and the latest one's state per task."""
    stats = flink_jobs.checkpoint_stats(cfg, job_id)
    summary = stats.get("summary") or {}
    out: dict[str, Any] = {
        "completed": (stats.get("counts") or {}).get("completed"),
        "end_to_end_duration_ms": summary.get("end_to_end_duration"),
        "checkpointed_size_bytes": summary.get("checkpointed_size"),
        "state_size_bytes": summary.get("state_size"),
    }
    latest = (stats.get("latest") or {}).get("completed")
    if latest:
        names = {v["id"]: v["name"] for v in flink_jobs.job_details(cfg, job_id)["vertices"]}
        details = flink_jobs.rest(cfg, f"/jobs/{job_id}/checkpoints/details/{latest['id']}")
        out["latest_state_size_by_task"] = {
            names.get(vid, vid)[:80]: task.get("state_size") for vid, task in (details.get("tasks") or {}).items()
        }
    return out


def flink_pipeline(
    stack: BenchStack,
    name: str,
    label: str,
    parallelism: int,
    records: int,
    timeout_s: float,
    submit: Any,
    table: str | None,
    expected: Totals | None,
) -> dict[str, Any]:
    """Submit a Flink job, sample it until its sources have consumed ``records``, check its totals, cancel it."""
    cfg, _ = stack.config("base")
    FlinkCluster(cfg).up()
    job_cfg, job_id = submit()
    try:
        m = run_flink_job(f"{label} p={parallelism}", job_cfg, job_id, records, timeout_s, stack_pids(cfg))
        entry = summarize(
            name, parallelism, records, m, progress_metric="Source__*.numRecordsOut (REST, sum over subtasks)"
        )
        if table is not None and expected is not None:
            correct_at, actual = wait_for_totals(
                job_cfg, table, expected.windows, timeout_s=timeout_s if m.finished else 5
            )
            check(entry, expected, actual, correct_at)
        entry["checkpoints"] = checkpoint_summary(job_cfg, job_id)
    finally:
        try:
            state = flink_jobs.job_details(job_cfg, job_id)["state"]
            if state not in ("FINISHED", "CANCELED", "FAILED"):
                flink_jobs.cancel(job_cfg, job_id)
        except Exception as e:  # noqa: BLE001 - the stack is removed at the end anyway
            console.print(f"[yellow]could not cancel {job_id}: {e}")
    return entry


def billing_on_pipeline(
    stack: BenchStack, parallelism: int, records: int, timeout_s: float, expected: Totals, spec: DatasetSpec
) -> dict[str, Any]:
    """meterflow as shipped: the usage job and the billing job (same parallelism), billing every closed window to a 50 ms provider.

    Measured like the usage job alone (its source's progress, its totals), while the billing job
    delivers the windows the usage job closes. The provider stand-in (tests/support/fake_stripe.py)
    runs as its own process, left out of the CPU figures like any remote provider.
    """
    from bench.billing import FakeProcess, map_customers, sent_count
    from connectors.kafka_admin import ensure_topics
    from sinks.ledger import apply_schemas

    table = f"bench_mfb_p{parallelism}"
    fake = FakeProcess(latency=0.05)
    billing_jobs: list[str] = []
    try:
        bcfg, bpath = stack.config(
            f"meterflow-billing-p{parallelism}",
            kafka={
                "consumer_group": f"bench-mfb-p{parallelism}-{stack.run_id}",
                "closed_windows_topic": f"bench-closed-p{parallelism}-{stack.run_id}",
            },
            postgres={"usage_table": table},
            flink={"parallelism": parallelism, "job_name": f"meterflow-bench-billing-p{parallelism}"},
            billing={
                "enabled": True,
                "ledger_table": f"bench_deliveries_p{parallelism}",
                "customers_table": f"bench_customers_p{parallelism}",
            },
            stripe={"api_base": fake.url},
        )
        secrets = bcfg.path(bcfg.secrets_file)
        if "METERFLOW_STRIPE_API_KEY=" not in secrets.read_text():
            with secrets.open("a") as out:
                out.write("METERFLOW_STRIPE_API_KEY=sk_test_meterflowBench\n")  # any key works with the fake
        k = bcfg.kafka
        ensure_topics(k.bootstrap_servers, [k.closed_windows_topic], k.partitions)
        apply_schemas(bcfg)
        map_customers(bcfg, spec.tenants, spec.customers)

        def submit_both() -> tuple[JobConfig, str]:
            # Billing first: it waits on the closed-windows topic, so the usage job is measured from its start.
            billing_jobs.append(flink_jobs.submit_billing(bcfg, bpath, timeout=240))
            return bcfg, flink_jobs.submit(bcfg, bpath, timeout=240)

        entry = flink_pipeline(
            stack,
            "meterflow + billing",
            "meterflow + billing",
            parallelism,
            records,
            timeout_s,
            submit_both,
            table,
            expected,
        )
        entry["billing_sent_when_usage_done"] = sent_count(bcfg)
        return entry
    finally:
        for job_id in billing_jobs:
            flink_jobs.cancel(bcfg, job_id)
        fake.stop()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--events", default=2_000_000, help="records to pre-produce (duplicates and late events included)")
@click.option("--tenants", default=10)
@click.option("--customers", default=20, help="customers per tenant")
@click.option("--meters", default="api_calls,tokens", help="comma-separated meters (must be configured meters)")
@click.option("--duplicate-ratio", default=0.05, help="share of records that re-send a recent event")
@click.option(
    "--late-ratio", default=0.001, help="share of records dated half the span (at least 10 min) behind the stream"
)
@click.option("--partitions", default=3)
@click.option("--span-minutes", default=60, help="event-time span of the data set")
@click.option("--parallelism", "parallelisms", default="1,2", help="meterflow parallelisms to measure")
@click.option(
    "--usage-graph",
    type=click.Choice(["sql", "two_stage"]),
    default="sql",
    help="flink.usage_graph of every meterflow run (the shipped default is sql)",
)
@click.option(
    "--baseline-b-events",
    type=int,
    default=100_000,
    help="run baseline B on this prefix of the topic only, 0 = all (it runs at a few hundred to a few thousand events/s; the report says when a prefix was used)",
)
@click.option("--baseline-a-batch", default=5000, help="baseline A records per poll (= per transaction)")
@click.option(
    "--billing/--no-billing",
    default=True,
    help="also run meterflow as shipped, with the billing job delivering every closed window (50 ms provider)",
)
@click.option("--skip", multiple=True, type=click.Choice(PIPELINES), help="leave out a phase (repeatable)")
@click.option("--freshness-rate", default=20_000.0, help="events/s in the freshness phase")
@click.option("--freshness-seconds", default=30.0)
@click.option("--freshness-parallelism", default=1)
@click.option("--early-fire", default="1s", help="event_time.early_fire_interval for the freshness phase")
@click.option("--poll-ms", default=100, help="Postgres poll interval of the freshness phase")
@click.option("--timeout-minutes", default=20.0, help="per pipeline")
@click.option("--results", "results_path", type=click.Path(path_type=Path), default=REPO / "bench" / "results.json")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=REPO / "docs" / "benchmarks.md")
@click.option(
    "--chart", "chart_path", type=click.Path(path_type=Path), default=REPO / "docs" / "img" / "benchmarks.png"
)
@click.option(
    "--flink-conf",
    "flink_conf",
    multiple=True,
    help="KEY=VALUE added to the private cluster's Flink config (so to every job), e.g. python.execution-mode=thread (repeatable)",
)
@click.option(
    "--render-only",
    is_flag=True,
    help="measure nothing: re-render the report and chart from --results and bench/analysis.md",
)
@click.option("--keep-state", is_flag=True, help="keep the private stack's state directory (logs) after the run")
@click.option(
    "--profile/--no-profile",
    default=True,
    help="sample the TaskManager with async-profiler (every 10 ms of CPU): CPU per thread in the report, a flame graph per meterflow run beside the chart",
)
def main(**opts: Any) -> None:
    """Benchmark meterflow against baselines on a private local stack; write the report."""
    if opts["render_only"]:
        write_report(json.loads(opts["results_path"].read_text()), opts["report_path"], opts["chart_path"])
        return
    # A TERM (like Ctrl-C) unwinds through the stack's cleanup instead of leaving it running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    command = "bench/run " + " ".join(a for a in sys.argv[1:])
    results: dict[str, Any] = {
        "run": {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command.strip(),
            "options": {k: str(v) for k, v in opts.items()},
        },
        "machine": machine_info(),
        "pipelines": [],
    }
    skip = set(opts["skip"])
    timeout_s = opts["timeout_minutes"] * 60
    try:
        flink_options = parse_options(opts["flink_conf"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--flink-conf") from e
    if opts["billing"] and "meterflow" not in skip:
        # Both jobs at the measured parallelism need their own slots (the shipped stack has usage + billing slots too).
        slots = 2 * max(int(x) for x in opts["parallelisms"].split(","))
        flink_options.setdefault("taskmanager.numberOfTaskSlots", str(slots))
    results["run"]["flink_options"] = dict(flink_options)
    profile_dir = Path(tempfile.mkdtemp(prefix="meterflow-profile-")) if opts["profile"] else None
    if profile_dir is not None:
        agent = agent_option(extract_library(profile_dir), profile_dir)
        key = "env.java.opts.taskmanager"
        flink_options[key] = f"{flink_options[key]} {agent}" if key in flink_options else agent
    with private_stack(
        opts["partitions"], keep_state=opts["keep_state"], echo=console.print, flink_options=flink_options
    ) as stack:
        # Every job config derives from the base: each meterflow run (billing and freshness too) counts with this graph.
        stack.base.setdefault("flink", {})["usage_graph"] = opts["usage_graph"]
        cfg, _ = stack.config("base")
        window_ms = int(cfg.event_time.window_size.total_seconds() * 1000)
        span_ms = opts["span_minutes"] * 60_000
        now_ms = int(time.time() * 1000)
        start_ms = now_ms - span_ms - 3_600_000
        start_ms -= start_ms % window_ms
        spec = DatasetSpec(
            events=opts["events"],
            tenants=opts["tenants"],
            customers=opts["customers"],
            meters=tuple(m.strip() for m in opts["meters"].split(",") if m.strip()),
            duplicate_ratio=opts["duplicate_ratio"],
            late_ratio=opts["late_ratio"],
            partitions=opts["partitions"],
            start_ms=start_ms,
            span_ms=span_ms,
            window_ms=window_ms,
        )
        b_prefix = min(opts["baseline_b_events"] or spec.events, spec.events)  # 0 = the whole topic
        full, prefix_totals, counts, prefix_counts, produce_s = produce(stack, spec, now_ms, b_prefix)
        records = sum(counts)
        results["dataset"] = {
            "records": records,
            "unique": full.counted + full.late - spec.partitions,
            "duplicates": full.duplicates,
            "late": full.late,
            "closers": spec.partitions,
            "windows": len(full.windows),
            "partitions": spec.partitions,
            "tenants": spec.tenants,
            "customers": spec.customers,
            "meters": len(spec.meters),
            "span_s": span_ms / 1000,
            "window_s": window_ms / 1000,
            "late_by_s": spec.late_by_ms / 1000,
            "produce_s": produce_s,
        }
        console.print(
            f"produced {records:,} records in {produce_s:.0f} s; oracle: {len(full.windows):,} windows, {full.duplicates:,} duplicates, {full.late:,} late"
        )
        save(results, opts["results_path"], started)

        def add(entry: dict[str, Any]) -> None:
            if profile_dir is not None and "first_consumed_at" in entry and entry["name"] not in OFF_THE_TASKMANAGER:
                attach_profile(entry, profile_dir, opts["chart_path"].parent)
            results["pipelines"].append(entry)
            save(results, opts["results_path"], started)

        if "ceiling" not in skip:
            for p in (1, 2):
                ccfg, cpath = stack.config(
                    f"ceiling-p{p}", kafka={"consumer_group": f"bench-ceiling-p{p}-{stack.run_id}"}
                )
                add(
                    flink_pipeline(
                        stack,
                        "ceiling",
                        "ceiling (source -> blackhole)",
                        p,
                        records,
                        timeout_s,
                        lambda ccfg=ccfg, cpath=cpath, p=p: (
                            ccfg,
                            bflink.submit_script(
                                ccfg,
                                bflink.BENCH_JOBS / "ceiling_job.py",
                                ["--config", str(cpath), "--parallelism", str(p)],
                            ),
                        ),
                        None,
                        None,
                    )
                )

        if "meterflow" not in skip:
            for p in (int(x) for x in opts["parallelisms"].split(",")):
                table = f"bench_mf_p{p}"
                mcfg, mpath = stack.config(
                    f"meterflow-p{p}",
                    kafka={"consumer_group": f"bench-mf-p{p}-{stack.run_id}"},
                    postgres={"usage_table": table},
                    flink={"parallelism": p, "job_name": f"meterflow-bench-p{p}"},
                )
                from sinks.postgres import apply_schema

                apply_schema(mcfg.postgres)
                add(
                    flink_pipeline(
                        stack,
                        "meterflow",
                        "meterflow",
                        p,
                        records,
                        timeout_s,
                        lambda mcfg=mcfg, mpath=mpath: (mcfg, flink_jobs.submit(mcfg, mpath, timeout=240)),
                        table,
                        full,
                    )
                )
                if opts["billing"]:
                    add(billing_on_pipeline(stack, p, records, timeout_s, full, spec))

        if "baseline-a" not in skip:
            acfg, apath = stack.config("baseline-a", kafka={"consumer_group": f"bench-a-{stack.run_id}"})
            m, code = run_baseline_a(
                apath, "bench_a", records, stack.dir, timeout_s, stack_pids(cfg), opts["baseline_a_batch"]
            )
            entry = summarize(
                "baseline A",
                1,
                records,
                m,
                progress_metric="records committed (written by the consumer after each batch)",
                exit_code=code,
            )
            from bench.pipelines import window_totals

            actual = window_totals(acfg, "bench_a_totals")
            check(entry, full, actual, m.samples[-1].t if m.finished else None)
            entry["late_rows"] = scalar(acfg, "SELECT count(*) FROM bench_a_late")
            add(entry)

        if "baseline-b" not in skip:
            expected = prefix_totals if b_prefix < spec.events else full
            b_counts = prefix_counts if b_prefix < spec.events else counts
            b_records = sum(b_counts)
            table, late_table = "bench_b_p1", "bench_b_late_p1"
            bcfg, bpath = stack.config(
                "baseline-b", kafka={"consumer_group": f"bench-b-{stack.run_id}"}, postgres={"usage_table": table}
            )
            from sinks.postgres import apply_schema, connect

            apply_schema(bcfg.postgres)
            with connect(bcfg.postgres) as conn:
                conn.execute(f"CREATE TABLE IF NOT EXISTS {late_table} (tenant_id text, event_id text)")
            stops = ",".join(f"{p}:{c}" for p, c in enumerate(b_counts))
            args = [
                "--config",
                str(bpath),
                "--parallelism",
                "1",
                "--stop-offsets",
                stops,
                "--table",
                table,
                "--late-table",
                late_table,
            ]
            entry = flink_pipeline(
                stack,
                "baseline B",
                "baseline B (PyFlink DataStream)",
                1,
                b_records,
                timeout_s,
                lambda: (bcfg, bflink.submit_script(bcfg, bflink.BENCH_JOBS / "baseline_b_job.py", args)),
                table,
                expected,
            )
            entry["prefix"] = b_prefix < spec.events
            entry["late_rows"] = scalar(bcfg, f"SELECT count(*) FROM {late_table}")
            entry["expected_late"] = expected.late
            add(entry)

        if "freshness" not in skip:
            results["freshness"] = freshness_phase(stack, opts, console.print)
            save(results, opts["results_path"], started)

    if profile_dir is not None and not opts["keep_state"]:
        shutil.rmtree(profile_dir, ignore_errors=True)
    save(results, opts["results_path"], started)
    write_report(results, opts["report_path"], opts["chart_path"])
    console.print(
        f"wrote {opts['results_path']}, {opts['report_path']}, {opts['chart_path']} ({(time.time() - started) / 60:.1f} min)"
    )


def attach_profile(entry: dict[str, Any], profile_dir: Path, image_dir: Path) -> None:
    """CPU samples per thread while the pipeline consumed; for meterflow also its flame graph (docs/img/)."""
    name = f"{entry['name']} p={entry['parallelism']}"
    image = (
        image_dir / f"flamegraph-{entry['name'].replace(' ', '-').replace('+', 'plus')}-p{entry['parallelism']}.png"
        if entry["name"].startswith("meterflow")
        else None
    )
    shares = profile_pipeline(
        profile_dir,
        entry["first_consumed_at"],
        entry["first_consumed_at"] + entry["seconds"],
        image,
        f"TaskManager CPU while {name} consumed",
    )
    entry["cpu_by_thread"] = [[thread, round(share, 4)] for thread, share in shares[:12]]
    if image is not None and shares:
        entry["flame_graph"] = image.name


def write_report(results: dict[str, Any], report_path: Path, chart_path: Path) -> None:
    """docs/benchmarks.md (with bench/analysis.md as its notes) and the chart."""
    notes_file = REPO / "bench" / "analysis.md"
    notes = notes_file.read_text() if notes_file.exists() else ""
    report_path.parent.mkdir(parents=True, exist_ok=True)
    from bench.billing_report import keep_section
    from bench.state_sizing_report import keep_section as keep_state_section

    old = report_path.read_text() if report_path.exists() else ""
    # The billing and state-sizing sections come from bench/billing.py and bench/state_sizing.py.
    report_path.write_text(keep_state_section(old, keep_section(report_path, render_markdown(results, notes))))
    render_chart(results, chart_path)


def save(results: dict[str, Any], path: Path, started: float) -> None:
    """Write results.json (after every phase, so an interrupted run keeps what it measured)."""
    results["run"]["duration_s"] = time.time() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
