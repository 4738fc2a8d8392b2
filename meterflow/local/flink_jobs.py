"""Submit, watch and stop meterflow's jobs on the Flink session cluster (flink CLI + REST API).

Two jobs: the usage job (jobs/usage_job.py) and, with ``billing.enabled``, the billing job
(jobs/billing_job.py), which reads the usage job's closed-windows topic.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from meterflow.config import JobConfig
from meterflow.errors import JobSubmissionError
from meterflow.local.base import REPO_ROOT
from meterflow.local.flink import FlinkCluster, flink_home

JOB_SCRIPT = REPO_ROOT / "jobs" / "usage_job.py"
BILLING_JOB_SCRIPT = REPO_ROOT / "jobs" / "billing_job.py"
_JOB_ID = re.compile(r"JobID ([0-9a-f]{32})")


def rest(cfg: JobConfig, path: str, method: str = "GET", body: dict | None = None) -> Any:
    """Call the JobManager's REST API at ``path``; the decoded JSON answer (JobSubmissionError on failure)."""
    cluster = FlinkCluster(cfg)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"{cluster.rest_url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        msg = f"Flink REST {method} {path} failed: {e.code} {e.read().decode(errors='replace')[:500]}"
        raise JobSubmissionError(msg) from e
    except (urllib.error.URLError, OSError) as e:
        msg = f"Flink REST API at {cluster.rest_url} not reachable: {e}; is the stack up?"
        raise JobSubmissionError(msg) from e


def list_jobs(cfg: JobConfig) -> list[dict[str, Any]]:
    """Jobs known to the cluster with their name and state."""
    return rest(cfg, "/jobs/overview").get("jobs", [])


def running_jobs(cfg: JobConfig, name: str | None = None) -> list[dict[str, Any]]:
    """Jobs in a non-terminal state, optionally only those with the given name."""
    active = {"CREATED", "RUNNING", "RESTARTING", "INITIALIZING", "RECONCILING", "FAILING", "CANCELLING"}
    return [j for j in list_jobs(cfg) if j["state"] in active and (name is None or j["name"] == name)]


def job_details(cfg: JobConfig, job_id: str) -> dict[str, Any]:
    """REST job details (state, vertices)."""
    return rest(cfg, f"/jobs/{job_id}")


def job_names(cfg: JobConfig) -> list[str]:
    """The names of the jobs this config runs: the usage job, and the billing job when billing is enabled."""
    return [cfg.flink.job_name, *([cfg.billing_job_name] if cfg.billing.enabled else [])]


def check_input_topics(cfg: JobConfig) -> None:
    """Refuse to start the usage job on topics that let a producer's clock bound event times or
    cannot hold its dead letters (connectors/topics.py ``topic_problems``): JobSubmissionError saying what to run."""
    from connectors.kafka_admin import describe_topic_configs
    from connectors.topics import MAX_MESSAGE_BYTES, TIMESTAMP_TYPE, topic_problems

    k = cfg.kafka
    try:
        actual = describe_topic_configs(
            k.bootstrap_servers,
            {k.usage_events_topic: (TIMESTAMP_TYPE, MAX_MESSAGE_BYTES), k.dead_letter_topic: (MAX_MESSAGE_BYTES,)},
        )
    except Exception as e:
        msg = f"cannot read the configs of topics {k.usage_events_topic} and {k.dead_letter_topic} from Kafka at {k.bootstrap_servers}: {type(e).__name__}: {e}"
        raise JobSubmissionError(msg) from e
    problems = topic_problems(cfg, actual)
    if problems:
        msg = "the usage job is not submitted:\n" + "\n".join(f"- {p}" for p in problems)
        raise JobSubmissionError(msg)


def check_transaction_timeout(cfg: JobConfig) -> None:
    """Refuse jobs whose Kafka producers the brokers would refuse (connectors/topics.py ``transaction_timeout_problem``)."""
    from connectors.kafka_admin import broker_transaction_max_timeout_ms
    from connectors.topics import transaction_timeout_problem

    try:
        broker_max = broker_transaction_max_timeout_ms(cfg.kafka.bootstrap_servers)
    except Exception as e:
        msg = f"cannot read transaction.max.timeout.ms from Kafka at {cfg.kafka.bootstrap_servers}: {type(e).__name__}: {e}"
        raise JobSubmissionError(msg) from e
    problem = transaction_timeout_problem(cfg, broker_max)
    if problem:
        msg = f"no job is submitted: {problem}"
        raise JobSubmissionError(msg)


def slot_needs(cfg: JobConfig) -> dict[str, int]:
    """Task slots each of this config's jobs takes on a session cluster: its parallelism (operators share slots)."""
    needs = {"the usage job (flink.parallelism)": cfg.flink.parallelism}
    if cfg.billing.enabled:
        needs["the billing job (billing.parallelism, default flink.parallelism)"] = cfg.billing_parallelism
    return needs


def slot_shortfall(needs: dict[str, int], slots_total: int) -> str | None:
    """Why the jobs can never all run on a cluster of ``slots_total`` task slots, or None when they fit.

    A cluster that has no TaskManager yet (0 slots: one that starts them on demand, or still
    starting) is not judged: Flink waits for slots there.
    """
    wanted = sum(needs.values())
    if slots_total == 0 or wanted <= slots_total:
        return None
    parts = " and ".join(f"{name} {n}" for name, n in needs.items())
    return (
        f"the cluster has {slots_total} task slots and the jobs need {wanted} ({parts}): raise flink.task_slots"
        " (the local stack's TaskManager: `meterflow stack down`, then `meterflow stack up`) or add TaskManagers, or lower the parallelism"
    )


def check_slots(cfg: JobConfig) -> None:
    """Refuse to submit jobs that can never all get a task slot (slot_shortfall): JobSubmissionError saying what to change."""
    problem = slot_shortfall(slot_needs(cfg), int(rest(cfg, "/overview").get("slots-total", 0)))
    if problem:
        msg = f"no job is submitted: {problem}"
        raise JobSubmissionError(msg)


def submit_billing(cfg: JobConfig, config_path: Path, *, savepoint: str | None = None, timeout: float = 180) -> str:
    """``flink run -d -py jobs/billing_job.py``; wait until all its tasks run."""
    return submit(cfg, config_path, savepoint=savepoint, timeout=timeout, script=BILLING_JOB_SCRIPT)


def submit(
    cfg: JobConfig,
    config_path: Path,
    *,
    savepoint: str | None = None,
    timeout: float = 180,
    script: Path = JOB_SCRIPT,
    handover: Path | None = None,
) -> str:
    """``flink run -d -py jobs/usage_job.py`` (or ``script``) against the session cluster; wait until all tasks run.

    ``handover``: the usage job's handover file (meterflow/handover.py), passed on to it."""
    cluster = FlinkCluster(cfg)
    args = [str(flink_home() / "bin" / "flink"), "run", "-d", "-m", f"{cfg.flink.rest_host}:{cfg.flink.rest_port}"]
    if savepoint:
        args += ["-s", savepoint]
    args += ["-py", str(script), "--config", str(config_path)]
    if handover is not None:
        args += ["--handover", str(handover)]
    r = subprocess.run(
        args, env=cluster.env(), capture_output=True, text=True, check=False, cwd=REPO_ROOT, timeout=timeout
    )
    match = _JOB_ID.search(r.stdout + r.stderr)
    if r.returncode or not match:
        # The Python driver's own error matters; Java stack frames only bury it.
        lines = [
            ln
            for ln in (r.stdout + r.stderr).strip().splitlines()
            if not ln.lstrip().startswith("at ") and "... " not in ln
        ]
        tail = "\n".join(lines[-30:])
        msg = f"flink run failed (exit {r.returncode}):\n{tail}"
        raise JobSubmissionError(msg)
    job_id = match.group(1)
    wait_running(cfg, job_id, timeout)
    return job_id


def wait_running(cfg: JobConfig, job_id: str, timeout: float = 180) -> None:
    """Wait until the job and every one of its tasks is RUNNING."""
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        details = job_details(cfg, job_id)
        state = details["state"]
        if state in ("FAILED", "CANCELED", "FINISHED"):
            msg = f"job {job_id} is {state}; see the JobManager log in {FlinkCluster(cfg).log_dir}"
            raise JobSubmissionError(msg)
        if state == "RUNNING" and all(v["status"] == "RUNNING" for v in details.get("vertices", [])):
            return
        time.sleep(1)
    waiting = [v["name"] for v in job_details(cfg, job_id).get("vertices", []) if v["status"] != "RUNNING"]
    overview = rest(cfg, "/overview")
    msg = (
        f"job {job_id} not running after {timeout:.0f}s (state {state}): {len(waiting)} tasks not running yet"
        f" ({', '.join(waiting[:3])}{', ...' if len(waiting) > 3 else ''}); the cluster has {overview.get('taskmanagers', '?')} TaskManagers"
        f" and {overview.get('slots-available', '?')} of {overview.get('slots-total', '?')} task slots free. Tasks without a slot wait for one: see flink.task_slots and the parallelism,"
        f" and the JobManager log in {FlinkCluster(cfg).log_dir}"
    )
    raise JobSubmissionError(msg)


def cancel(cfg: JobConfig, job_id: str, timeout: float = 60) -> None:
    """Cancel a job and wait until it is gone."""
    rest(cfg, f"/jobs/{job_id}?mode=cancel", method="PATCH")
    _wait_terminal(cfg, job_id, timeout)


def stop_with_savepoint(cfg: JobConfig, job_id: str, timeout: float = 180) -> str:
    """Stop the job with a savepoint (the upgrade path) into its state directory's ``savepoints/``
    (meterflow/retained_state.py), where a later submit finds it; return the savepoint path."""
    target = f"{cfg.job_state_uri(job_details(cfg, job_id)['name'])}/savepoints"
    trigger = rest(cfg, f"/jobs/{job_id}/stop", method="POST", body={"drain": False, "targetDirectory": target})
    request_id = trigger["request-id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = rest(cfg, f"/jobs/{job_id}/savepoints/{request_id}")
        if status["status"]["id"] == "COMPLETED":
            op = status.get("operation", {})
            if "failure-cause" in op:
                msg = f"savepoint failed: {op['failure-cause'].get('stack-trace', '')[:2000]}"
                raise JobSubmissionError(msg)
            _wait_terminal(cfg, job_id, timeout)
            return op["location"]
        time.sleep(1)
    msg = f"savepoint of {job_id} not complete after {timeout:.0f}s"
    raise JobSubmissionError(msg)


def completed_checkpoints(cfg: JobConfig, job_id: str) -> int:
    """How many checkpoints of the job have completed."""
    return int(rest(cfg, f"/jobs/{job_id}/checkpoints")["counts"]["completed"])


def checkpoint_stats(cfg: JobConfig, job_id: str) -> dict[str, Any]:
    """The REST checkpoint statistics of a job (counts, latest completed/restored, recent history)."""
    return rest(cfg, f"/jobs/{job_id}/checkpoints")


def restarts(cfg: JobConfig, job_id: str) -> int:
    """How often the job restarted after a failure (Flink's ``numRestarts`` job metric)."""
    metrics = rest(cfg, f"/jobs/{job_id}/metrics?get=numRestarts")
    return int(next((m["value"] for m in metrics if m["id"] == "numRestarts"), 0))


def _wait_terminal(cfg: JobConfig, job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job_details(cfg, job_id)["state"] in ("CANCELED", "FINISHED", "FAILED"):
            return
        time.sleep(0.5)
    msg = f"job {job_id} did not stop within {timeout:.0f}s"
    raise JobSubmissionError(msg)
