"""The local stack's Flink: a standalone session cluster (one JobManager, one TaskManager) from the apache-flink wheel.

With ``stack.high_availability: zookeeper`` the JobManager keeps its leadership, the submitted jobs and
their completed checkpoints in the stack's ZooKeeper and HA directory: a JobManager started after
one was lost recovers every running job, under the same id, from its last completed checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from meterflow.config import JobConfig
from meterflow.config_values import parse_port_range
from meterflow.errors import PortInUseError, StackError
from meterflow.local.base import (
    REPO_ROOT,
    ComponentStatus,
    pid_alive,
    port_open,
    proc_running,
    require_free,
    require_jars,
    stop_pid,
    wait_until,
)
from meterflow.local.supervisor_log import replacements
from meterflow.local.zookeeper import ZooKeeperServer, ha_cluster_id
from meterflow.metrics_conf import flink_reporter_conf

FLINK_CONNECTOR_JARS = REPO_ROOT / "third_party" / "flink-lib" / "target" / "dependency"
FLINK_CONF_TEMPLATE = REPO_ROOT / "flink-conf" / "config.yaml"
JVM_JAR_DIR = REPO_ROOT / "jvm" / "target"


def table_jobs_jars() -> list[Path]:
    """The jars a Flink table environment of this process needs for the usage source: the project's
    JVM code (the meterflow-avro format), the Avro library it builds on, and the Kafka SQL connector."""
    return [
        *sorted(JVM_JAR_DIR.glob("*.jar")),
        *sorted(FLINK_CONNECTOR_JARS.glob("flink-sql-avro-*.jar")),
        *sorted(FLINK_CONNECTOR_JARS.glob("flink-sql-connector-kafka-*.jar")),
    ]


def flink_home() -> Path:
    """The Flink distribution shipped inside the apache-flink wheel."""
    import pyflink

    return Path(pyflink.__file__).resolve().parent


def render_flink_conf(base: dict, overrides: dict[str, object]) -> dict:
    """Apply dotted-key overrides to a nested Flink config mapping (returns a new mapping)."""
    result = json.loads(json.dumps(base))
    for dotted, value in overrides.items():
        node = result
        parts = dotted.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[parts[-1]] = value
    return result


class FlinkCluster:
    """A standalone Flink session cluster (one JobManager, one TaskManager) on this machine."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.state_dir / "flink"
        self.conf_dir = self.dir / "conf"
        self.lib_dir = self.dir / "lib"
        self.log_dir = self.dir / "log"

    @property
    def rest_url(self) -> str:
        """Base URL of the JobManager's REST API."""
        return f"http://{self.cfg.flink.rest_host}:{self.cfg.flink.rest_port}"

    def env(self) -> dict[str, str]:
        """Environment for Flink's scripts and the ``flink`` client: our conf and lib directories."""
        return cluster_env(self.dir)

    def config(self) -> dict:
        """The cluster's config.yaml: flink-conf/config.yaml with this machine's addresses, ports and directories."""
        f = self.cfg.flink
        return render_flink_conf(
            yaml.safe_load(FLINK_CONF_TEMPLATE.read_text()),
            {
                "jobmanager.bind-host": f.rest_host,
                "jobmanager.rpc.address": f.rest_host,
                "jobmanager.rpc.port": self.cfg.stack.flink_rpc_port,
                "taskmanager.bind-host": f.rest_host,
                "taskmanager.host": f.rest_host,
                "taskmanager.numberOfTaskSlots": f.task_slots,
                "rest.address": f.rest_host,
                "rest.bind-address": f.rest_host,
                "rest.port": f.rest_port,
                "execution.checkpointing.dir": self.cfg.checkpoint_uri(),
                "execution.checkpointing.savepoint-dir": (self.dir / "savepoints").as_uri(),
                "python.executable": sys.executable,
                "python.client.executable": sys.executable,
                "env.log.dir": str(self.log_dir),
                "env.pid.dir": str(self.dir / "pid"),
                # Working files (RocksDB's local state, Python environments) live with the stack;
                # `down` removes what a killed TaskManager could not.
                "io.tmp.dirs": str(self.dir / "tmp"),
                # Every JobManager and TaskManager serves its metrics to Prometheus on loopback.
                **flink_reporter_conf(self.cfg.stack.flink_metrics_ports),
                **self.ha_config(),
            },
        )

    def ha_config(self) -> dict[str, object]:
        """High availability through the stack's ZooKeeper, or none (``stack.high_availability``)."""
        if self.cfg.stack.high_availability == "none":
            return {"high-availability.type": "NONE"}
        return {
            "high-availability.type": "zookeeper",
            "high-availability.zookeeper.quorum": ZooKeeperServer(self.cfg).quorum,
            # Job graphs and checkpoint metadata; ZooKeeper holds only pointers to these files.
            "high-availability.storageDir": (self.dir / "ha").as_uri(),
            # Per stack, so two stacks never share ZooKeeper paths or HA files.
            "high-availability.cluster-id": ha_cluster_id(self.cfg.state_dir),
            # With HA the JobManager's RPC port comes from this key (random by default): keep stack.flink_rpc_port.
            "high-availability.jobmanager.port": str(self.cfg.stack.flink_rpc_port),
            # A killed JobManager's leadership ends when its ZooKeeper session expires (60 s by default):
            # the new one takes over this much later.
            "high-availability.zookeeper.client.session-timeout": "10 s",
            # A suspended connection (a stall of this machine, ZooKeeper busy) is not a lost leadership:
            # only an expired session restarts the jobs.
            "high-availability.zookeeper.client.tolerate-suspended-connections": "true",
        }

    def prepare(self) -> None:
        """Write conf/ (flink-conf/config.yaml + local overrides) and lib/ (distribution + connector jars)."""
        home = flink_home()
        for d in (self.conf_dir, self.lib_dir, self.log_dir, self.dir / "pid", self.dir / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        f = self.cfg.flink
        conf = self.config()
        (self.conf_dir / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
        for name in (
            "log4j.properties",
            "log4j-console.properties",
            "log4j-cli.properties",
            "log4j-session.properties",
            "logback.xml",
        ):
            if (home / "conf" / name).exists():
                shutil.copy(home / "conf" / name, self.conf_dir / name)
        (self.conf_dir / "masters").write_text(f"{f.rest_host}:{f.rest_port}\n")
        (self.conf_dir / "workers").write_text(f"{f.rest_host}\n")
        for old in self.lib_dir.glob("*.jar"):
            old.unlink()
        jars = [
            *sorted((home / "lib").glob("*.jar")),
            *require_jars(FLINK_CONNECTOR_JARS, "Flink connector"),
            *require_jars(JVM_JAR_DIR, "meterflow JVM"),
        ]
        for jar in jars:
            (self.lib_dir / jar.name).symlink_to(jar)

    def overview(self) -> dict | None:
        """The REST /overview document, or None when the JobManager does not answer."""
        return cluster_overview(self.rest_url)

    def running(self) -> bool:
        """JobManager answers and at least one TaskManager is registered."""
        ov = self.overview()
        return bool(ov and ov.get("taskmanagers", 0) >= 1)

    def up(self) -> None:
        """Start JobManager and TaskManager with start-cluster.sh; wait for a registered TaskManager.

        A JobManager whose TaskManager is gone (crashed, or shut down by Flink's task-cancellation
        watchdog) gets a new TaskManager, as a process supervisor would start one in production.
        A TaskManager whose JobManager is gone gets a new JobManager; with HA on it recovers the jobs.
        """
        if self.running():
            self.start_supervisor()
            return
        if self.overview() is None and not self.jobmanager_pids() and self.taskmanager_pids():
            # The JobManager was lost and its TaskManager lives: a new JobManager only (the TaskManager registers with it).
            if self.cfg.stack.high_availability == "zookeeper":
                print(
                    "Flink TaskManager has no JobManager: starting one, which recovers the running jobs",
                    file=sys.stderr,
                )
            else:
                print(
                    "Flink TaskManager has no JobManager: starting one; without high availability the jobs it ran are gone:"
                    " `meterflow submit` restores them from their newest retained checkpoints",
                    file=sys.stderr,
                )
            require_free(self.cfg.flink.rest_host, self.cfg.flink.rest_port, "the Flink REST API", "flink.rest_port")
            self.start_jobmanager()
            wait_until(self.running, "Flink JobManager", 120, self.log_dir)
            self.start_supervisor()
            return
        if self.overview() is not None:
            # Now, not after the supervisor's delay: the supervisor is stopped meanwhile so that only one starts.
            print("Flink JobManager has no TaskManager: starting one", file=sys.stderr)
            self.stop_supervisor()
            if not self.taskmanager_pids():
                self.start_taskmanager()
            wait_until(self.running, "Flink TaskManager", 120, self.log_dir)
            self.start_supervisor()
            return
        f = self.cfg.flink
        require_free(f.rest_host, f.rest_port, "the Flink REST API", "flink.rest_port")
        require_free(f.rest_host, self.cfg.stack.flink_rpc_port, "the Flink JobManager RPC", "stack.flink_rpc_port")
        metrics_ports = parse_port_range(self.cfg.stack.flink_metrics_ports)
        if sum(not port_open("127.0.0.1", p) for p in metrics_ports) < 2:
            msg = f"fewer than 2 free ports in stack.flink_metrics_ports ({self.cfg.stack.flink_metrics_ports}) for the JobManager's and TaskManager's metrics; free them or change the range"
            raise PortInUseError(msg)
        self.prepare()
        r = subprocess.run(
            ["bash", str(flink_home() / "bin" / "start-cluster.sh")],
            env=self.env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode:
            msg = f"start-cluster.sh failed: {r.stderr.strip() or r.stdout.strip()}"
            raise StackError(msg)
        wait_until(self.running, "Flink cluster", 120, self.log_dir)
        self.start_supervisor()

    @property
    def supervisor_pid_file(self) -> Path:
        """Where the TaskManager supervisor (meterflow/local/supervisor.py) keeps its pid."""
        return self.dir / "pid" / "supervisor.pid"

    @property
    def supervisor_log(self) -> Path:
        """The supervisor's log: one line per TaskManager it replaced."""
        return self.log_dir / "supervisor.log"

    def start_supervisor(self) -> None:
        """Start the detached TaskManager supervisor unless it runs."""
        if pid_alive(self.supervisor_pid_file):
            return
        delay = self.cfg.stack.taskmanager_restart_delay.total_seconds()
        args = [
            sys.executable,
            "-m",
            "meterflow.local.supervisor",
            "--flink-dir",
            str(self.dir),
            "--rest-url",
            self.rest_url,
            "--delay",
            f"{delay:g}",
        ]
        with self.supervisor_log.open("a") as log:
            proc = subprocess.Popen(
                args, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self.supervisor_pid_file.write_text(f"{proc.pid}\n")

    def stop_supervisor(self) -> None:
        """Stop the supervisor, so that a TaskManager stopped next stays stopped."""
        stop_pid(self.supervisor_pid_file, "the TaskManager supervisor", timeout=10)

    def start_taskmanager(self) -> None:
        """Start one more TaskManager (after one was lost)."""
        start_taskmanager(self.dir)

    def start_jobmanager(self) -> None:
        """Start a JobManager (after one was lost); with HA it recovers the running jobs, on the same REST port."""
        subprocess.run(
            ["bash", str(flink_home() / "bin" / "jobmanager.sh"), "start"],
            env=self.env(),
            capture_output=True,
            check=True,
        )

    def taskmanager_pids(self) -> list[int]:
        """PIDs of this cluster's running TaskManager JVMs (exited ones are skipped)."""
        return taskmanager_pids(self.dir)

    def jobmanager_pids(self) -> list[int]:
        """PIDs of this cluster's running JobManager JVMs (exited ones are skipped)."""
        return _pids(self.dir, "*standalonesession*.pid", b"StandaloneSessionClusterEntrypoint")

    def down(self) -> None:
        """Stop the cluster (cancels nothing; running jobs stop with it).

        stop-cluster.sh stops one TaskManager per worker entry; a TaskManager started later
        (replacing a lost one) is stopped here too, so nothing is left running.
        """
        if not self.conf_dir.exists():
            return
        self.stop_supervisor()
        subprocess.run(
            ["bash", str(flink_home() / "bin" / "stop-cluster.sh")], env=self.env(), capture_output=True, check=False
        )
        for pid in self.taskmanager_pids() + self.jobmanager_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while (self.taskmanager_pids() or self.jobmanager_pids()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in self.taskmanager_pids() + self.jobmanager_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Python workers of a TaskManager that was killed outlive it (re-parented to init).
        for pid in self.python_workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: not port_open(self.cfg.flink.rest_host, self.cfg.flink.rest_port),
            "Flink shutdown",
            60,
            self.log_dir,
        )
        # Working files a killed TaskManager left behind (RocksDB's local state, Python environments):
        # the job's state lives in its checkpoints, never here.
        shutil.rmtree(self.dir / "tmp", ignore_errors=True)

    def python_workers(self) -> list[int]:
        """PIDs of this cluster's PyFlink worker processes (runner scripts and Python workers)."""
        marker = f"FLINK_CONF_DIR={self.conf_dir}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                worker = "pyflink" in (proc / "cmdline").read_text(errors="replace")
                if worker and marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except (OSError, IndexError):
                continue  # gone meanwhile, or not ours to read
        return pids

    def status(self) -> ComponentStatus:
        """Running state, address and job counts; a lost JobManager or TaskManager is named with what to run."""
        ov = self.overview()
        if ov is None:
            lost = self.taskmanager_pids() and not self.jobmanager_pids()
            after = (
                "which recovers the jobs"
                if self.cfg.stack.high_availability == "zookeeper"
                else "then `meterflow submit` restores the jobs"
            )
            detail = (
                f"JobManager lost, TaskManager running: `meterflow stack up` starts a JobManager, {after}"
                if lost
                else ""
            )
        else:
            supervised = pid_alive(self.supervisor_pid_file) is not None
            if not ov.get("taskmanagers"):
                delay = f"{self.cfg.stack.taskmanager_restart_delay.total_seconds():g}s"
                detail = (
                    f"no TaskManager registered: the stack's supervisor starts one {delay} after it was lost"
                    if supervised
                    else "no TaskManager registered: `meterflow stack up` starts one"
                )
            else:
                detail = f"taskmanagers={ov.get('taskmanagers', 0)} slots={ov.get('slots-total', 0)} running_jobs={ov.get('jobs-running', 0)}"
                if not supervised:
                    detail += "; the TaskManager supervisor is not running: `meterflow stack up` starts it"
            replaced = replacements(self.supervisor_log)
            if replaced:
                detail += f"; the supervisor replaced {len(replaced)} lost TaskManager(s), the last at {replaced[-1].isoformat()} (see {self.supervisor_log})"
        return ComponentStatus("flink", self.running(), self.rest_url, detail)


def cluster_overview(rest_url: str) -> dict | None:
    """The JobManager's REST /overview document, or None when it does not answer."""
    try:
        with urllib.request.urlopen(f"{rest_url}/overview", timeout=2) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def cluster_env(flink_dir: Path) -> dict[str, str]:
    """Environment for Flink's scripts and the ``flink`` client of the cluster kept in ``flink_dir``."""
    env = dict(os.environ)
    env.update(
        FLINK_HOME=str(flink_home()), FLINK_CONF_DIR=str(flink_dir / "conf"), FLINK_LIB_DIR=str(flink_dir / "lib")
    )
    return env


def start_taskmanager(flink_dir: Path) -> None:
    """Start one TaskManager of the cluster kept in ``flink_dir`` (taskmanager.sh, as an operator would)."""
    (flink_dir / "tmp").mkdir(parents=True, exist_ok=True)
    # A session of its own: stopping the supervisor that started it (a signal to its process group) leaves it running.
    subprocess.run(
        ["bash", str(flink_home() / "bin" / "taskmanager.sh"), "start"],
        env=cluster_env(flink_dir),
        capture_output=True,
        check=True,
        start_new_session=True,
    )


def taskmanager_pids(flink_dir: Path) -> list[int]:
    """PIDs of the running TaskManager JVMs of the cluster kept in ``flink_dir``."""
    return _pids(flink_dir, "*taskexecutor*.pid", b"TaskManagerRunner")


def _pids(flink_dir: Path, pattern: str, main_class: bytes) -> list[int]:
    pids = []
    for pid_file in (flink_dir / "pid").glob(pattern):
        for token in pid_file.read_text().split():
            # A pid file outlives its process and pids are reused: check it is still that kind of JVM.
            if token.isdigit() and proc_running(int(token)) and _runs(int(token), main_class):
                pids.append(int(token))
    return pids


def _runs(pid: int, main_class: bytes) -> bool:
    """Whether the process is a JVM running that Flink main class."""
    try:
        return main_class in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
