"""Security posture as plain checks: loopback-only listeners, SQL-safe names, no password in the job graph."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from meterflow.config import load_config
from meterflow.errors import ConfigError
from meterflow.local.flink import FLINK_CONF_TEMPLATE, FlinkCluster
from meterflow.local.kafka import KafkaBroker
from meterflow.security import (
    POSTGRES_PASSWORD_VARIABLE,
    exposed_listeners,
    is_loopback,
    pg_identifier,
    pg_string_literal,
    window_sink_target_of,
)
from tests.conftest import REPO_ROOT

# Every key of a Flink config that names an address a process listens on.
FLINK_BIND_KEYS = (("jobmanager", "bind-host"), ("taskmanager", "bind-host"), ("rest", "bind-address"))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "", "10.0.0.5", "192.168.1.2", "jobmanager", "kafka.example.com", "127.0.0.1.example.com"]
)
def test_other_hosts_are_not_loopback(host):
    assert not is_loopback(host)


def test_default_config_exposes_nothing():
    """The shipped meterflow.yaml binds every local listener to loopback."""
    assert exposed_listeners(load_config(REPO_ROOT / "meterflow.yaml", environ={})) == {}


def test_non_loopback_listeners_are_named(write_config):
    """A config that would bind Kafka or the Flink REST API elsewhere is reported by key."""
    cfg = load_config(
        write_config("kafka:\n  bootstrap_servers: 0.0.0.0:9092\nflink:\n  rest_host: 10.1.2.3\n"), environ={}
    )
    assert exposed_listeners(cfg) == {"kafka.bootstrap_servers": "0.0.0.0", "flink.rest_host": "10.1.2.3"}


def test_shipped_flink_conf_binds_loopback():
    """flink-conf/config.yaml: the JobManager RPC and REST endpoints and the TaskManager bind 127.0.0.1."""
    conf = yaml.safe_load(FLINK_CONF_TEMPLATE.read_text())
    for section, key in FLINK_BIND_KEYS:
        assert is_loopback(conf[section][key]), f"{section}.{key} = {conf[section][key]}"
    assert "0.0.0.0" not in FLINK_CONF_TEMPLATE.read_text()


def test_local_flink_conf_binds_loopback(tmp_path):
    """The config `stack up` writes for the local cluster binds every endpoint and the metrics reporter to loopback."""
    cfg = load_config(REPO_ROOT / "meterflow.yaml", environ={"METERFLOW_STACK__STATE_DIR": str(tmp_path)})
    conf = FlinkCluster(cfg).config()
    for section, key in FLINK_BIND_KEYS:
        assert is_loopback(str(conf[section][key])), f"{section}.{key}"
    assert is_loopback(conf["rest"]["address"]) and is_loopback(conf["taskmanager"]["host"])
    assert is_loopback(conf["metrics"]["reporter"]["prom"]["host"])


def test_local_kafka_listens_on_loopback():
    """Every listener of the local broker (clients and controller) is on loopback."""
    cfg = load_config(REPO_ROOT / "meterflow.yaml", environ={})
    props = dict(line.split("=", 1) for line in KafkaBroker(cfg).properties().splitlines() if line)
    for listener in props["listeners"].split(","):
        assert is_loopback(re.match(r"\w+://(.*):\d+$", listener).group(1)), listener


@pytest.mark.parametrize("name", ["meterflow", "usage_windows", "_x", "A1", "a" * 63])
def test_plain_identifiers_are_quoted(name):
    assert pg_identifier(name) == f'"{name}"'


@pytest.mark.parametrize("name", ["", "1table", 'a"b', "a b", "a;drop", "a.b", "a-b", "a'b", "ä", "a" * 64, "x\x00"])
def test_other_identifiers_are_refused(name):
    with pytest.raises(ValueError, match="invalid Postgres identifier"):
        pg_identifier(name)


def test_string_literal_doubles_quotes():
    assert pg_string_literal("it's") == "'it''s'"
    assert pg_string_literal("a\\b") == "'a\\b'"
    with pytest.raises(ValueError, match="NUL"):
        pg_string_literal("a\x00b")


@pytest.mark.parametrize("key", ["database", "user", "usage_table"])
def test_config_refuses_names_that_are_not_identifiers(write_config, key):
    """database, user and usage_table reach SQL and psql: the config refuses anything else."""
    with pytest.raises(ConfigError, match=key):
        load_config(write_config(f"postgres:\n  {key}: 'x\"; DROP TABLE y; --'\n"), environ={})


def test_window_sink_target_carries_the_source_not_the_password(write_config, tmp_path):
    """The usage job's Postgres sink gets the variable and secrets file, never the password value."""
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"{POSTGRES_PASSWORD_VARIABLE}=only-on-the-taskmanager\n")
    cfg = load_config(write_config(f"secrets_file: {secrets.name}\n"), environ={})
    assert cfg.postgres.password.get_secret_value() == "only-on-the-taskmanager"
    target = window_sink_target_of(cfg)
    assert target.password_variable == POSTGRES_PASSWORD_VARIABLE
    assert Path(target.secrets_file) == secrets and Path(target.secrets_file).is_absolute()
    assert "only-on-the-taskmanager" not in repr(target)


def test_usage_job_builds_the_sink_from_the_target():
    """jobs/usage_job.py hands UsageWindowSink a jvm/ Secrets, not a password string."""
    source = (REPO_ROOT / "jobs" / "usage_job.py").read_text()
    call = re.search(r"UsageWindowSink\((.*?)\)\n", source).group(1)
    assert "password" in call and ".password)" not in source
    assert "operators.Secrets(target.password_variable, target.secrets_file)" in source
    assert "get_secret_value" not in source


def test_secret_from_a_mounted_file(write_config, tmp_path):
    """METERFLOW_POSTGRES_PASSWORD_FILE names a file whose whole content is the password (Docker/Kubernetes secrets)."""
    mounted = tmp_path / "pg"
    mounted.write_text("from-the-mount\n")
    path = write_config("postgres:\n  host: db\n")
    cfg = load_config(path, environ={f"{POSTGRES_PASSWORD_VARIABLE}_FILE": str(mounted)})
    assert cfg.postgres.password.get_secret_value() == "from-the-mount"
    both = load_config(
        path, environ={f"{POSTGRES_PASSWORD_VARIABLE}_FILE": str(mounted), POSTGRES_PASSWORD_VARIABLE: "direct"}
    )
    assert both.postgres.password.get_secret_value() == "direct"
    with pytest.raises(ConfigError, match="_FILE"):
        load_config(path, environ={f"{POSTGRES_PASSWORD_VARIABLE}_FILE": str(tmp_path / "absent")})


def test_role_statements_go_to_psql_on_stdin(write_config, tmp_path, monkeypatch):
    """CREATE ROLE carries the password as a quoted literal on psql's standard input, never on its command line."""
    import subprocess

    from meterflow.local import postgres

    password = "it's-a-secret"
    cfg = load_config(
        write_config("postgres:\n  user: meter_role\n  database: meter_db\n"),
        environ={POSTGRES_PASSWORD_VARIABLE: password},
    )
    calls: list[tuple[list[str], str]] = []

    def fake_as_postgres(self, args, **kw):
        calls.append((args, kw.get("input", "")))
        return subprocess.CompletedProcess(args, 0, stdout="", stderr="")  # role and database absent: create both

    monkeypatch.setattr(postgres, "postgres_bin_dir", lambda: tmp_path)
    monkeypatch.setattr(postgres.PostgresServer, "as_postgres", fake_as_postgres)
    postgres.PostgresServer(cfg).ensure_role_and_db()
    statements = [sql for _, sql in calls]
    assert "CREATE ROLE \"meter_role\" LOGIN PASSWORD 'it''s-a-secret'" in statements
    assert 'CREATE DATABASE "meter_db" OWNER "meter_role"' in statements
    assert "SELECT 1 FROM pg_roles WHERE rolname = 'meter_role'" in statements
    for args, _ in calls:
        assert not any(password in arg for arg in args), args
        assert args[-2:] == ["-f", "-"]


def test_stack_up_refuses_non_loopback_listeners(write_config):
    """`stack up` stops before starting anything when a listener would bind another address."""
    from meterflow.errors import StackError
    from meterflow.local.stack import LocalStack

    cfg = load_config(write_config("flink:\n  rest_host: 0.0.0.0\n"), environ={})
    with pytest.raises(StackError, match="flink.rest_host=0.0.0.0"):
        LocalStack(cfg).up(echo=lambda message: pytest.fail(f"started something: {message}"))
