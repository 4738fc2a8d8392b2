"""Running each measured pipeline on the private stack and sampling it (I/O; the figures are in bench.stats)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench import flink as bflink
from bench.dataset import CLOSER_TENANT, WindowKey, decimal_to_nanos
from bench.procstat import TreeMeter, read_pid
from bench.stats import Sample
from meterflow.config import JobConfig
from sinks.postgres import connect
from sinks.postgres_schema import check_identifier

SAMPLE_INTERVAL_S = 0.5
PROFILE_INTERVAL_S = 3.0


@dataclass
class Measurement:
    """Raw observations of one pipeline run."""

    samples: list[Sample] = field(default_factory=list)
    profiles: list[dict[str, dict[str, float]]] = field(default_factory=list)
    finished: bool = False


def stack_pids(cfg: JobConfig) -> list[int]:
    """Kafka broker and Postgres postmaster of the private stack (their children are found from these)."""
    pids = [
        read_pid(cfg.state_dir / "kafka" / "kafka.pid"),
        read_pid(cfg.state_dir / "postgres" / "data" / "postmaster.pid"),
    ]
    return [p for p in pids if p is not None]


def sample_until(
    label: str,
    total: int,
    progress: Callable[[], int],
    measured_pids: Callable[[], list[int]],
    other_pids: list[int],
    timeout_s: float,
    profile: Callable[[], dict[str, dict[str, float]]] | None = None,
    alive: Callable[[], bool] = lambda: True,
) -> Measurement:
    """Sample progress, CPU and RSS every 0.5 s until ``total`` records are consumed (or timeout)."""
    meter = TreeMeter()
    m = Measurement()
    deadline = time.monotonic() + timeout_s
    next_profile = 0.0
    columns = (
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(label, total=total, rate="")
        while time.monotonic() < deadline:
            try:
                consumed = progress()
            except Exception as e:  # noqa: BLE001 - a metrics hiccup must not end the run; retried next sample
                print(f"  progress unavailable: {e}", file=sys.stderr)
                consumed = m.samples[-1].consumed if m.samples else 0
            groups = meter.sample({"main": measured_pids(), "other": other_pids})
            m.samples.append(Sample(time.time(), consumed, groups["main"][0], groups["main"][1], groups["other"][0]))
            if len(m.samples) > 4:
                a, b = m.samples[-5], m.samples[-1]
                bar.update(task, rate=f"{(b.consumed - a.consumed) / (b.t - a.t):,.0f}/s")
            bar.update(task, completed=min(consumed, total))
            if consumed >= total:
                m.finished = True
                break
            if not alive():
                break
            if profile is not None and consumed > 0 and time.monotonic() >= next_profile:
                try:
                    m.profiles.append(profile())
                except Exception as e:  # noqa: BLE001 - the profile is optional
                    print(f"  profile unavailable: {e}", file=sys.stderr)
                next_profile = time.monotonic() + PROFILE_INTERVAL_S
            time.sleep(SAMPLE_INTERVAL_S)
    return m


def mean_profile(profiles: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Average of each vertex's metrics over the profile samples (NaN values skipped)."""
    sums: dict[str, dict[str, list[float]]] = {}
    for snapshot in profiles:
        for vertex, metrics in snapshot.items():
            for name, value in metrics.items():
                if value == value:  # not NaN
                    sums.setdefault(vertex, {}).setdefault(name, []).append(value)
    return {v: {n: sum(xs) / len(xs) for n, xs in ms.items()} for v, ms in sums.items()}


def window_totals(cfg: JobConfig, table: str, has_dimensions: bool = True) -> dict[WindowKey, tuple[int, int]]:
    """Per-window (quantity in 1e-9 units, event count) from a Postgres table, closer tenant excluded."""
    t = check_identifier(table)
    with connect(cfg.postgres) as conn:
        rows = conn.execute(
            f"SELECT tenant_id, customer_id, meter, window_start, quantity, event_count FROM {t} WHERE tenant_id <> %s",
            (CLOSER_TENANT,),
        ).fetchall()
    return {
        (r[0], r[1], r[2], int(r[3].replace(tzinfo=UTC).timestamp() * 1000)): (decimal_to_nanos(r[4]), int(r[5]))
        for r in rows
    }


def scalar(cfg: JobConfig, sql: str) -> Any:
    """One value from Postgres."""
    with connect(cfg.postgres) as conn:
        row = conn.execute(sql).fetchone()
    return row[0] if row else None


def wait_for_totals(
    cfg: JobConfig, table: str, expected: dict[WindowKey, tuple[int, int]], timeout_s: float
) -> tuple[float | None, dict[WindowKey, tuple[int, int]]]:
    """Poll the table until it equals ``expected``; return (time it did, or None) and the last totals."""
    deadline = time.monotonic() + timeout_s
    actual: dict[WindowKey, tuple[int, int]] = {}
    while time.monotonic() < deadline:
        actual = window_totals(cfg, table)
        if actual == expected:
            return time.time(), actual
        time.sleep(2)
    return None, actual


def run_baseline_a(
    config: Path, prefix: str, expected: int, workdir: Path, timeout_s: float, other_pids: list[int], max_records: int
) -> tuple[Measurement, int]:
    """Run the plain Python consumer as its own process and sample it; returns samples and its exit code."""
    progress_file = workdir / f"{prefix}.progress"
    log = (workdir / f"{prefix}.log").open("w")
    cmd = [
        sys.executable,
        "-m",
        "bench.baseline_a",
        "--config",
        str(config),
        "--prefix",
        prefix,
        "--expected",
        str(expected),
        "--progress",
        str(progress_file),
        "--max-records",
        str(max_records),
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)

    def progress() -> int:
        try:
            return int(progress_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    try:
        m = sample_until(
            "baseline A (Python consumer)",
            expected,
            progress,
            lambda: [proc.pid] if proc.poll() is None else [],
            other_pids,
            timeout_s,
            alive=lambda: proc.poll() is None,
        )
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    return m, code


def run_flink_job(
    label: str,
    cfg: JobConfig,
    job_id: str,
    total: int,
    timeout_s: float,
    other_pids: list[int],
) -> Measurement:
    """Sample a submitted Flink job until its sources have emitted ``total`` records."""
    progress = bflink.SourceProgress(cfg, job_id, total)
    return sample_until(
        label,
        total,
        progress,
        lambda: bflink.taskmanager_pids(cfg),
        other_pids,
        timeout_s,
        profile=lambda: bflink.vertex_profile(cfg, job_id),
    )
