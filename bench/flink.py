"""Flink cluster side of the benchmark: submit a PyFlink script, read source progress and busy times."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meterflow.config import JobConfig
from meterflow.errors import JobSubmissionError
from meterflow.local import flink_jobs
from meterflow.local.base import REPO_ROOT
from meterflow.local.flink import FlinkCluster, flink_home

BENCH_JOBS = Path(__file__).resolve().parent / "jobs"
_JOB_ID = re.compile(r"JobID ([0-9a-f]{32})")


def submit_script(cfg: JobConfig, script: Path, args: Sequence[str], timeout: float = 240) -> str:
    """``flink run -d -py script args`` against the cluster; wait until every task runs; return the job id."""
    cluster = FlinkCluster(cfg)
    cmd = [
        str(flink_home() / "bin" / "flink"),
        "run",
        "-d",
        "-m",
        f"{cfg.flink.rest_host}:{cfg.flink.rest_port}",
        "-py",
        str(script),
        *args,
    ]
    r = subprocess.run(
        cmd, env=cluster.env(), capture_output=True, text=True, check=False, cwd=REPO_ROOT, timeout=timeout
    )
    match = _JOB_ID.search(r.stdout + r.stderr)
    if r.returncode or not match:
        lines = [ln for ln in (r.stdout + r.stderr).strip().splitlines() if not ln.lstrip().startswith("at ")]
        msg = f"flink run {script.name} failed (exit {r.returncode}):\n" + "\n".join(lines[-40:])
        raise JobSubmissionError(msg)
    job_id = match.group(1)
    flink_jobs.wait_running(cfg, job_id, timeout)
    return job_id


def source_vertices(cfg: JobConfig, job_id: str) -> list[dict[str, Any]]:
    """The job's vertices that contain a source operator."""
    return [v for v in flink_jobs.job_details(cfg, job_id)["vertices"] if v["name"].startswith("Source:")]


class SourceProgress:
    """Records emitted by the job's Kafka sources (``Source__*.numRecordsOut`` summed over subtasks).

    A job that reads the topic through several source vertices has consumed what its slowest
    source has, so progress is the minimum over source vertices.
    """

    def __init__(self, cfg: JobConfig, job_id: str, total: int) -> None:
        self.cfg, self.job_id, self.total = cfg, job_id, total
        self.metric_ids: dict[str, str] = {}
        self.vertices = [v["id"] for v in source_vertices(cfg, job_id)]

    def _metric_id(self, vertex: str) -> str | None:
        if vertex not in self.metric_ids:
            names = [
                m["id"] for m in flink_jobs.rest(self.cfg, f"/jobs/{self.job_id}/vertices/{vertex}/subtasks/metrics")
            ]
            found = [n for n in names if n.startswith("Source__") and n.endswith(".numRecordsOut")]
            if not found:
                return None
            self.metric_ids[vertex] = found[0]
        return self.metric_ids[vertex]

    def __call__(self) -> int:
        """Records consumed so far (``total`` once the job has finished reading a bounded source)."""
        counts = []
        for vertex in self.vertices:
            metric = self._metric_id(vertex)
            if metric is None:
                return 0
            values = flink_jobs.rest(
                self.cfg, f"/jobs/{self.job_id}/vertices/{vertex}/subtasks/metrics?get={metric}&agg=sum"
            )
            if not values:
                if flink_jobs.job_details(self.cfg, self.job_id)["state"] == "FINISHED":
                    return self.total
                return 0
            counts.append(int(float(values[0].get("sum", 0))))
        return min(counts) if counts else 0


PROFILE_METRICS = ("busyTimeMsPerSecond", "backPressuredTimeMsPerSecond", "idleTimeMsPerSecond")


def vertex_profile(cfg: JobConfig, job_id: str) -> dict[str, dict[str, float]]:
    """Per vertex name: busy, back-pressured and idle ms per second, averaged over its subtasks."""
    result: dict[str, dict[str, float]] = {}
    for v in flink_jobs.job_details(cfg, job_id)["vertices"]:
        values = flink_jobs.rest(
            cfg, f"/jobs/{job_id}/vertices/{v['id']}/subtasks/metrics?get={','.join(PROFILE_METRICS)}&agg=avg"
        )
        row = {}
        for item in values:
            try:
                row[item["id"]] = float(item["avg"])
            except (KeyError, ValueError):
                continue
        result[v["name"]] = row
    return result


def taskmanager_pids(cfg: JobConfig) -> list[int]:
    """PIDs of the cluster's TaskManager JVMs."""
    return FlinkCluster(cfg).taskmanager_pids()
