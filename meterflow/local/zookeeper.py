"""The local stack's ZooKeeper: one standalone server on loopback, where Flink's high availability keeps
its leader election, the submitted job graphs and the pointers to their completed checkpoints.

Started before Flink and stopped after it, only while ``stack.high_availability`` is ``zookeeper``.
Its data outlives a restart of the stack, so a new JobManager finds the jobs that were running.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
from pathlib import Path

from meterflow.config import JobConfig
from meterflow.errors import StackError
from meterflow.local.base import (
    REPO_ROOT,
    ComponentStatus,
    free_ports,
    pid_alive,
    port_open,
    require_free,
    require_jars,
    stop_pid,
    wait_until,
)

ZOOKEEPER_JARS = REPO_ROOT / "third_party" / "zookeeper" / "target" / "dependency"
HOST = "127.0.0.1"
# Ticks of 2 s: sessions may last 4-40 s (2 and 20 ticks), so Flink's 10 s session can be granted.
TICK_MS = 2000


def ha_cluster_id(state_dir: Path) -> str:
    """Flink's high-availability.cluster-id for the stack in ``state_dir``: its own ZooKeeper paths and HA files.

    Stable for one state directory (a restarted stack finds its jobs), distinct for two (they never share a path).
    """
    return "/meterflow-" + hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]


def zoo_cfg(data_dir: Path, port: int) -> str:
    """zoo.cfg of a standalone server: loopback only, no admin HTTP server, old snapshots purged."""
    return "\n".join(
        [
            f"tickTime={TICK_MS}",
            f"dataDir={data_dir}",
            f"clientPort={port}",
            f"clientPortAddress={HOST}",
            # The admin server (Jetty, port 8080 on every interface by default) is not needed.
            "admin.enableServer=false",
            # srvr is the readiness probe.
            "4lw.commands.whitelist=srvr",
            "autopurge.snapRetainCount=3",
            "autopurge.purgeInterval=1",
            "",
        ]
    )


class ZooKeeperServer:
    """A standalone ZooKeeper (third_party/zookeeper/pom.xml) on 127.0.0.1."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.state_dir / "zookeeper"
        self.pid_file = self.dir / "zookeeper.pid"
        self.log = self.dir / "zookeeper.log"
        self._port: int | None = cfg.stack.zookeeper_port

    @property
    def wanted(self) -> bool:
        """Whether the config runs Flink with ZooKeeper high availability."""
        return self.cfg.stack.high_availability == "zookeeper"

    @property
    def port(self) -> int:
        """stack.zookeeper_port, or a free port chosen once for this state directory and kept in zookeeper/port."""
        if self._port is None:
            port_file = self.dir / "port"
            try:
                self._port = int(port_file.read_text().strip())
            except (OSError, ValueError):
                self.dir.mkdir(parents=True, exist_ok=True)
                self._port = free_ports(1)[0]
                port_file.write_text(f"{self._port}\n")
        return self._port

    @property
    def quorum(self) -> str:
        """Flink's high-availability.zookeeper.quorum."""
        return f"{HOST}:{self.port}"

    def ready(self) -> bool:
        """The server answers the srvr command as a serving standalone server."""
        try:
            with socket.create_connection((HOST, self.port), timeout=2) as s:
                s.sendall(b"srvr")
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
        except OSError:
            return False
        return b"Mode: standalone" in reply

    def running(self) -> bool:
        return pid_alive(self.pid_file) is not None and port_open(HOST, self.port)

    def command(self, config_file: Path) -> list[str]:
        """The JVM command line: a small heap, and C1 only (it serves a handful of Flink clients)."""
        classpath = str(ZOOKEEPER_JARS / "*")
        jvm = [
            "-Xms32m",
            "-Xmx256m",
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            f"-Djava.io.tmpdir={self.dir / 'tmp'}",
        ]
        return ["java", *jvm, "-cp", classpath, "org.apache.zookeeper.server.ZooKeeperServerMain", str(config_file)]

    def up(self) -> None:
        """Write zoo.cfg, start the server, wait until it serves."""
        if self.running():
            return
        require_free(HOST, self.port, "ZooKeeper", "stack.zookeeper_port")
        require_jars(ZOOKEEPER_JARS, "ZooKeeper")
        for d in (self.dir / "data", self.dir / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        config_file = self.dir / "zoo.cfg"
        config_file.write_text(zoo_cfg(self.dir / "data", self.port))
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                self.command(config_file), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid_file.write_text(str(proc.pid))
        try:
            wait_until(lambda: self.ready() or proc.poll() is not None, "ZooKeeper", 60, self.log)
        except StackError:
            self.down()  # a server whose startup failed may live on without serving
            raise
        if proc.poll() is not None:
            msg = f"ZooKeeper exited with code {proc.returncode}; see {self.log}"
            raise StackError(msg)

    def down(self) -> None:
        stop_pid(self.pid_file, "ZooKeeper", timeout=20)

    def status(self) -> ComponentStatus:
        detail = str(self.dir) if self.wanted else "not used by this config (stack.high_availability: none)"
        return ComponentStatus(
            "zookeeper", self.running(), self.quorum if self.wanted or self.cfg.stack.zookeeper_port else "-", detail
        )
