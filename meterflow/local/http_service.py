"""The local stack's HTTP service: ``meterflow serve`` on ``serve.host:serve.port`` (loopback), detached."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from meterflow.config import JobConfig
from meterflow.errors import StackError
from meterflow.local.base import REPO_ROOT, ComponentStatus, pid_alive, port_open, require_free, stop_pid, wait_until


class HttpService:
    """``meterflow serve`` for one config: ingest, the usage API and the usage page (README, "HTTP service")."""

    def __init__(self, cfg: JobConfig, config_path: Path | None) -> None:
        self.cfg, self.config_path = cfg, config_path
        self.dir = cfg.state_dir / "serve"
        self.pid_file = self.dir / "serve.pid"
        self.log = self.dir / "serve.log"

    @property
    def url(self) -> str:
        return f"http://{self.cfg.serve.host}:{self.cfg.serve.port}"

    @property
    def wanted(self) -> bool:
        """Started by ``stack up`` from a config file (a stack made in code has none to hand it)."""
        return self.config_path is not None

    def running(self) -> bool:
        return pid_alive(self.pid_file) is not None and port_open(self.cfg.serve.host, self.cfg.serve.port)

    def up(self) -> None:
        if self.running() or self.config_path is None:
            return
        require_free(self.cfg.serve.host, self.cfg.serve.port, "meterflow serve", "serve.port")
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-c", "from meterflow.commands import main; main()", "--config", str(self.config_path)]
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                [*args, "serve"],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        wait_until(
            lambda: port_open(self.cfg.serve.host, self.cfg.serve.port) or proc.poll() is not None,
            "meterflow serve",
            60,
            self.log,
        )
        if proc.poll() is not None:
            msg = f"meterflow serve exited with code {proc.returncode}; see {self.log}"
            raise StackError(msg)

    def down(self) -> None:
        stop_pid(self.pid_file, "meterflow serve", timeout=10)

    def status(self) -> ComponentStatus:
        detail = "" if self.wanted else "started by `stack up` with a config file"
        return ComponentStatus("meterflow serve", self.running(), self.url, detail, wanted=self.wanted)
