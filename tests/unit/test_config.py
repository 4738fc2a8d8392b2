"""Config loading: defaults, YAML, env overrides, secrets and validation."""

from __future__ import annotations

from datetime import timedelta

import pytest

from meterflow.config import load_config
from meterflow.config_values import format_duration, parse_duration
from meterflow.errors import ConfigError
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", timedelta(milliseconds=500)),
        ("10s", timedelta(seconds=10)),
        ("5m", timedelta(minutes=5)),
        ("5min", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("7d", timedelta(days=7)),
        (" 3 s ", timedelta(seconds=3)),
    ],
)
def test_parse_duration(text, expected):
    """Durations with units parse exactly."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["10", "1.5s", "-1s", "ten seconds", "", 10])
def test_parse_duration_rejects(bad):
    """A duration without a unit or with a fraction is refused."""
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(bad)


@pytest.mark.parametrize("text", ["250ms", "10s", "5m", "2h", "7d"])
def test_format_duration_round_trips(text):
    """format_duration is the inverse of parse_duration."""
    assert format_duration(parse_duration(text)) == text


def test_repo_config_loads_and_matches_defaults():
    """meterflow.yaml at the repo root is valid and states the documented defaults."""
    cfg = load_config(REPO_ROOT / "meterflow.yaml", environ={})
    assert cfg.kafka.usage_events_topic == "usage-events"
    assert cfg.kafka.late_events_topic == "usage-events-late"
    assert cfg.event_time.window_size == timedelta(minutes=1)
    assert cfg.event_time.watermark_delay == timedelta(seconds=5)
    assert cfg.event_time.dedup_horizon == timedelta(days=7)
    assert cfg.state_dir == REPO_ROOT / ".stack"


def test_env_overrides_nested_keys(write_config):
    """METERFLOW_<SECTION>__<KEY> overrides the file."""
    path = write_config("kafka:\n  bootstrap_servers: a:1\n")
    cfg = load_config(
        path, environ={"METERFLOW_KAFKA__BOOTSTRAP_SERVERS": "b:2", "METERFLOW_EVENT_TIME__WINDOW_SIZE": "5m"}
    )
    assert cfg.kafka.bootstrap_servers == "b:2"
    assert cfg.event_time.window_size == timedelta(minutes=5)


def test_unknown_key_is_an_error(write_config):
    """A misspelt key is reported, not ignored."""
    path = write_config("kafka:\n  bootstrap_server: a:1\n")
    with pytest.raises(ConfigError, match="bootstrap_server"):
        load_config(path, environ={})


def test_unknown_env_override_is_an_error(write_config):
    """A misspelt env override is reported too."""
    with pytest.raises(ConfigError, match="topicz"):
        load_config(write_config(""), environ={"METERFLOW_KAFKA__TOPICZ": "x"})


def test_secret_from_secrets_file_and_env_wins(write_config, tmp_path):
    """The password comes from the secrets file, and the environment overrides it."""
    (tmp_path / "secrets.env").write_text("# comment\nMETERFLOW_POSTGRES_PASSWORD='from-file'\n")
    path = write_config("secrets_file: secrets.env\n")
    assert load_config(path, environ={}).postgres.password.get_secret_value() == "from-file"
    env = {"METERFLOW_POSTGRES_PASSWORD": "from-env"}
    assert load_config(path, environ=env).postgres.password.get_secret_value() == "from-env"


def test_secret_is_not_printed(write_config):
    """The password never shows in the config's repr."""
    cfg = load_config(write_config(""), environ={"METERFLOW_POSTGRES_PASSWORD": "hunter2hunter2"})
    assert "hunter2hunter2" not in repr(cfg)
    assert "hunter2hunter2" not in str(cfg.model_dump())


def test_password_in_yaml_is_refused(write_config):
    """Secrets in the config file are refused with a pointer to the right place."""
    with pytest.raises(ConfigError, match="must not be in the config file"):
        load_config(write_config("postgres:\n  password: x\n"), environ={})


def test_missing_explicit_file_is_an_error(tmp_path):
    """An explicit config path that does not exist is an error."""
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", environ={})


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("event_time:\n  window_size: 1500ms\n", "whole number of seconds"),
        ("event_time:\n  window_size: 7m\n", "divide one day"),
        ("event_time:\n  window_size: 1h\n  dedup_horizon: 30m\n", "dedup_horizon"),
        ("event_time:\n  source_idle_timeout: 61s\n", "source_catch_up_timeout"),
        ("event_time:\n  source_idle_timeout: 10s\n  source_catch_up_timeout: 9999ms\n", "source_catch_up_timeout"),
        ("kafka:\n  partitions: 0\n", "partitions"),
        ("postgres:\n  port: 70000\n", "port"),
        ("kafka: [1, 2]\n", "kafka"),
        ("input:\n  max_unique_values: 0\n", "max_unique_values"),
        ("input:\n  max_unique_values: 1000001\n", "max_unique_values"),
    ],
)
def test_invalid_values_are_reported(write_config, yaml_text, message):
    """Inconsistent values fail with a message naming the key."""
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(yaml_text), environ={})


def test_the_unique_value_cap_takes_its_whole_range(write_config):
    """1 and 1,000,000 are the ends of ``input.max_unique_values``; one past each is refused (above)."""
    for value in (1, 1_000_000):
        cfg = load_config(write_config(f"input:\n  max_unique_values: {value}\n"), environ={})
        assert cfg.input.max_unique_values == value


def test_relative_paths_resolve_against_config_dir(write_config, tmp_path):
    """state_dir and checkpoint_dir are relative to the config file, not the working directory."""
    cfg = load_config(write_config("stack:\n  state_dir: st\nflink:\n  checkpoint_dir: st/cp\n"), environ={})
    assert cfg.state_dir == tmp_path / "st"
    assert cfg.checkpoint_uri() == (tmp_path / "st" / "cp").as_uri()


@pytest.mark.parametrize(
    "field",
    [
        "postgres.usage_table",
        "billing.ledger_table",
        "billing.customers_table",
        "billing.carry_table",
        "corrections.table",
        "corrections.events_table",
        "corrections.offsets_table",
    ],
)
def test_a_table_name_the_config_accepts_is_one_the_sql_accepts(write_config, field):
    """Table names go unquoted into the generated SQL: the config refuses what check_identifier would,
    when it loads (an upper-case letter, a hyphen, 64 characters), not later in the DDL."""
    from sinks.postgres_schema import check_identifier

    section, key = field.split(".")
    for good in ("usage_windows", "_t1", "a" * 63):
        cfg = load_config(write_config(f"{section}:\n  {key}: {good}\n"), environ={})
        assert check_identifier(getattr(getattr(cfg, section), key)) == good
    for bad in ("Usage", "usage-windows", "a" * 64, "1usage"):
        with pytest.raises(ConfigError, match=key):
            load_config(write_config(f"{section}:\n  {key}: '{bad}'\n"), environ={})
        with pytest.raises(ValueError):
            check_identifier(bad)
