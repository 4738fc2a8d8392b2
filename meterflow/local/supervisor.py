"""The local stack's TaskManager supervisor: a TaskManager that is gone is replaced, as systemd or
Kubernetes replace one in production, and every replacement is logged.

A TaskManager can end without anyone stopping it: killed (its machine lost, the OOM killer), or
exiting on a fatal error of its own (Flink ends the TaskManager when a task's cleanup fails, which
PyFlink's Python operators can do while a job is cancelled). Without a replacement the cluster has no
slot, so every job on it stops, metering included. ``meterflow stack up`` starts this supervisor
detached; ``meterflow stack down`` stops it before Flink, so a stopped TaskManager stays stopped.

It starts a replacement once no TaskManager process has run for ``stack.taskmanager_restart_delay``
while the JobManager answers (a lost JobManager is the operator's or high availability's, see
docs/operations.md). Each replacement is one line in ``<state_dir>/flink/log/supervisor.log``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from meterflow.local.supervisor_log import REPLACED


@dataclass(frozen=True)
class Watch:
    """What the supervisor knows between two looks: since when no TaskManager process has run (None: one runs)."""

    lost_since: float | None = None


def next_step(
    watch: Watch, taskmanager_running: bool, jobmanager_answers: bool, now: float, delay: float
) -> tuple[Watch, bool]:
    """The supervisor's rule: (what it knows next, whether to start a replacement now).

    A TaskManager process that runs (registered or still starting) ends a loss. A loss counts only
    while the JobManager answers, and a replacement starts once it has lasted ``delay`` seconds.
    """
    if taskmanager_running or not jobmanager_answers:
        return Watch(None), False
    lost_since = watch.lost_since if watch.lost_since is not None else now
    if now - lost_since >= delay:
        return Watch(None), True
    return Watch(lost_since), False


def supervise(
    taskmanager_running: Callable[[], bool],
    jobmanager_answers: Callable[[], bool],
    start_taskmanager: Callable[[], None],
    delay: float,
    log: Callable[[str], None],
    poll: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    keep_going: Callable[[], bool] = lambda: True,
) -> None:
    """Look every ``poll`` seconds and start a replacement when ``next_step`` says so."""
    watch = Watch()
    while keep_going():
        was_lost = watch.lost_since is not None
        watch, start = next_step(watch, taskmanager_running(), jobmanager_answers(), clock(), delay)
        if watch.lost_since is not None and not was_lost:
            log(f"no TaskManager running; starting a replacement in {delay:g}s unless one starts")
        if start:
            start_taskmanager()
            log(f"{REPLACED} (it was gone for at least {delay:g}s)")
        time.sleep(poll)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the detached supervisor process (``FlinkCluster.start_supervisor`` starts it)."""
    from meterflow.local.flink import cluster_overview, start_taskmanager, taskmanager_pids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--flink-dir", type=Path, required=True, help="the cluster's state directory (<state_dir>/flink)"
    )
    parser.add_argument("--rest-url", required=True, help="the JobManager's REST address")
    parser.add_argument(
        "--delay", type=float, required=True, help="seconds without a TaskManager before a replacement starts"
    )
    args = parser.parse_args(argv)
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))

    def log(message: str) -> None:
        print(f"{datetime.now(UTC).isoformat(timespec='seconds')} {message}", flush=True)

    log(f"supervising the TaskManager of {args.rest_url}")
    supervise(
        taskmanager_running=lambda: bool(taskmanager_pids(args.flink_dir)),
        jobmanager_answers=lambda: cluster_overview(args.rest_url) is not None,
        start_taskmanager=lambda: start_taskmanager(args.flink_dir),
        delay=args.delay,
        log=log,
        keep_going=lambda: running[0],
    )
    log("stopped")


if __name__ == "__main__":
    main(sys.argv[1:])
