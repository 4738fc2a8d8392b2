"""End-to-end fixtures: a private real stack (Kafka KRaft, Postgres, Flink cluster, Prometheus) on free ports.

The stack runs from a temporary state directory with uuid topic names, so it never collides with a
developer's `meterflow stack up`, and is stopped and removed after the session.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest

from meterflow.local.stack import StackConfigs


@pytest.fixture(scope="session")
def e2e_stack(tmp_path_factory) -> Iterator[StackConfigs]:
    """Start the real stack once per session; stop it and delete its state afterwards."""
    from meterflow.local.base import free_ports
    from meterflow.local.stack import LocalStack, ensure_secrets

    root = tmp_path_factory.mktemp("stack")
    kafka, controller, pg, rest, rpc, stripe_mock, prometheus, *metrics = free_ports(10)
    run = uuid.uuid4().hex[:8]
    base = {
        "kafka": {
            "bootstrap_servers": f"127.0.0.1:{kafka}",
            "usage_events_topic": f"usage-events-{run}",
            "late_events_topic": f"usage-events-late-{run}",
            "dead_letter_topic": f"usage-events-dead-letter-{run}",
            "partitions": 3,
            "consumer_group": f"meterflow-{run}",
        },
        "postgres": {"port": pg},
        "flink": {"rest_port": rest, "checkpoint_interval": "2s", "checkpoint_dir": "state/flink/checkpoints", "parallelism": 2},
        "event_time": {"window_size": "10s", "watermark_delay": "2s", "source_idle_timeout": "5s"},
        "stack": {
            "state_dir": "state", "kafka_controller_port": controller, "flink_rpc_port": rpc, "stripe_mock_port": stripe_mock,
            # JobManager, TaskManager, and a replacement TaskManager after a kill.
            "prometheus_port": prometheus, "flink_metrics_ports": ",".join(map(str, metrics)), "prometheus_scrape_interval": "2s",
        },  # fmt: skip
        "stripe": {"api_base": f"http://127.0.0.1:{stripe_mock}"},
        "secrets_file": "state/secrets.env",
    }
    stack = StackConfigs(base, root)
    cfg, _ = stack.config("base")
    ensure_secrets(cfg)
    with cfg.path(cfg.secrets_file).open("a") as secrets:
        secrets.write("METERFLOW_STRIPE_API_KEY=sk_test_meterflowE2E\n")  # any test key works with stripe-mock
    cfg, _ = stack.config("base")
    local = LocalStack(cfg)
    try:
        local.up(echo=lambda m: None)
        local.stripe_mock.up()  # billing tests enable billing per job; the mock runs for the session
        yield stack
    finally:
        local.down()
        # MF_TEST_KEEP_STATE=1 keeps logs and data for a post-mortem.
        if not os.environ.get("MF_TEST_KEEP_STATE"):
            shutil.rmtree(root / "state", ignore_errors=True)
