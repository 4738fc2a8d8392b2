"""The local stack: a real Kafka broker (KRaft), Postgres and a Flink session cluster on this machine.

Everything lives under one project-local state directory (``stack.state_dir``, default ``.stack``)::

    .stack/secrets.env             generated Postgres password (0600)
    .stack/kafka/                  server.properties, data/, kafka.log, kafka.pid
    .stack/postgres/               data/ (owned by the postgres user), postgres.log, socket
    .stack/flink/                  conf/, lib/, log/, pid/, checkpoints/, savepoints/
    .stack/prometheus/             prometheus.yml, data/, prometheus.log (meterflow/prometheus_server.py)

Jars come from ``scripts/setup.sh`` (Maven Central via ``stack/*/pom.xml``); Postgres from Debian's
package; Flink is the distribution inside the ``apache-flink`` wheel. ``up`` is idempotent and
waits until each part answers.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from meterflow.config import JobConfig, parse_port_range
from meterflow.errors import PortInUseError, StackError
from meterflow.metrics_conf import flink_reporter_conf
from meterflow.security import exposed_listeners, pg_identifier, pg_string_literal

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_JARS = REPO_ROOT / "stack" / "kafka" / "target" / "dependency"
FLINK_CONNECTOR_JARS = REPO_ROOT / "stack" / "flink-lib" / "target" / "dependency"
FLINK_CONF_TEMPLATE = REPO_ROOT / "flink-conf" / "config.yaml"
UDF_JAR_DIR = REPO_ROOT / "udf" / "target"
POSTGRES_OS_USER = "postgres"


@dataclass(frozen=True)
class ComponentStatus:
    """What ``stack status`` reports for one part of the stack."""

    name: str
    running: bool
    address: str
    detail: str = ""


# ---------------------------------------------------------------- helpers


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback TCP ports that were free a moment ago (for private stacks)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class StackConfigs:
    """Configs of one private stack: a base mapping plus per-job section overrides, written as YAML side by side."""

    base: dict
    dir: Path

    def config(self, name: str, **overrides: dict) -> tuple[JobConfig, Path]:
        """Write ``<dir>/<name>.yaml`` (base with each section updated by its override) and load it."""
        from meterflow.config import load_config

        data = yaml.safe_load(yaml.safe_dump(self.base))
        for section, values in overrides.items():
            data.setdefault(section, {}).update(values)
        path = self.dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path, environ={}), path


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(check: Callable[[], bool], what: str, timeout: float, log: Path | None = None) -> None:
    """Poll ``check`` until true; on timeout raise StackError pointing at the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    hint = f"; see {log}" if log else ""
    msg = f"{what} did not become ready within {timeout:.0f}s{hint}"
    raise StackError(msg)


def _pid_alive(pid_file: Path) -> int | None:
    """The pid in the file if that process is running (an exited, unreaped child is not)."""
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    # A child of this process that exited stays a zombie until reaped; kill(pid, 0) still succeeds.
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return None
    except ChildProcessError:
        pass  # not our child: its parent reaps it
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if state == "Z" else pid


def _require_free(host: str, port: int, what: str, config_key: str) -> None:
    if port_open(host, port):
        msg = f"port {port} needed by {what} is taken by another process; free it or change {config_key} in the config"
        raise PortInUseError(msg)


def _stop_pid(pid_file: Path, what: str, timeout: float = 30) -> None:
    pid = _pid_alive(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return
    os.killpg(pid, signal.SIGTERM) if _is_group_leader(pid) else os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid_file):
        time.sleep(0.2)
    if _pid_alive(pid_file):
        os.killpg(pid, signal.SIGKILL) if _is_group_leader(pid) else os.kill(pid, signal.SIGKILL)
        print(f"{what} did not stop in {timeout:.0f}s; killed", file=sys.stderr)
        deadline = time.monotonic() + 10
        while _pid_alive(pid_file) and time.monotonic() < deadline:
            time.sleep(0.2)
    pid_file.unlink(missing_ok=True)


def _proc_running(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _is_taskmanager(pid: int) -> bool:
    """Whether the process is a Flink TaskManager JVM."""
    try:
        return b"TaskManagerRunner" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False


def _require_jars(directory: Path, what: str) -> list[Path]:
    jars = sorted(directory.glob("*.jar"))
    if not jars:
        msg = f"no {what} jars in {directory}: run scripts/setup.sh (downloads them from Maven Central)"
        raise StackError(msg)
    return jars


# ---------------------------------------------------------------- Kafka


class KafkaBroker:
    """A single-node Kafka broker in KRaft mode (broker and controller in one JVM)."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.state_dir / "kafka"
        host, _, port = cfg.kafka.bootstrap_servers.split(",")[0].rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.controller_port = cfg.stack.kafka_controller_port
        self.pid_file = self.dir / "kafka.pid"
        self.log = self.dir / "kafka.log"

    def properties(self) -> str:
        """server.properties for a single-node KRaft broker with transactions enabled."""
        h = self.host
        return "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.bootstrap.servers={h}:{self.controller_port}",
                f"listeners=PLAINTEXT://{h}:{self.port},CONTROLLER://{h}:{self.controller_port}",
                f"advertised.listeners=PLAINTEXT://{h}:{self.port}",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "inter.broker.listener.name=PLAINTEXT",
                # One broker: every internal topic has one replica (transactions need this).
                "offsets.topic.replication.factor=1",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "transaction.max.timeout.ms=900000",
                "group.initial.rebalance.delay.ms=0",
                f"num.partitions={self.cfg.kafka.partitions}",
                f"log.dirs={self.dir / 'data'}",
                "",
            ]
        )

    def running(self) -> bool:
        """Our broker process is alive and its port answers."""
        return _pid_alive(self.pid_file) is not None and port_open(self.host, self.port)

    def up(self) -> None:
        """Format storage once, start the broker, wait for it, create the project's topics."""
        if self.running():
            self.ensure_topics()
            return
        _require_free(self.host, self.port, "Kafka", "kafka.bootstrap_servers")
        _require_free(self.host, self.controller_port, "the Kafka controller", "stack.kafka_controller_port")
        _require_jars(KAFKA_JARS, "Kafka broker")
        self.dir.mkdir(parents=True, exist_ok=True)
        props = self.dir / "server.properties"
        props.write_text(self.properties())
        classpath = str(KAFKA_JARS / "*")
        if not (self.dir / "data" / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            subprocess.run(
                ["java", "-cp", classpath, "kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id, "-c", str(props)],
                check=True,
                capture_output=True,
            )
        log4j = self.dir / "log4j2.properties"
        log4j.write_text(
            "rootLogger.level=INFO\nrootLogger.appenderRef.f.ref=f\nappender.f.type=File\nappender.f.name=f\n"
            f"appender.f.fileName={self.dir / 'server.log'}\nappender.f.layout.type=PatternLayout\n"
            "appender.f.layout.pattern=[%d] %p %m (%c)%n\n"
        )
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                ["java", "-Xms256m", "-Xmx768m", f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath, "kafka.Kafka", str(props)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        wait_until(lambda: port_open(self.host, self.port) or proc.poll() is not None, "Kafka", 90, self.log)
        if proc.poll() is not None:
            msg = f"Kafka exited with code {proc.returncode}; see {self.log} and {self.dir / 'server.log'}"
            raise StackError(msg)
        self.ensure_topics()

    def ensure_topics(self) -> None:
        """Create the input, late, dead-letter and closed-windows topics if missing (idempotent)."""
        from connectors.kafka_admin import ensure_topics

        k = self.cfg.kafka
        topics = [k.usage_events_topic, k.late_events_topic, k.dead_letter_topic, k.closed_windows_topic]
        wait_until(
            lambda: _try(lambda: ensure_topics(k.bootstrap_servers, topics, k.partitions)),
            "Kafka topic creation",
            60,
            self.dir / "server.log",
        )

    def down(self) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after 20 s (its log recovery handles either)."""
        _stop_pid(self.pid_file, "Kafka", timeout=20)

    def status(self) -> ComponentStatus:
        """Running state and address."""
        return ComponentStatus("kafka", self.running(), f"{self.host}:{self.port}", str(self.dir))


def _try(action: Callable[[], object]) -> bool:
    try:
        action()
    except Exception as e:  # noqa: BLE001 - readiness probe: any failure means "not yet"; the last one is logged
        print(f"  waiting: {type(e).__name__}: {e}", file=sys.stderr)
        return False
    return True


# ---------------------------------------------------------------- Postgres


def postgres_bin_dir() -> Path:
    """Directory of Debian's PostgreSQL server binaries (newest installed major version)."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if not candidates:
        msg = "PostgreSQL server not installed: run scripts/setup.sh (apt-get install postgresql)"
        raise StackError(msg)
    return candidates[-1].parent


def _ensure_traversable(path: Path, user: str) -> None:
    """Let ``user`` reach ``path``: grant o+x on ancestors that lack it (e.g. a 0700 temp dir)."""
    for parent in [*reversed(path.parents)]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)
            print(f"granted search (o+x) on {parent} so the {user} user can reach {path}", file=sys.stderr)


class PostgresServer:
    """A Postgres cluster in the state directory, run as the postgres OS user."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.state_dir / "postgres"
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"

    def _as_postgres(self, args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        if os.geteuid() == 0:
            args = ["runuser", "-u", POSTGRES_OS_USER, "--", *args]
        return subprocess.run(args, check=False, capture_output=True, text=True, **kw)  # type: ignore[call-overload]

    def running(self) -> bool:
        """pg_ctl reports the server running and its port answers."""
        if not (self.data / "PG_VERSION").exists():
            return False
        ok = self._as_postgres([str(postgres_bin_dir() / "pg_ctl"), "status", "-D", str(self.data)]).returncode == 0
        return ok and port_open(self.cfg.postgres.host, self.cfg.postgres.port)

    def up(self) -> None:
        """initdb once, start, create the role and database with the generated password."""
        bindir = postgres_bin_dir()
        pg = self.cfg.postgres
        if self.running():
            self._ensure_role_and_db()
            return
        _require_free(pg.host, pg.port, "Postgres", "postgres.port")
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            _ensure_traversable(self.dir, POSTGRES_OS_USER)
            ids = pwd.getpwnam(POSTGRES_OS_USER)
            os.chown(self.dir, ids.pw_uid, ids.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            r = self._as_postgres([str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=peer", "--auth-host=scram-sha-256", "-E", "UTF8"])
            if r.returncode:
                msg = f"initdb failed: {r.stderr.strip()}"
                raise StackError(msg)
        opts = f"-p {pg.port} -k {self.dir} -c listen_addresses={pg.host} -c fsync=on -c max_connections=100"
        r = self._as_postgres([str(bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o", opts])
        if r.returncode:
            msg = f"Postgres did not start: {r.stderr.strip() or r.stdout.strip()}; see {self.log}"
            raise StackError(msg)
        wait_until(lambda: port_open(pg.host, pg.port), "Postgres", 60, self.log)
        self._ensure_role_and_db()

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the local socket; return stdout.

        The statement goes through standard input, never the command line, which any local user
        can read in the process list (it may carry the role's password).
        """
        bindir = postgres_bin_dir()
        r = self._as_postgres(
            [str(bindir.parent / "bin" / "psql") if (bindir / "psql").exists() else "psql", "-h", str(self.dir), "-p", str(self.cfg.postgres.port), "-d", pg_identifier(database).strip('"'), "-v", "ON_ERROR_STOP=1", "-qAt", "-f", "-"],
            input=sql,
        )
        if r.returncode:
            msg = f"psql failed: {r.stderr.strip()}"
            raise StackError(msg)
        return r.stdout

    def _ensure_role_and_db(self) -> None:
        pg = self.cfg.postgres
        if pg.password is None:
            msg = "no Postgres password configured: set METERFLOW_POSTGRES_PASSWORD or let `stack up` generate the secrets file"
            raise StackError(msg)
        user, database = pg_identifier(pg.user), pg_identifier(pg.database)
        password = pg_string_literal(pg.password.get_secret_value())
        if not self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = {pg_string_literal(pg.user)}").strip():
            self.psql(f"CREATE ROLE {user} LOGIN PASSWORD {password}")
        else:
            self.psql(f"ALTER ROLE {user} LOGIN PASSWORD {password}")
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = {pg_string_literal(pg.database)}").strip():
            self.psql(f"CREATE DATABASE {database} OWNER {user}")

    def down(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` rolls back open transactions; ``immediate`` is a crash)."""
        if not (self.data / "PG_VERSION").exists():
            return
        self._as_postgres([str(postgres_bin_dir() / "pg_ctl"), "stop", "-D", str(self.data), "-m", mode, "-w"])

    def status(self) -> ComponentStatus:
        """Running state and address."""
        pg = self.cfg.postgres
        return ComponentStatus("postgres", self.running(), f"{pg.host}:{pg.port}/{pg.database}", str(self.data))


# ---------------------------------------------------------------- Flink


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
        env = dict(os.environ)
        env.update(FLINK_HOME=str(flink_home()), FLINK_CONF_DIR=str(self.conf_dir), FLINK_LIB_DIR=str(self.lib_dir))
        return env

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
                # Every JobManager and TaskManager serves its metrics to Prometheus on loopback.
                **flink_reporter_conf(self.cfg.stack.flink_metrics_ports),
            },
        )

    def prepare(self) -> None:
        """Write conf/ (flink-conf/config.yaml + local overrides) and lib/ (distribution + connector jars)."""
        home = flink_home()
        for d in (self.conf_dir, self.lib_dir, self.log_dir, self.dir / "pid"):
            d.mkdir(parents=True, exist_ok=True)
        f = self.cfg.flink
        conf = self.config()
        (self.conf_dir / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
        for name in ("log4j.properties", "log4j-console.properties", "log4j-cli.properties", "log4j-session.properties", "logback.xml"):
            if (home / "conf" / name).exists():
                shutil.copy(home / "conf" / name, self.conf_dir / name)
        (self.conf_dir / "masters").write_text(f"{f.rest_host}:{f.rest_port}\n")
        (self.conf_dir / "workers").write_text(f"{f.rest_host}\n")
        for old in self.lib_dir.glob("*.jar"):
            old.unlink()
        jars = [*sorted((home / "lib").glob("*.jar")), *_require_jars(FLINK_CONNECTOR_JARS, "Flink connector"), *_require_jars(UDF_JAR_DIR, "meterflow UDF")]
        for jar in jars:
            (self.lib_dir / jar.name).symlink_to(jar)

    def overview(self) -> dict | None:
        """The REST /overview document, or None when the JobManager does not answer."""
        try:
            with urllib.request.urlopen(f"{self.rest_url}/overview", timeout=2) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def running(self) -> bool:
        """JobManager answers and at least one TaskManager is registered."""
        ov = self.overview()
        return bool(ov and ov.get("taskmanagers", 0) >= 1)

    def up(self) -> None:
        """Start JobManager and TaskManager with start-cluster.sh; wait for a registered TaskManager.

        A JobManager whose TaskManager is gone (crashed, or shut down by Flink's task-cancellation
        watchdog) gets a new TaskManager, as a process supervisor would start one in production.
        """
        if self.running():
            return
        if self.overview() is not None:
            print("Flink JobManager has no TaskManager: starting one", file=sys.stderr)
            self.start_taskmanager()
            wait_until(self.running, "Flink TaskManager", 120, self.log_dir)
            return
        f = self.cfg.flink
        _require_free(f.rest_host, f.rest_port, "the Flink REST API", "flink.rest_port")
        _require_free(f.rest_host, self.cfg.stack.flink_rpc_port, "the Flink JobManager RPC", "stack.flink_rpc_port")
        metrics_ports = parse_port_range(self.cfg.stack.flink_metrics_ports)
        if sum(not port_open("127.0.0.1", p) for p in metrics_ports) < 2:
            msg = f"fewer than 2 free ports in stack.flink_metrics_ports ({self.cfg.stack.flink_metrics_ports}) for the JobManager's and TaskManager's metrics; free them or change the range"
            raise PortInUseError(msg)
        self.prepare()
        r = subprocess.run(["bash", str(flink_home() / "bin" / "start-cluster.sh")], env=self.env(), capture_output=True, text=True, check=False)
        if r.returncode:
            msg = f"start-cluster.sh failed: {r.stderr.strip() or r.stdout.strip()}"
            raise StackError(msg)
        wait_until(self.running, "Flink cluster", 120, self.log_dir)

    def start_taskmanager(self) -> None:
        """Start one more TaskManager (used after a TaskManager was killed)."""
        subprocess.run(["bash", str(flink_home() / "bin" / "taskmanager.sh"), "start"], env=self.env(), capture_output=True, check=True)

    def taskmanager_pids(self) -> list[int]:
        """PIDs of this cluster's running TaskManager JVMs (exited ones are skipped)."""
        pids = []
        for pid_file in (self.dir / "pid").glob("*taskexecutor*.pid"):
            for token in pid_file.read_text().split():
                # A pid file outlives its process and pids are reused: check it is still a TaskManager.
                if token.isdigit() and _proc_running(int(token)) and _is_taskmanager(int(token)):
                    pids.append(int(token))
        return pids

    def down(self) -> None:
        """Stop the cluster (cancels nothing; running jobs stop with it).

        stop-cluster.sh stops one TaskManager per worker entry; a TaskManager started later
        (replacing a lost one) is stopped here too, so nothing is left running.
        """
        if not self.conf_dir.exists():
            return
        subprocess.run(["bash", str(flink_home() / "bin" / "stop-cluster.sh")], env=self.env(), capture_output=True, check=False)
        for pid in self.taskmanager_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while self.taskmanager_pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in self.taskmanager_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Python workers of a TaskManager that was killed outlive it (re-parented to init).
        for pid in self.python_workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not port_open(self.cfg.flink.rest_host, self.cfg.flink.rest_port), "Flink shutdown", 60, self.log_dir)

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
        """Running state, address and job counts."""
        ov = self.overview() or {}
        detail = f"taskmanagers={ov.get('taskmanagers', 0)} slots={ov.get('slots-total', 0)} running_jobs={ov.get('jobs-running', 0)}" if ov else ""
        return ComponentStatus("flink", self.running(), self.rest_url, detail)


# ---------------------------------------------------------------- stripe-mock

STRIPE_MOCK_BIN = REPO_ROOT / "stack" / "bin" / "stripe-mock"


class StripeMock:
    """Stripe's official API mock: validates every billing request against Stripe's API specification.

    Stateless (no deduplication, no rate limits): the local stand-in for Stripe's test mode. Started
    only when billing is enabled and ``stripe.api_base`` points at this machine's ``stack.stripe_mock_port``.
    """

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.state_dir / "stripe-mock"
        self.port = cfg.stack.stripe_mock_port
        self.pid_file = self.dir / "stripe-mock.pid"
        self.log = self.dir / "stripe-mock.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def wanted(self) -> bool:
        """Whether the config bills through this local mock."""
        return self.cfg.billing.enabled and (self.cfg.stripe.api_base or "").rstrip("/") == self.url

    def running(self) -> bool:
        return _pid_alive(self.pid_file) is not None and port_open("127.0.0.1", self.port)

    def up(self) -> None:
        """Start stripe-mock on loopback and wait until it answers."""
        if self.running():
            return
        _require_free("127.0.0.1", self.port, "stripe-mock", "stack.stripe_mock_port")
        if not STRIPE_MOCK_BIN.exists():
            msg = f"{STRIPE_MOCK_BIN} is missing: run scripts/setup.sh (installs it with go install)"
            raise StackError(msg)
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            # stripe-mock also serves HTTPS, on [::]:12112 unless told otherwise: keep it on loopback,
            # on a free port, so it is not exposed and a second stack on the machine can start.
            https_port = free_ports(1)[0]
            args = [str(STRIPE_MOCK_BIN), "-http-addr", f"127.0.0.1:{self.port}", "-https-addr", f"127.0.0.1:{https_port}"]
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_file.write_text(str(proc.pid))
        wait_until(lambda: port_open("127.0.0.1", self.port) or proc.poll() is not None, "stripe-mock", 60, self.log)
        if proc.poll() is not None:
            msg = f"stripe-mock exited with code {proc.returncode}; see {self.log}"
            raise StackError(msg)

    def down(self) -> None:
        _stop_pid(self.pid_file, "stripe-mock", timeout=10)

    def status(self) -> ComponentStatus:
        return ComponentStatus("stripe-mock", self.running(), self.url, "" if self.wanted else "not used by this config")


# ---------------------------------------------------------------- the whole stack


def ensure_secrets(cfg: JobConfig) -> bool:
    """Generate the secrets file with a random Postgres password on first use; True if created.

    When billing goes to the local stripe-mock and no Stripe key is configured, a placeholder
    test-mode key is added (stripe-mock accepts any); a real key belongs in the environment.
    """
    path = cfg.path(cfg.secrets_file)
    created = False
    if cfg.postgres.password is None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"# generated by `meterflow stack up`\nMETERFLOW_POSTGRES_PASSWORD={secrets.token_urlsafe(24)}\n")
        created = True
    if cfg.stripe.api_key is None and StripeMock(cfg).wanted and path.exists() and "METERFLOW_STRIPE_API_KEY=" not in path.read_text():
        with path.open("a") as out:
            out.write("# any test-mode key works with the local stripe-mock\nMETERFLOW_STRIPE_API_KEY=sk_test_meterflowLocalMock\n")
        created = True
    return created


class LocalStack:
    """Kafka, Postgres, Flink and Prometheus together, in start order."""

    def __init__(self, cfg: JobConfig) -> None:
        from meterflow.prometheus_server import PrometheusServer

        self.cfg = cfg
        self.kafka = KafkaBroker(cfg)
        self.postgres = PostgresServer(cfg)
        self.flink = FlinkCluster(cfg)
        self.prometheus = PrometheusServer(cfg)
        self.stripe_mock = StripeMock(cfg)

    def up(self, echo: Callable[[str], None] = print) -> None:
        """Start every part (idempotent), then apply the database schema."""
        from sinks.ledger import apply_schemas

        exposed = exposed_listeners(self.cfg)
        if exposed:
            msg = "the local stack listens on loopback only; these would bind other addresses: " + ", ".join(f"{k}={v}" for k, v in exposed.items())
            raise StackError(msg)
        parts = [self.kafka, self.postgres, self.flink, self.prometheus] + ([self.stripe_mock] if self.stripe_mock.wanted else [])
        for part in parts:
            name = type(part).__name__
            echo(f"starting {name} ..." if not part.running() else f"{name} already running")
            part.up()
        apply_schemas(self.cfg)
        echo("stack is up")

    def down(self) -> None:
        """Stop every part, Flink first (it writes to the others)."""
        self.flink.down()
        self.prometheus.down()
        self.stripe_mock.down()
        self.kafka.down()
        self.postgres.down()

    def status(self) -> list[ComponentStatus]:
        """Status of each part."""
        return [self.kafka.status(), self.postgres.status(), self.flink.status(), self.prometheus.status(), self.stripe_mock.status()]
