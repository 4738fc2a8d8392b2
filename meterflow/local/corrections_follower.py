"""The local stack's corrections follower: ``meterflow corrections apply --follow`` as a detached process.

``meterflow submit`` starts one per usage job it submits to the local stack (docker-compose and the
Kubernetes manifests run their own), so late events become corrections, and owed deliveries with
billing on, without anyone running a command::

    <state_dir>/corrections/<flink.job_name>.pid, <flink.job_name>.log

A follower that ended (an error, a kill) is started again by the next ``meterflow submit``; it
resumes after the last batch it committed, so no late event is applied twice. ``stack down`` stops
every follower of the state directory, ``stack status`` lists them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from meterflow.config import JobConfig
from meterflow.local.base import REPO_ROOT, ComponentStatus, pid_alive, stop_pid


def followers_dir(cfg: JobConfig) -> Path:
    return cfg.state_dir / "corrections"


class CorrectionsFollower:
    """The follower of one config's usage job."""

    def __init__(self, cfg: JobConfig, config_path: Path) -> None:
        self.cfg, self.config_path = cfg, config_path
        self.pid_file = followers_dir(cfg) / f"{cfg.flink.job_name}.pid"
        self.log = followers_dir(cfg) / f"{cfg.flink.job_name}.log"

    def running(self) -> bool:
        return pid_alive(self.pid_file) is not None

    def start(self) -> bool:
        """Start it unless it runs; True when started now."""
        if self.running():
            return False
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable,
            "-c",
            "from meterflow.commands import main; main()",
            "--config",
            str(self.config_path),
            "corrections",
            "apply",
            "--follow",
        ]
        with self.log.open("a") as log:
            proc = subprocess.Popen(
                args, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        return True

    def stop(self) -> None:
        stop_pid(self.pid_file, f"the corrections follower of {self.cfg.flink.job_name}", timeout=10)


def stop_all(cfg: JobConfig) -> None:
    """Stop every follower of the state directory (before the parts they read and write stop)."""
    for pid_file in sorted(followers_dir(cfg).glob("*.pid")):
        stop_pid(pid_file, f"the corrections follower of {pid_file.stem}", timeout=10)


def statuses(cfg: JobConfig) -> list[ComponentStatus]:
    """One line per follower of the state directory (running or not), for ``stack status``."""
    return [
        ComponentStatus(
            f"corrections follower ({pid_file.stem})",
            pid_alive(pid_file) is not None,
            "",
            f"log {pid_file.with_suffix('.log')}",
            wanted=False,
        )
        for pid_file in sorted(followers_dir(cfg).glob("*.pid"))
    ]
