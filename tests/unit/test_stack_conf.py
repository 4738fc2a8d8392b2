"""Local stack configuration: Flink conf rendering and Kafka broker properties."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import yaml

from meterflow.config import load_config
from meterflow.local.base import descendants, process_tree
from meterflow.local.flink import FLINK_CONF_TEMPLATE, render_flink_conf
from meterflow.local.kafka import KafkaBroker


def test_render_overrides_nested_and_new_keys():
    """Dotted overrides land in the nested mapping without touching the base."""
    base = {"rest": {"port": 8081}, "python": {"executable": "python3"}}
    out = render_flink_conf(base, {"rest.port": 18081, "env.log.dir": "/x"})
    assert out == {"rest": {"port": 18081}, "python": {"executable": "python3"}, "env": {"log": {"dir": "/x"}}}
    assert base["rest"]["port"] == 8081


def test_cluster_conf_is_exactly_once():
    """The shipped cluster config checkpoints exactly-once and retains checkpoints on cancel."""
    conf = yaml.safe_load(FLINK_CONF_TEMPLATE.read_text())
    assert conf["execution"]["checkpointing"]["mode"] == "EXACTLY_ONCE"
    assert conf["execution"]["checkpointing"]["externalized-checkpoint-retention"] == "RETAIN_ON_CANCELLATION"


def test_cluster_working_files_stay_in_the_stack_directory(tmp_path):
    """RocksDB's local state and other working files go under the stack's state dir, removed with it."""
    from meterflow.config import JobConfig
    from meterflow.local.flink import FlinkCluster

    state = tmp_path / "state"
    conf = FlinkCluster(JobConfig.model_validate({"stack": {"state_dir": str(state)}})).config()
    assert conf["io"]["tmp"]["dirs"] == str(state / "flink" / "tmp")


def test_kafka_properties_support_transactions_on_one_broker(write_config):
    """Single-node KRaft with replication factor 1 for the transaction and offsets logs."""
    cfg = load_config(
        write_config("kafka:\n  bootstrap_servers: 127.0.0.1:19092\nstack:\n  kafka_controller_port: 19093\n"),
        environ={},
    )
    props = dict(line.split("=", 1) for line in KafkaBroker(cfg).properties().splitlines() if line)
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["offsets.topic.replication.factor"] == "1"
    assert int(props["transaction.max.timeout.ms"]) >= int(cfg.kafka.transaction_timeout.total_seconds() * 1000)


def test_exited_child_is_not_alive(tmp_path):
    """A stopped broker that is still an unreaped child (zombie) counts as stopped, so stop/restart never hangs."""
    import subprocess
    import time

    from meterflow.local.base import pid_alive

    child = subprocess.Popen(["sleep", "0.3"], start_new_session=True)
    pid_file = tmp_path / "child.pid"
    pid_file.write_text(str(child.pid))
    assert pid_alive(pid_file) == child.pid
    time.sleep(0.8)
    assert pid_alive(pid_file) is None


def test_python_workers_of_this_cluster_are_found(tmp_path):
    """A PyFlink worker left by a killed TaskManager, with this cluster's FLINK_CONF_DIR, is ours to stop; others are not."""
    import os
    import subprocess
    import time

    from meterflow.config import JobConfig
    from meterflow.local.flink import FlinkCluster

    cluster = FlinkCluster(JobConfig.model_validate({"stack": {"state_dir": str(tmp_path / "state")}}))
    script = "import time; time.sleep(60)  # pyflink worker stand-in"

    def spawn_orphan(conf_dir: str) -> int:
        # A double fork re-parents the grandchild to init, as a killed TaskManager leaves its workers.
        launcher = subprocess.run(
            ["bash", "-c", f'FLINK_CONF_DIR={conf_dir} nohup python3 -c "{script}" >/dev/null 2>&1 & echo $!'],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(launcher.stdout.strip())

    ours, theirs = spawn_orphan(str(cluster.conf_dir)), spawn_orphan(str(tmp_path / "other" / "conf"))
    try:
        time.sleep(0.3)
        found = cluster.python_workers()
        assert ours in found and theirs not in found
    finally:
        for pid in (ours, theirs):
            os.kill(pid, 9)


def test_descendants_walk_the_whole_tree_and_skip_gone_roots():
    parents = {1: 0, 10: 1, 11: 10, 12: 11, 20: 1, 30: 99}
    assert descendants([10], parents) == {10, 11, 12}
    assert descendants([1], parents) == {1, 10, 11, 12, 20}
    assert descendants([404], parents) == set()


def test_process_tree_finds_a_live_grandchild():
    # A shell that starts a sleeping grandchild, like the TaskManager's Python-worker runner script.
    shell = subprocess.Popen(["bash", "-c", f"{sys.executable} -c 'import time; time.sleep(30)' & wait"])
    try:
        for _ in range(50):
            tree = process_tree(shell.pid)
            if len(tree) >= 2:
                break
            time.sleep(0.1)
        assert shell.pid in tree and len(tree) == 2
    finally:
        for pid in process_tree(shell.pid):
            os.kill(pid, signal.SIGKILL)
        shell.wait()


def _cluster(state, **stack):
    from meterflow.config import JobConfig
    from meterflow.local.flink import FlinkCluster

    return FlinkCluster(JobConfig.model_validate({"stack": {"state_dir": str(state), **stack}}))


def test_cluster_conf_has_zookeeper_high_availability_by_default(tmp_path):
    """By default the cluster keeps leadership and jobs in the stack's ZooKeeper, its HA files and RPC port in the stack."""
    conf = _cluster(tmp_path / "state", zookeeper_port=12181, flink_rpc_port=16123).config()
    ha = conf["high-availability"]
    assert ha["type"] == "zookeeper"
    assert ha["zookeeper"]["quorum"] == "127.0.0.1:12181"
    assert ha["storageDir"] == (tmp_path / "state" / "flink" / "ha").as_uri()
    assert ha["jobmanager"]["port"] == "16123"
    # A killed JobManager's leadership must lapse within seconds, and inside the server's 4-40 s session bounds.
    assert ha["zookeeper"]["client"]["session-timeout"] == "10 s"


def test_cluster_id_is_per_stack_and_stable(tmp_path):
    """Two stacks never share ZooKeeper paths; one stack keeps its id across restarts (a new JobManager finds its jobs)."""
    one = _cluster(tmp_path / "a", zookeeper_port=12181).config()["high-availability"]["cluster-id"]
    again = _cluster(tmp_path / "a", zookeeper_port=12181).config()["high-availability"]["cluster-id"]
    other = _cluster(tmp_path / "b", zookeeper_port=12181).config()["high-availability"]["cluster-id"]
    assert one == again and one != other
    assert one.startswith("/meterflow-")


def test_high_availability_none_renders_no_zookeeper(tmp_path):
    """stack.high_availability: none leaves a lost JobManager's jobs to be resubmitted: no ZooKeeper in the conf."""
    conf = _cluster(tmp_path / "state", high_availability="none").config()
    assert conf["high-availability"] == {"type": "NONE"}
    assert not (tmp_path / "state" / "zookeeper").exists()


def test_high_availability_rejects_unknown_modes():
    import pytest
    from pydantic import ValidationError

    from meterflow.config import JobConfig

    with pytest.raises(ValidationError):
        JobConfig.model_validate({"stack": {"high_availability": "kubernetes"}})


def test_zookeeper_port_defaults_to_a_free_port_kept_for_the_stack(tmp_path):
    """Unset stack.zookeeper_port: a free port chosen once and kept in the state dir, so Flink's conf and the server agree."""
    from meterflow.config import JobConfig
    from meterflow.local.base import port_open
    from meterflow.local.zookeeper import ZooKeeperServer

    cfg = JobConfig.model_validate({"stack": {"state_dir": str(tmp_path / "state")}})
    port = ZooKeeperServer(cfg).port
    assert not port_open("127.0.0.1", port)
    assert (tmp_path / "state" / "zookeeper" / "port").read_text().strip() == str(port)
    assert ZooKeeperServer(cfg).port == port
    assert _cluster(tmp_path / "state").config()["high-availability"]["zookeeper"]["quorum"] == f"127.0.0.1:{port}"
    assert (
        ZooKeeperServer(
            JobConfig.model_validate({"stack": {"state_dir": str(tmp_path / "state"), "zookeeper_port": 2999}})
        ).port
        == 2999
    )


def test_zoo_cfg_is_standalone_on_loopback(tmp_path):
    """zoo.cfg: one server on 127.0.0.1 only, no admin HTTP server (8080 on every interface by default), sessions Flink's timeout fits in."""
    from meterflow.local.zookeeper import zoo_cfg

    props = dict(line.split("=", 1) for line in zoo_cfg(tmp_path / "data", 12181).splitlines() if line)
    assert props["clientPort"] == "12181" and props["clientPortAddress"] == "127.0.0.1"
    assert props["dataDir"] == str(tmp_path / "data")
    assert props["admin.enableServer"] == "false"
    assert "server.1" not in props  # standalone: no quorum ports to bind
    tick = int(props["tickTime"])
    assert 2 * tick <= 10_000 <= 20 * tick  # ZooKeeper grants sessions of 2-20 ticks
    assert props["4lw.commands.whitelist"] == "srvr"


def test_stack_starts_zookeeper_before_flink_and_stops_it_after(tmp_path, monkeypatch):
    """The JobManager elects itself leader in ZooKeeper: it starts first and stops last; without HA it is not started."""
    import sinks.ledger
    from meterflow.config import JobConfig
    from meterflow.local.stack import LocalStack

    calls: list[str] = []

    def record(stack: LocalStack) -> None:
        for name in ("kafka", "postgres", "zookeeper", "flink", "prometheus", "registry", "stripe_mock"):
            part = getattr(stack, name)
            monkeypatch.setattr(part, "running", lambda: False)
            monkeypatch.setattr(part, "up", lambda name=name: calls.append(f"up {name}"))
            monkeypatch.setattr(part, "down", lambda name=name: calls.append(f"down {name}"))

    monkeypatch.setattr(sinks.ledger, "apply_schemas", lambda cfg: None)
    stack = LocalStack(
        JobConfig.model_validate({"stack": {"state_dir": str(tmp_path / "state"), "zookeeper_port": 12181}})
    )
    record(stack)
    stack.up(echo=lambda m: None)
    stack.down()
    assert calls.index("up zookeeper") < calls.index("up flink")
    assert calls.index("down flink") < calls.index("down zookeeper")
    assert "zookeeper" in [s.name for s in stack.status()]

    calls.clear()
    stack = LocalStack(
        JobConfig.model_validate({"stack": {"state_dir": str(tmp_path / "state"), "high_availability": "none"}})
    )
    record(stack)
    stack.up(echo=lambda m: None)
    assert "up zookeeper" not in calls and "up flink" in calls
    assert "zookeeper" not in [s.name for s in stack.status()]


def test_flink_status_names_a_lost_jobmanager_or_taskmanager_and_what_to_run(tmp_path, monkeypatch):
    from meterflow.config import JobConfig
    from meterflow.local.flink import FlinkCluster

    def cluster(ha: str, overview: dict | None, tms: list[int], jms: list[int]) -> FlinkCluster:
        c = FlinkCluster(
            JobConfig.model_validate({"stack": {"state_dir": str(tmp_path / "state"), "high_availability": ha}})
        )
        monkeypatch.setattr(c, "overview", lambda: overview)
        monkeypatch.setattr(c, "taskmanager_pids", lambda: tms)
        monkeypatch.setattr(c, "jobmanager_pids", lambda: jms)
        return c

    lost_jm = cluster("zookeeper", None, [11], []).status()
    assert not lost_jm.running and "JobManager lost" in lost_jm.detail and "recovers the jobs" in lost_jm.detail
    assert "`meterflow submit` restores the jobs" in cluster("none", None, [11], []).status().detail
    assert cluster("none", None, [], []).status().detail == ""  # stopped: nothing lost
    lost_tm = cluster("none", {"taskmanagers": 0}, [], [7]).status()
    assert not lost_tm.running and lost_tm.detail == "no TaskManager registered: `meterflow stack up` starts one"
    unsupervised = cluster("none", {"taskmanagers": 1, "slots-total": 4, "jobs-running": 2}, [11], [7]).status().detail
    assert (
        unsupervised
        == "taskmanagers=1 slots=4 running_jobs=2; the TaskManager supervisor is not running: `meterflow stack up` starts it"
    )


def test_flink_status_says_what_the_supervisor_did_and_will_do(tmp_path, monkeypatch):
    import os

    from meterflow.config import JobConfig
    from meterflow.local.flink import FlinkCluster
    from meterflow.local.supervisor_log import REPLACED

    c = FlinkCluster(
        JobConfig.model_validate({"stack": {"state_dir": str(tmp_path / "state"), "taskmanager_restart_delay": "7s"}})
    )
    c.supervisor_pid_file.parent.mkdir(parents=True)
    c.supervisor_pid_file.write_text(f"{os.getpid()}\n")  # a live process stands for the supervisor
    monkeypatch.setattr(c, "overview", lambda: {"taskmanagers": 0})
    assert c.status().detail == "no TaskManager registered: the stack's supervisor starts one 7s after it was lost"
    c.log_dir.mkdir(parents=True)
    c.supervisor_log.write_text(
        f"2026-12-05T18:00:00+00:00 supervising\n2026-12-05T18:36:31+00:00 {REPLACED} (it was gone for at least 7s)\n"
    )
    monkeypatch.setattr(c, "overview", lambda: {"taskmanagers": 1, "slots-total": 4, "jobs-running": 2})
    detail = c.status().detail
    assert detail.startswith(
        "taskmanagers=1 slots=4 running_jobs=2; the supervisor replaced 1 lost TaskManager(s), the last at 2026-12-05T18:36:31+00:00"
    )


def test_stack_status_judges_only_the_parts_the_config_uses(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from meterflow.commands import cli
    from meterflow.local.base import ComponentStatus
    from meterflow.local.stack import LocalStack

    path = tmp_path / "meterflow.yaml"
    path.write_text("stack:\n  state_dir: state\n")
    parts = [
        ComponentStatus("kafka", True, "k"),
        ComponentStatus("stripe-mock", False, "s", "not used by this config", wanted=False),
    ]
    monkeypatch.setattr(LocalStack, "status", lambda self: parts)
    assert CliRunner().invoke(cli, ["--config", str(path), "stack", "status"]).exit_code == 0
    parts.append(ComponentStatus("flink", False, "f", "no TaskManager registered: `meterflow stack up` starts one"))
    result = CliRunner().invoke(cli, ["--config", str(path), "stack", "status"])
    assert result.exit_code == 1 and "no TaskManager registered" in result.output
