"""Freshness: steady live traffic into the meterflow job with early firing; produce-to-visible latency."""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

from rich.progress import Progress

from bench.private_stack import BenchStack
from bench.produce import SteadySpec, split_partitions, start_steady
from bench.stats import percentile, visibility_latencies
from meterflow.config import JobConfig
from meterflow.config_values import parse_duration
from sinks.postgres import connect
from sinks.postgres_schema import check_identifier

PollCounts = dict[tuple[str, str, str, int], int]


@dataclass(frozen=True)
class FreshnessResult:
    """Latency percentiles in seconds and how the measurement was made."""

    events: int
    visible: int
    never_visible: int
    p50_s: float | None
    p90_s: float | None
    p99_s: float | None
    max_s: float | None
    poll_interval_s: float
    mean_poll_s: float
    achieved_rate: float


def poll_counts(conn, table: str) -> PollCounts:
    """Current event_count per window row."""
    rows = conn.execute(
        f"SELECT tenant_id, customer_id, meter, window_start, event_count FROM {check_identifier(table)}"
    ).fetchall()
    return {(r[0], r[1], r[2], int(r[3].replace(tzinfo=UTC).timestamp() * 1000)): int(r[4]) for r in rows}


def measure_freshness(
    cfg: JobConfig, table: str, spec: SteadySpec, workdir: Path, poll_interval_s: float = 0.1, drain_s: float = 20
) -> FreshnessResult:
    """Produce at ``spec.rate`` for ``spec.seconds`` while polling the table every ``poll_interval_s``."""
    procs, outs, counter = start_steady(spec, cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, workdir)
    polls: list[tuple[float, PollCounts]] = []
    last: PollCounts = {}
    poll_durations: list[float] = []
    started = time.time()
    with connect(cfg.postgres) as conn, Progress() as bar:
        conn.autocommit = True
        task = bar.add_task("freshness: steady traffic", total=spec.rate * spec.seconds)
        drain_until = None
        while True:
            t = time.time()
            counts = poll_counts(conn, table)
            poll_durations.append(time.time() - t)
            changed = {k: v for k, v in counts.items() if last.get(k) != v}
            if changed:
                polls.append((t, changed))
                last.update(changed)
            bar.update(task, completed=counter.value)
            producing = any(p.is_alive() for p in procs)
            if not producing and drain_until is None:
                drain_until = time.time() + drain_s
            if drain_until is not None and time.time() >= drain_until:
                break
            if drain_until is not None and all(f.exists() for f in outs):
                produced_total = counter.value
                if sum(last.values()) >= produced_total:
                    break
            time.sleep(max(0.0, poll_interval_s - (time.time() - t)))
    for p in procs:
        p.join(timeout=30)
    produced: dict[tuple[str, str, str, int], list[float]] = {}
    events = 0
    for out in outs:
        for key, at in pickle.loads(out.read_bytes()):  # noqa: S301 - written by this benchmark's own producer processes
            produced.setdefault(key, []).append(at)
            events += 1
    latencies, never = visibility_latencies(produced, polls)
    first = min((ts[0] for ts in produced.values()), default=started)
    last_t = max((ts[-1] for ts in produced.values()), default=started)

    def pct(q: float) -> float | None:
        return percentile(latencies, q) if latencies else None

    return FreshnessResult(
        events=events,
        visible=len(latencies),
        never_visible=never,
        p50_s=pct(50),
        p90_s=pct(90),
        p99_s=pct(99),
        max_s=max(latencies) if latencies else None,
        poll_interval_s=poll_interval_s,
        mean_poll_s=sum(poll_durations) / len(poll_durations) if poll_durations else 0.0,
        achieved_rate=events / (last_t - first) if last_t > first else 0.0,
    )


def freshness_phase(stack: BenchStack, opts: dict[str, Any], echo: Callable[[str], None]) -> dict[str, Any]:
    """Steady traffic into meterflow with early firing; latency from produce to visible in Postgres."""
    from connectors.kafka_admin import ensure_topics
    from meterflow.local import flink_jobs
    from meterflow.local.flink import FlinkCluster
    from sinks.postgres import apply_schema

    topic = f"bench-fresh-{stack.run_id}"
    p = opts["freshness_parallelism"]
    fcfg, fpath = stack.config(
        "freshness",
        kafka={"usage_events_topic": topic, "consumer_group": f"bench-fresh-{stack.run_id}"},
        postgres={"usage_table": "bench_fresh"},
        flink={"parallelism": p, "job_name": "meterflow-bench-fresh"},
        event_time={"early_fire_interval": opts["early_fire"]},
    )
    parse_duration(opts["early_fire"])
    ensure_topics(fcfg.kafka.bootstrap_servers, [topic], fcfg.kafka.partitions)
    apply_schema(fcfg.postgres)
    FlinkCluster(fcfg).up()
    job_id = flink_jobs.submit(fcfg, fpath, timeout=240)
    workers = len(split_partitions(fcfg.kafka.partitions, 2))
    spec = SteadySpec(
        rate=opts["freshness_rate"],
        seconds=opts["freshness_seconds"],
        tenants=opts["tenants"],
        customers=opts["customers"],
        partitions=fcfg.kafka.partitions,
        window_ms=int(fcfg.event_time.window_size / timedelta(milliseconds=1)),
    )
    try:
        r = measure_freshness(fcfg, "bench_fresh", spec, stack.dir, poll_interval_s=opts["poll_ms"] / 1000)
    finally:
        flink_jobs.cancel(fcfg, job_id)
    echo(f"  freshness: p50 {r.p50_s} s, p99 {r.p99_s} s, {r.never_visible} never visible")
    return {
        **asdict(r),
        "parallelism": p,
        "early_fire": opts["early_fire"],
        "checkpoint_interval_s": fcfg.flink.checkpoint_interval.total_seconds(),
        "rate": spec.rate,
        "seconds": spec.seconds,
        "workers": workers,
    }
