"""The project's topics and their configs (connectors/topics.py): what is created, what is altered,
and what ``meterflow submit`` refuses, each limit exactly at it and one past it."""

from __future__ import annotations

import pytest

import connectors.kafka_admin as kafka_admin
from connectors.topics import (
    BROKER_TRANSACTION_MAX_TIMEOUT_MS,
    LOG_APPEND_TIME,
    MAX_MESSAGE_BYTES,
    TIMESTAMP_TYPE,
    alter_command,
    config_drift,
    dead_letter_max_message_bytes,
    topic_configs,
    topic_problems,
)
from meterflow.config import load_config
from meterflow.errors import JobSubmissionError
from meterflow.input_contract import DEAD_LETTER_HEADROOM_BYTES
from meterflow.local import flink_jobs

MIB = 1_048_576


@pytest.fixture
def cfg(write_config):
    return load_config(write_config(""), environ={})


def _good(cfg) -> dict[str, dict[str, str]]:
    """What a well-configured cluster reports: the goal configs."""
    return {t: dict(c) for t, c in topic_configs(cfg).items()}


def test_each_topic_of_the_kafka_section_with_its_configs(cfg):
    """The input is LogAppendTime and sized as kafka.max_message_bytes; dead letters take the headroom more; the rest default."""
    k = cfg.kafka
    assert topic_configs(cfg) == {
        k.usage_events_topic: {MAX_MESSAGE_BYTES: str(MIB), TIMESTAMP_TYPE: LOG_APPEND_TIME},
        k.late_events_topic: {},
        k.dead_letter_topic: {MAX_MESSAGE_BYTES: str(MIB + 65_536)},
        k.closed_windows_topic: {},
    }
    assert list(topic_configs(cfg)) == [
        k.usage_events_topic,
        k.late_events_topic,
        k.dead_letter_topic,
        k.closed_windows_topic,
    ]


def test_sizes_follow_the_configured_input_limit(write_config):
    """At the smallest allowed kafka.max_message_bytes the dead-letter topic still takes the whole headroom more."""
    cfg = load_config(
        write_config("kafka:\n  max_message_bytes: 65536\n  dead_letter_topic: dl\n  usage_events_topic: in\n"),
        environ={},
    )
    assert topic_configs(cfg)["in"][MAX_MESSAGE_BYTES] == "65536"
    assert (
        topic_configs(cfg)["dl"][MAX_MESSAGE_BYTES]
        == str(65_536 + DEAD_LETTER_HEADROOM_BYTES)
        == str(dead_letter_max_message_bytes(cfg))
    )


def test_drift_is_the_goal_configs_an_existing_topic_lacks(cfg):
    """Only differing keys of existing topics; a missing topic is created, not altered; other keys are not touched."""
    k = cfg.kafka
    goal = topic_configs(cfg)
    actual = _good(cfg)
    assert config_drift(goal, actual) == {}
    actual[k.usage_events_topic] = {MAX_MESSAGE_BYTES: str(MIB), TIMESTAMP_TYPE: "CreateTime", "retention.ms": "1"}
    actual[k.dead_letter_topic] = {MAX_MESSAGE_BYTES: "1048588"}
    del actual[k.closed_windows_topic]
    assert config_drift(goal, actual) == {
        k.usage_events_topic: {TIMESTAMP_TYPE: LOG_APPEND_TIME},
        k.dead_letter_topic: {MAX_MESSAGE_BYTES: str(MIB + 65_536)},
    }


def test_topics_as_created_pass_the_submit_check(cfg):
    assert topic_problems(cfg, _good(cfg)) == []


def test_a_producer_clock_topic_is_refused_with_the_command_that_fixes_it(cfg):
    """CreateTime (the default of a topic created elsewhere) lets a producer's clock bound event times."""
    k = cfg.kafka
    actual = _good(cfg)
    actual[k.usage_events_topic][TIMESTAMP_TYPE] = "CreateTime"
    [problem] = topic_problems(cfg, actual)
    assert "message.timestamp.type=CreateTime" in problem and "meterflow stack up" in problem
    assert problem.endswith(
        f"kafka-configs.sh --bootstrap-server {k.bootstrap_servers} --alter --entity-type topics --entity-name {k.usage_events_topic}"
        " --add-config message.timestamp.type=LogAppendTime"
    )


@pytest.mark.parametrize(("size", "refused"), [(MIB, False), (MIB + 1, True), (MIB - 1, True), (1_048_588, True)])
def test_the_input_size_must_be_the_configured_limit(cfg, size, refused):
    """Exactly kafka.max_message_bytes passes; one byte more or less, or the broker default (1,048,588), is refused."""
    actual = _good(cfg)
    actual[cfg.kafka.usage_events_topic][MAX_MESSAGE_BYTES] = str(size)
    problems = topic_problems(cfg, actual)
    assert bool(problems) is refused
    if refused:
        assert f"max.message.bytes={size}" in problems[0] and problems[0].endswith(
            f"--add-config max.message.bytes={MIB}"
        )


@pytest.mark.parametrize(
    ("size", "refused"), [(MIB + 65_536, False), (MIB + 65_537, False), (MIB + 65_535, True), ("x", True)]
)
def test_the_dead_letter_topic_must_hold_a_dead_letter_of_the_largest_input(cfg, size, refused):
    """At least kafka.max_message_bytes + the headroom: exactly it passes, one byte less is refused."""
    actual = _good(cfg)
    actual[cfg.kafka.dead_letter_topic][MAX_MESSAGE_BYTES] = str(size)
    problems = topic_problems(cfg, actual)
    assert bool(problems) is refused
    if refused:
        assert problems[0].endswith(
            alter_command(
                cfg.kafka.bootstrap_servers, cfg.kafka.dead_letter_topic, {MAX_MESSAGE_BYTES: str(MIB + 65_536)}
            )
        )


def test_missing_topics_are_refused_with_the_create_command(cfg):
    """Without them a broker that creates topics on first use would make a CreateTime input."""
    k = cfg.kafka
    problems = topic_problems(cfg, {})
    assert len(problems) == 2
    assert problems[0].endswith(
        f"kafka-topics.sh --bootstrap-server {k.bootstrap_servers} --create --topic {k.usage_events_topic} --partitions {k.partitions}"
        f" --config max.message.bytes={MIB} --config message.timestamp.type=LogAppendTime"
    )
    assert f"--topic {k.dead_letter_topic}" in problems[1]


def test_check_input_topics_reads_the_keys_it_judges(cfg, monkeypatch):
    """The thin admin call: the effective values of the checked keys; a problem is a JobSubmissionError listing each."""
    k = cfg.kafka
    asked = []

    def describe(bootstrap, topics):
        asked.append((bootstrap, {t: tuple(keys) for t, keys in topics.items()}))
        return reported

    monkeypatch.setattr(kafka_admin, "describe_topic_configs", describe)
    reported = _good(cfg)
    flink_jobs.check_input_topics(cfg)
    assert asked == [
        (
            k.bootstrap_servers,
            {k.usage_events_topic: (TIMESTAMP_TYPE, MAX_MESSAGE_BYTES), k.dead_letter_topic: (MAX_MESSAGE_BYTES,)},
        )
    ]
    reported = {
        k.usage_events_topic: {TIMESTAMP_TYPE: "CreateTime", MAX_MESSAGE_BYTES: "1048588"},
        k.dead_letter_topic: {MAX_MESSAGE_BYTES: "1048588"},
    }
    with pytest.raises(JobSubmissionError) as refused:
        flink_jobs.check_input_topics(cfg)
    assert str(refused.value).count("\n- ") == 3


def test_submit_refuses_before_submitting(write_config, monkeypatch):
    """`meterflow submit` checks the topics first: nothing reaches the cluster when one is wrong."""
    from click.testing import CliRunner

    from meterflow.commands import cli

    path = write_config("")
    cfg = load_config(path, environ={})
    submitted = []
    monkeypatch.setattr(flink_jobs, "running_jobs", lambda c, name=None: [])
    monkeypatch.setattr(flink_jobs, "rest", lambda c, path: {"slots-total": 4})
    monkeypatch.setattr(
        flink_jobs, "submit", lambda c, p, savepoint=None: submitted.append(c.flink.job_name) or "0" * 32
    )
    reported = _good(cfg)
    reported[cfg.kafka.usage_events_topic][TIMESTAMP_TYPE] = "CreateTime"
    monkeypatch.setattr(kafka_admin, "describe_topic_configs", lambda bootstrap, topics: reported)
    monkeypatch.setattr(
        kafka_admin, "broker_transaction_max_timeout_ms", lambda bootstrap: BROKER_TRANSACTION_MAX_TIMEOUT_MS
    )
    result = CliRunner().invoke(cli, ["--config", str(path), "submit"])
    assert isinstance(result.exception, JobSubmissionError) and "LogAppendTime" in str(result.exception)
    assert submitted == []
    reported[cfg.kafka.usage_events_topic][TIMESTAMP_TYPE] = LOG_APPEND_TIME
    result = CliRunner().invoke(cli, ["--config", str(path), "submit"])
    assert result.exit_code == 0, result.output
    assert submitted == [cfg.flink.job_name]


class _FakeAdmin:
    """What ensure_topics asks of the admin client, against topics held in a dict."""

    topics: dict[str, dict[str, str]] = {}
    calls: list[tuple] = []

    def __init__(self, **options):
        pass

    def list_topics(self):
        return list(self.topics)

    def create_topics(self, new_topics):
        self.calls.append(("create", new_topics))
        for name, spec in new_topics.items():
            self.topics[name] = dict(spec["configs"])

    def describe_configs(self, resources, config_filter):
        assert config_filter == "all"
        return {
            "topic": {
                r.name: {key: {"value": self.topics[r.name].get(key, "broker")} for key in r.configs} for r in resources
            }
        }

    def alter_configs(self, resources):
        self.calls.append(("alter", {r.name: dict(r.configs) for r in resources}))
        for r in resources:
            self.topics[r.name].update(r.configs)
        return {"topic": {r.name: "OK" for r in resources}}

    def close(self):
        pass


def test_ensure_topics_creates_with_configs_and_sets_what_existing_topics_lack(cfg, monkeypatch):
    """Missing topics are created with their configs; existing ones get only the goal keys they lack; a second run changes nothing."""
    k = cfg.kafka
    _FakeAdmin.topics = {
        k.usage_events_topic: {TIMESTAMP_TYPE: "CreateTime", MAX_MESSAGE_BYTES: str(MIB), "retention.ms": "5"},
        k.late_events_topic: {},
    }
    _FakeAdmin.calls = []
    monkeypatch.setattr(kafka_admin, "KafkaAdminClient", _FakeAdmin)
    changed = kafka_admin.ensure_project_topics(cfg)
    assert changed == {k.usage_events_topic: {TIMESTAMP_TYPE: LOG_APPEND_TIME}}
    create, alter = _FakeAdmin.calls
    assert create == (
        "create",
        {
            k.dead_letter_topic: {
                "num_partitions": 3,
                "replication_factor": 1,
                "configs": {MAX_MESSAGE_BYTES: str(MIB + 65_536)},
            },
            k.closed_windows_topic: {"num_partitions": 3, "replication_factor": 1, "configs": {}},
        },
    )
    assert alter == ("alter", {k.usage_events_topic: {TIMESTAMP_TYPE: LOG_APPEND_TIME}})
    assert _FakeAdmin.topics[k.usage_events_topic]["retention.ms"] == "5"
    _FakeAdmin.calls = []
    assert kafka_admin.ensure_project_topics(cfg) == {}
    assert _FakeAdmin.calls == []
    # A plain list of names (bench/) creates without configs and alters nothing.
    assert kafka_admin.ensure_topics(k.bootstrap_servers, ["other"], 2) == {}
    assert _FakeAdmin.calls == [("create", {"other": {"num_partitions": 2, "replication_factor": 1, "configs": {}}})]
