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
    cfg = load_config(write_config("kafka:\n  bootstrap_servers: 127.0.0.1:19092\nstack:\n  kafka_controller_port: 19093\n"), environ={})
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
            capture_output=True, text=True, check=True,
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
