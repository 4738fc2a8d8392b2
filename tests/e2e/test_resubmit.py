"""Resubmitting after the job is gone restores its newest retained state: a JobManager ``kill -9``
on a cluster without high availability, and a cancel (``meterflow stop`` without a savepoint); and a
job gone for longer than its Kafka transaction timeout.

Both strike with late, boundary, duplicate and malformed records in flight and send more while no
job runs. The operator then does what docs/operations.md says ("JobManager lost", "Stopping and
resubmitting"): ``meterflow stack up`` where the JobManager was lost, then ``meterflow submit``,
which finds the newest retained checkpoint of the job and restores it (the REST API shows the new
job restored exactly that path). The billing-semantics checks follow: the accounting identity,
exact windows, the exact late set, every row final. Without the restore the new job would start
from empty state: counted events of open windows lost, duplicates counted again, closed windows'
late events counted nowhere.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from meterflow.commands import cli
from meterflow.config import JobConfig
from meterflow.local import flink_jobs
from meterflow.local.flink import FlinkCluster
from meterflow.local.stack import StackConfigs
from tests.e2e.conftest import running_stack
from tests.e2e.helpers import wait_for
from tests.e2e.test_billing_semantics import Fault, kill_taskmanager, run_scenario

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Flink without high availability; the supervisor waits a minute before it replaces a lost TaskManager:
# long enough to outlive the short transactions below.
NO_HA = {"high_availability": "none", "taskmanager_restart_delay": "60s"}
_RESTORING = re.compile(r"restoring its newest checkpoint (\S+) \(taken")


@pytest.fixture(scope="module")
def stack_without_ha(tmp_path_factory, request) -> Iterator[StackConfigs]:
    """A stack of its own whose Flink runs without high availability: a lost JobManager loses its jobs."""
    with running_stack(tmp_path_factory.mktemp("stack-no-ha"), request, stack=NO_HA) as stack:
        yield stack


def meterflow_command(path: Path, *args: str) -> str:
    """Run a meterflow command as the operator would; its output (it must succeed)."""
    result = CliRunner().invoke(cli, ["--config", str(path), *args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


def _resubmit(cfg: JobConfig, path: Path, old_job_id: str) -> str:
    """``meterflow submit``: it restores the newest retained checkpoint, which the killed or cancelled job wrote; the new job's id."""
    job_dir = cfg.path(cfg.flink.checkpoint_dir) / cfg.flink.job_name
    newest = max(job_dir.glob(f"{old_job_id}/chk-*/_metadata"), key=lambda m: int(m.parent.name.removeprefix("chk-")))
    output = meterflow_command(path, "submit").replace("\n", "")  # the console wraps long paths
    restoring = _RESTORING.search(output)
    assert restoring, output
    assert Path(restoring.group(1)) == newest.parent, (output, newest)
    new_job = flink_jobs.running_jobs(cfg, cfg.flink.job_name)[0]["jid"]
    assert new_job != old_job_id

    def restored() -> dict:
        # The REST checkpoint statistics are a cache: the restore shows once it is refreshed.
        return (flink_jobs.checkpoint_stats(cfg, new_job).get("latest") or {}).get("restored") or {}

    wait_for(lambda: "external_path" in restored(), 30, "the restore in the new job's checkpoint statistics")
    assert Path(restored()["external_path"].removeprefix("file:")) == newest.parent, restored()
    return new_job


def kill_jobmanager_then_resubmit(cfg: JobConfig, path: Path, job_id: str, during: Callable[[], None]) -> Fault:
    """kill -9 the JobManager (its jobs are gone without HA); send records meanwhile; the runbook: stack up, submit."""
    cluster = FlinkCluster(cfg)
    wait_for(lambda: flink_jobs.completed_checkpoints(cfg, job_id) >= 1, 60, "a completed checkpoint to resume from")
    jobmanagers, taskmanagers = cluster.jobmanager_pids(), cluster.taskmanager_pids()
    assert len(jobmanagers) == 1 and taskmanagers, (jobmanagers, taskmanagers)
    killed_at = int(time.time() * 1000)
    os.kill(jobmanagers[0], signal.SIGKILL)
    wait_for(lambda: cluster.overview() is None, 30, "the JobManager's REST API to go away")
    during()
    meterflow_command(path, "stack", "up")
    assert flink_jobs.running_jobs(cfg, cfg.flink.job_name) == []  # no HA: the new JobManager knows no job
    assert (
        cluster.taskmanager_pids() == taskmanagers
    )  # only the JobManager was started; the TaskManager registered with it
    return Fault(_resubmit(cfg, path, job_id), killed_at, "restore-after-fault")


def cancel_then_resubmit(cfg: JobConfig, path: Path, job_id: str, during: Callable[[], None]) -> Fault:
    """``meterflow stop`` (a cancel, no savepoint); send records meanwhile; ``meterflow submit``."""
    wait_for(lambda: flink_jobs.completed_checkpoints(cfg, job_id) >= 1, 60, "a completed checkpoint to resume from")
    cancelled_at = int(time.time() * 1000)
    assert f"cancelled {job_id}" in meterflow_command(path, "stop")
    during()
    return Fault(_resubmit(cfg, path, job_id), cancelled_at, "restore-after-fault")


def test_jobmanager_killed_without_ha_and_resubmitted(stack_without_ha):
    """JobManager kill -9 on a cluster without HA: `meterflow stack up` + `meterflow submit` restore the newest retained checkpoint."""
    run_scenario(stack_without_ha, "jmresubmit", disrupt=kill_jobmanager_then_resubmit)


def test_cancelled_and_resubmitted(stack_without_ha):
    """`meterflow stop` without a savepoint, then `meterflow submit`: the retained checkpoint is restored, not empty state."""
    run_scenario(stack_without_ha, "cancelresubmit", disrupt=cancel_then_resubmit)


# A transaction timeout the test can outlive: the rule (kafka.transaction_timeout > flink.checkpoint_timeout) holds.
SHORT_TRANSACTIONS = {"kafka": {"transaction_timeout": "30s"}, "flink": {"checkpoint_timeout": "20s"}}


def taskmanager_gone_past_the_transaction_timeout(
    cfg: JobConfig, path: Path, job_id: str, during: Callable[[], None]
) -> Fault:
    """kill -9 every TaskManager; send records; the supervisor's replacement comes after Kafka has aborted
    the transactions the killed attempt left open (twice kafka.transaction_timeout)."""
    assert cfg.kafka.transaction_timeout.total_seconds() == 30
    assert cfg.stack.taskmanager_restart_delay.total_seconds() >= 2 * cfg.kafka.transaction_timeout.total_seconds()
    return kill_taskmanager(cfg, path, job_id, during)


def test_taskmanager_gone_longer_than_the_transaction_timeout(stack_without_ha):
    """No TaskManager for twice kafka.transaction_timeout: the restore commits nothing Kafka aborted, and every record is in one place."""
    run_scenario(
        stack_without_ha, "txtimeout", disrupt=taskmanager_gone_past_the_transaction_timeout, **SHORT_TRANSACTIONS
    )
