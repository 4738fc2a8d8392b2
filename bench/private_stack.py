"""A private local stack for the benchmark: free ports, a temporary state directory, uuid topic names.

Started the same way as the end-to-end test fixtures (tests/e2e/conftest.py), so it never collides
with a developer's stack on the default ports or with a test run, and removed afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meterflow.config import JobConfig
from meterflow.local.base import free_ports
from meterflow.local.stack import StackConfigs


@dataclass
class BenchStack(StackConfigs):
    """The running stack and how to make job configs for it."""

    run_id: str = ""


def base_config(run_id: str, ports: list[int], partitions: int) -> dict[str, Any]:
    """Config of a private stack: ports, uuid topics, state in ``state/`` next to the config files."""
    kafka, controller, pg, rest, rpc, prometheus, *metrics = ports
    return {
        "kafka": {
            "bootstrap_servers": f"127.0.0.1:{kafka}",
            "usage_events_topic": f"bench-usage-events-{run_id}",
            "late_events_topic": f"bench-usage-events-late-{run_id}",
            "dead_letter_topic": f"bench-usage-events-dead-letter-{run_id}",
            "partitions": partitions,
            "consumer_group": f"bench-{run_id}",
        },
        "postgres": {"port": pg},
        "flink": {"rest_port": rest, "checkpoint_dir": "state/flink/checkpoints", "task_slots": 2},
        "stack": {
            "state_dir": "state",
            "kafka_controller_port": controller,
            "flink_rpc_port": rpc,
            "prometheus_port": prometheus,
            "flink_metrics_ports": ",".join(map(str, metrics)),
        },
        "secrets_file": "state/secrets.env",
    }


# REST metrics are cached by the JobManager for 10 s by default: too coarse to time a run.
BENCH_FLINK_OPTIONS = {"metrics.fetcher.update-interval": "500"}


def bench_flink_cluster(cfg: JobConfig, options: dict[str, str]) -> Any:
    """The project's Flink cluster with extra options written into its config before it starts."""
    from meterflow.local.flink import FlinkCluster, render_flink_conf

    class BenchFlinkCluster(FlinkCluster):
        def prepare(self) -> None:
            super().prepare()
            path = self.conf_dir / "config.yaml"
            conf = yaml.safe_load(path.read_text())
            path.write_text(
                yaml.safe_dump(render_flink_conf(conf, {**BENCH_FLINK_OPTIONS, **options}), sort_keys=False)
            )

    return BenchFlinkCluster(cfg)


@contextmanager
def private_stack(
    partitions: int, keep_state: bool = False, echo: Any = print, flink_options: dict[str, str] | None = None
) -> Iterator[BenchStack]:
    """Start Kafka, Postgres and a Flink cluster in a temporary directory; stop and remove them on exit.

    ``flink_options`` are added to the cluster's config (and so to every job submitted to it).
    Cleanup runs on any exit, including KeyboardInterrupt and SIGTERM (see bench.run).
    """
    from meterflow.local.stack import LocalStack, ensure_secrets

    root = Path(tempfile.mkdtemp(prefix="meterflow-bench-"))
    run_id = uuid.uuid4().hex[:8]
    stack = BenchStack(base_config(run_id, free_ports(9), partitions), root, run_id)
    cfg, _ = stack.config("base")
    ensure_secrets(cfg)
    cfg, _ = stack.config("base")
    local = LocalStack(cfg)
    local.flink = bench_flink_cluster(cfg, flink_options or {})
    try:
        local.up(echo=echo)
        yield stack
    finally:
        echo("stopping the private stack ...")
        try:
            local.down()
        finally:
            if keep_state:
                echo(f"stack state kept in {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)


def parse_options(pairs: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` strings to a mapping (ValueError on a pair without ``=``)."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            msg = f"expected KEY=VALUE, got {pair!r}"
            raise ValueError(msg)
        result[key.strip()] = value.strip()
    return result
