"""The local stack's Kafka: a single-node broker in KRaft mode, with the project's topics."""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from collections.abc import Callable

from connectors.topics import BROKER_TRANSACTION_MAX_TIMEOUT_MS, TRANSACTION_MAX_TIMEOUT
from meterflow.config import JobConfig
from meterflow.errors import StackError
from meterflow.local.base import (
    REPO_ROOT,
    ComponentStatus,
    pid_alive,
    port_open,
    require_free,
    require_jars,
    stop_pid,
    wait_until,
)

KAFKA_JARS = REPO_ROOT / "third_party" / "kafka" / "target" / "dependency"


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
                f"{TRANSACTION_MAX_TIMEOUT}={BROKER_TRANSACTION_MAX_TIMEOUT_MS}",
                "group.initial.rebalance.delay.ms=0",
                f"num.partitions={self.cfg.kafka.partitions}",
                f"log.dirs={self.dir / 'data'}",
                "",
            ]
        )

    def running(self) -> bool:
        """Our broker process is alive and its port answers."""
        return pid_alive(self.pid_file) is not None and port_open(self.host, self.port)

    def up(self) -> None:
        """Format storage once, start the broker, wait for it, create the project's topics."""
        if self.running():
            self.ensure_topics()
            return
        require_free(self.host, self.port, "Kafka", "kafka.bootstrap_servers")
        require_free(self.host, self.controller_port, "the Kafka controller", "stack.kafka_controller_port")
        require_jars(KAFKA_JARS, "Kafka broker")
        self.dir.mkdir(parents=True, exist_ok=True)
        props = self.dir / "server.properties"
        props.write_text(self.properties())
        classpath = str(KAFKA_JARS / "*")
        if not (self.dir / "data" / "meta.properties").exists():
            # Passed as --cluster-id=<id>: an id may start with "-", which a separate argument would make an option.
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            subprocess.run(
                [
                    "java",
                    "-cp",
                    classpath,
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    f"--cluster-id={cluster_id}",
                    "-c",
                    str(props),
                ],
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
                [
                    "java",
                    "-Xms256m",
                    "-Xmx768m",
                    f"-Dlog4j2.configurationFile={log4j}",
                    "-cp",
                    classpath,
                    "kafka.Kafka",
                    str(props),
                ],
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
        """Create the input, late, dead-letter and closed-windows topics if missing, and give existing
        ones the configs they lack (connectors/topics.py: LogAppendTime input, sized dead letters); idempotent."""
        from connectors.kafka_admin import ensure_project_topics

        def ensure() -> None:
            for topic, configs in ensure_project_topics(self.cfg).items():
                print(f"  kafka: topic {topic} set to {configs}", file=sys.stderr)

        wait_until(lambda: _try(ensure), "Kafka topic creation", 60, self.dir / "server.log")

    def down(self) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after 20 s (its log recovery handles either)."""
        stop_pid(self.pid_file, "Kafka", timeout=20)

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
