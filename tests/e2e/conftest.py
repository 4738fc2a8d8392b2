"""End-to-end fixtures: a private real stack (Kafka KRaft, Postgres, Flink cluster, Prometheus) on free ports.

The stack runs from a temporary state directory with uuid topic names, so it never collides with a
developer's `meterflow stack up`, and is stopped and removed after the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from meterflow.local.stack import StackConfigs

# Logs kept from a session in which a test failed, beside the stack's removed state.
KEPT_LOGS = "kept-logs"


@contextlib.contextmanager
def running_stack(root: Path, request: pytest.FixtureRequest, **sections: dict) -> Iterator[StackConfigs]:
    """The real stack on free ports from ``root``; ``sections`` update the base config. Stopped and its
    state deleted afterwards (logs kept when a test of the session failed)."""
    from meterflow.local.base import free_ports
    from meterflow.local.stack import LocalStack, ensure_secrets

    kafka, controller, pg, rest, rpc, stripe_mock, prometheus, zookeeper, serve, *metrics = free_ports(12)
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
        "flink": {
            "rest_port": rest,
            "checkpoint_interval": "2s",
            "checkpoint_dir": "state/flink/checkpoints",
            "parallelism": 2,
        },
        "event_time": {"window_size": "10s", "watermark_delay": "2s", "source_idle_timeout": "5s"},
        "stack": {
            "state_dir": "state",
            "kafka_controller_port": controller,
            "flink_rpc_port": rpc,
            "stripe_mock_port": stripe_mock,
            "zookeeper_port": zookeeper,  # reserved with the others: a port picked later could be one of them
            # JobManager, TaskManager, and a replacement TaskManager after a kill.
            "prometheus_port": prometheus,
            "flink_metrics_ports": ",".join(map(str, metrics)),
            "prometheus_scrape_interval": "2s",
        },
        "stripe": {"api_base": f"http://127.0.0.1:{stripe_mock}"},
        # `meterflow stack up` (the resubmit runbook) starts the HTTP service too: on a port of its own.
        "serve": {"port": serve},
        "secrets_file": "state/secrets.env",
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
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
        _report_replacements(request, local.flink)
        local.down()
        if request.session.testsfailed:
            # The processes' own logs say what the assertions cannot (a TaskManager that exited, a broker error).
            state = root / "state"
            for log in [*state.glob("flink/log/*"), *state.glob("*/*.log")]:
                kept = root / KEPT_LOGS / log.relative_to(state)
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(log, kept)
        # MF_TEST_KEEP_STATE=1 keeps logs and data for a post-mortem.
        if not os.environ.get("MF_TEST_KEEP_STATE"):
            shutil.rmtree(root / "state", ignore_errors=True)


def _report_replacements(request: pytest.FixtureRequest, flink) -> None:
    """Every TaskManager the stack's supervisor replaced, on the terminal: the kills the tests made, and any loss they did not."""
    from meterflow.local.supervisor_log import replacements

    replaced = replacements(flink.supervisor_log)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if replaced and reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\n{flink.dir.parent.parent.name}: the supervisor replaced {len(replaced)} TaskManager(s): "
                + "; ".join(t.isoformat() for t in replaced)
            )


@pytest.fixture(scope="session")
def e2e_stack(tmp_path_factory, request) -> Iterator[StackConfigs]:
    """Start the real stack once per session; stop it and delete its state afterwards."""
    with running_stack(tmp_path_factory.mktemp("stack"), request) as stack:
        yield stack


@pytest.fixture(autouse=True)
def shared_stack_has_a_taskmanager(request) -> None:
    """A test on the shared stack starts only where its jobs can run: with no TaskManager registered it
    fails at once with the end of the TaskManagers' logs, instead of waiting out every job's start."""
    stacks = [name for name in ("e2e_stack", "stack_without_ha") if name in request.fixturenames]
    if not stacks:
        return
    from meterflow.local.flink import FlinkCluster

    stack = request.getfixturevalue(stacks[0])
    cfg, _ = stack.config("base")
    cluster = FlinkCluster(cfg)
    # A TaskManager lost at the end of the test before (a fatal error while a job was cancelled) is
    # replaced by the stack's supervisor, as in production; only one that does not come back fails here.
    deadline = time.monotonic() + cfg.stack.taskmanager_restart_delay.total_seconds() + 120
    while not cluster.running() and time.monotonic() < deadline:
        time.sleep(1)
    if cluster.running():
        return
    tails = []
    for log in sorted(cluster.log_dir.glob("*taskexecutor*"), key=lambda p: p.stat().st_mtime)[-2:]:
        lines = log.read_text(errors="replace").splitlines()[-40:]
        tails.append(f"--- {log.name} (last {len(lines)} lines)\n" + "\n".join(lines))
    pytest.fail(f"the shared stack has no TaskManager registered ({cluster.overview()}):\n" + "\n".join(tails))
