"""The local stack's schema registry: Apicurio Registry, with its Confluent-compatible API, on loopback.

Producers register the writer schema of each message and frame it in the Confluent wire format
(magic byte 0, 4-byte schema id); the job looks the schema up by id at ``kafka.schema_registry_url``.
Started by ``meterflow stack up`` only when that URL points at this machine; its port is the URL's.
"""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from meterflow.config import JobConfig
from meterflow.errors import StackError
from meterflow.local.base import REPO_ROOT, ComponentStatus, pid_alive, port_open, require_free, stop_pid, wait_until
from meterflow.security import is_loopback

REGISTRY_HOME = REPO_ROOT / "third_party" / "registry" / "target" / "apicurio-registry"
# Where Apicurio serves the Confluent schema registry API (v7; the schema ids match Confluent's).
CCOMPAT_PATH = "/apis/ccompat/v7"


def local_registry_port(url: str | None) -> int | None:
    """The port of a registry URL on this machine's loopback (80 when it names none); None for no URL or another host."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not is_loopback(parts.hostname):
        return None
    return parts.port or 80


class SchemaRegistry:
    """Apicurio Registry 3 (third_party/registry/pom.xml) serving the Confluent-compatible API.

    Storage is an H2 database file in the state directory, so schema ids in Kafka messages keep
    resolving after a restart, as long as the topic's data does. Started only when
    ``kafka.schema_registry_url`` points at 127.0.0.1/localhost; that URL must end in ``/apis/ccompat/v7``.
    """

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.state_dir / "schema-registry"
        self.url = (cfg.kafka.schema_registry_url or "").rstrip("/")
        self.port = local_registry_port(self.url)
        self.pid_file = self.dir / "schema-registry.pid"
        self.log = self.dir / "schema-registry.log"

    @property
    def wanted(self) -> bool:
        """Whether the config's registry is one this machine should run."""
        return self.port is not None

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        """The registry's readiness check answers UP (storage initialised, HTTP serving)."""
        try:
            with urllib.request.urlopen(f"{self.root_url}/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def running(self) -> bool:
        return self.port is not None and pid_alive(self.pid_file) is not None and port_open("127.0.0.1", self.port)

    def command(self) -> list[str]:
        """The JVM command line: loopback only, every file it writes under the state directory."""
        jars = sorted(REGISTRY_HOME.glob("apicurio-registry-app-*-runner.jar"))
        if not jars:
            msg = f"no Apicurio Registry in {REGISTRY_HOME}: run scripts/setup.sh (downloads it from Maven Central)"
            raise StackError(msg)
        props = {
            "quarkus.http.host": "127.0.0.1",
            "quarkus.http.port": str(self.port),
            # As Confluent's registry does: the same schema in other whitespace or key order is the same schema (same id).
            "apicurio.ccompat.use-canonical-hash": "true",
            "apicurio.datasource.url": f"jdbc:h2:file:{self.dir / 'data' / 'registry'}",
            "apicurio.import.work-dir": str(self.dir / "tmp"),
            "apicurio.storage.snapshot.location": str(self.dir / "tmp"),
            "java.io.tmpdir": str(self.dir / "tmp"),
        }
        # C1 only and the serial collector: it serves a few lookups, and startup takes half the CPU
        # (about 3.3 s instead of 7.5 s measured here), which matters on a 2-core machine beside Kafka and Flink.
        jvm = ["-Xms64m", "-Xmx512m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]
        return ["java", *jvm, *(f"-D{k}={v}" for k, v in props.items()), "-jar", str(jars[-1])]

    def up(self) -> None:
        """Start the registry on loopback and wait until its readiness check passes."""
        if self.running():
            return
        if self.port is None:
            msg = f"kafka.schema_registry_url {self.url or '(unset)'} is not an http URL on 127.0.0.1/localhost: the local stack runs no registry for it"
            raise StackError(msg)
        if urlsplit(self.url).path != CCOMPAT_PATH:
            msg = f"kafka.schema_registry_url must end in {CCOMPAT_PATH} for the local registry (Apicurio's Confluent-compatible API), e.g. {self.root_url}{CCOMPAT_PATH}"
            raise StackError(msg)
        require_free("127.0.0.1", self.port, "the schema registry", "kafka.schema_registry_url")
        args = self.command()
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_file.write_text(str(proc.pid))
        wait_until(lambda: self.ready() or proc.poll() is not None, "the schema registry", 120, self.log)
        if proc.poll() is not None:
            msg = f"the schema registry exited with code {proc.returncode}; see {self.log}"
            raise StackError(msg)

    def down(self) -> None:
        stop_pid(self.pid_file, "the schema registry", timeout=20)

    def status(self) -> ComponentStatus:
        detail = (
            str(self.dir)
            if self.wanted
            else "not used by this config (kafka.schema_registry_url is not on this machine)"
        )
        return ComponentStatus("schema-registry", self.running(), self.url or "-", detail)
