"""The topics the project creates, each with its configs: one home for the local stack, the tests,
docker-compose.yml and ops/k8s/topics.yaml (unit tests keep those two in step with ``topic_configs``).

* The usage-events topic is ``LogAppendTime``: the broker stamps each record as it appends it, so
  the Kafka timestamp the job judges an event time against (jobs/source_plan.py
  ``bounded_event_time``) is the broker's clock, stored in the log and the same on every replay,
  never a producer's. Its ``max.message.bytes`` is ``kafka.max_message_bytes``: the largest input.
* The dead-letter topic takes ``DEAD_LETTER_HEADROOM_BYTES`` more: a dead letter is the input
  message, a bounded reason and its coordinates, so every record the input accepts fits.
* The late-events and closed-windows topics carry valid events and windows (a few KB): defaults.
* The brokers let a transaction stay open for ``BROKER_TRANSACTION_MAX_TIMEOUT_MS``: the jobs'
  ``kafka.transaction_timeout`` (24 h by default) must fit under it, or their producers fail.

Pure: no Kafka client here (connectors/kafka_admin.py applies and reads the configs).
"""

from __future__ import annotations

from collections.abc import Mapping

from meterflow.config import JobConfig
from meterflow.input_contract import DEAD_LETTER_HEADROOM_BYTES

MAX_MESSAGE_BYTES = "max.message.bytes"
TIMESTAMP_TYPE = "message.timestamp.type"
LOG_APPEND_TIME = "LogAppendTime"

TopicConfigs = Mapping[str, Mapping[str, str]]

TRANSACTION_MAX_TIMEOUT = "transaction.max.timeout.ms"
# 7 days: room to raise kafka.transaction_timeout past a long outage without touching the brokers.
BROKER_TRANSACTION_MAX_TIMEOUT_MS = 7 * 24 * 3600 * 1000


def dead_letter_max_message_bytes(cfg: JobConfig) -> int:
    """The dead-letter topic's max.message.bytes, and its writer's max.request.size."""
    return cfg.kafka.max_message_bytes + DEAD_LETTER_HEADROOM_BYTES


def topic_configs(cfg: JobConfig) -> dict[str, dict[str, str]]:
    """Each topic the project creates, in the order of the kafka section, with the configs it must have."""
    k = cfg.kafka
    return {
        k.usage_events_topic: {MAX_MESSAGE_BYTES: str(k.max_message_bytes), TIMESTAMP_TYPE: LOG_APPEND_TIME},
        k.late_events_topic: {},
        k.dead_letter_topic: {MAX_MESSAGE_BYTES: str(dead_letter_max_message_bytes(cfg))},
        k.closed_windows_topic: {},
    }


def config_drift(goal: TopicConfigs, actual: TopicConfigs) -> dict[str, dict[str, str]]:
    """Per existing topic, the goal configs it does not have yet (key -> goal value).

    A topic absent from ``actual`` does not exist: it is created with its configs, not altered.
    """
    drift = {}
    for topic, configs in goal.items():
        if topic in actual:
            changes = {key: value for key, value in configs.items() if actual[topic].get(key) != value}
            if changes:
                drift[topic] = changes
    return drift


def alter_command(bootstrap_servers: str, topic: str, configs: Mapping[str, str]) -> str:
    """The kafka-configs.sh call that sets ``configs`` on an existing topic."""
    pairs = ",".join(f"{key}={value}" for key, value in configs.items())
    return f"kafka-configs.sh --bootstrap-server {bootstrap_servers} --alter --entity-type topics --entity-name {topic} --add-config {pairs}"


def create_command(bootstrap_servers: str, topic: str, partitions: int, configs: Mapping[str, str]) -> str:
    """The kafka-topics.sh call that creates ``topic`` with ``configs``."""
    flags = "".join(f" --config {key}={value}" for key, value in configs.items())
    return f"kafka-topics.sh --bootstrap-server {bootstrap_servers} --create --topic {topic} --partitions {partitions}{flags}"


def topic_problems(cfg: JobConfig, actual: TopicConfigs) -> list[str]:
    """Why the usage job must not start on these topics, each with the command that fixes it; [] when none.

    ``actual`` holds the effective configs of the topics that exist (absent: the topic does not).
    The usage-events topic must be LogAppendTime (else a producer's clock bounds the event time) and
    take exactly ``kafka.max_message_bytes`` (the dead letters are sized for that); the dead-letter
    topic must take at least what a dead letter of the largest input needs.
    """
    k = cfg.kafka
    goal = topic_configs(cfg)
    fix = "run `meterflow stack up` (the local stack sets it), or"
    problems = []
    for topic in (k.usage_events_topic, k.dead_letter_topic):
        if topic not in actual:
            problems.append(
                f"topic {topic} does not exist: {fix} {create_command(k.bootstrap_servers, topic, k.partitions, goal[topic])}"
            )
    usage = actual.get(k.usage_events_topic)
    if usage is not None:
        timestamp_type = usage.get(TIMESTAMP_TYPE)
        if timestamp_type != LOG_APPEND_TIME:
            problems.append(
                f"topic {k.usage_events_topic} has {TIMESTAMP_TYPE}={timestamp_type}: its record timestamps are the producers' clocks,"
                f" and the job bounds event times by them. {fix} {alter_command(k.bootstrap_servers, k.usage_events_topic, {TIMESTAMP_TYPE: LOG_APPEND_TIME})}"
            )
        size = usage.get(MAX_MESSAGE_BYTES)
        if size != str(k.max_message_bytes):
            problems.append(
                f"topic {k.usage_events_topic} has {MAX_MESSAGE_BYTES}={size}, kafka.max_message_bytes is {k.max_message_bytes}:"
                f" set one to the other. {fix} {alter_command(k.bootstrap_servers, k.usage_events_topic, {MAX_MESSAGE_BYTES: str(k.max_message_bytes)})}"
            )
    dead = actual.get(k.dead_letter_topic)
    if dead is not None:
        size, needed = dead.get(MAX_MESSAGE_BYTES), dead_letter_max_message_bytes(cfg)
        if size is None or not size.isdigit() or int(size) < needed:
            problems.append(
                f"topic {k.dead_letter_topic} has {MAX_MESSAGE_BYTES}={size}, below the {needed} a dead letter of the largest input needs"
                f" (kafka.max_message_bytes + {DEAD_LETTER_HEADROOM_BYTES}). {fix} {alter_command(k.bootstrap_servers, k.dead_letter_topic, {MAX_MESSAGE_BYTES: str(needed)})}"
            )
    return problems


def transaction_timeout_problem(cfg: JobConfig, broker_max_ms: int) -> str | None:
    """Why the jobs' Kafka producers would fail on these brokers (their transaction timeout is above
    the brokers' ``transaction.max.timeout.ms``), or None."""
    wanted_ms = int(cfg.kafka.transaction_timeout.total_seconds() * 1000)
    if wanted_ms <= broker_max_ms:
        return None
    return (
        f"kafka.transaction_timeout is {wanted_ms} ms and the brokers allow at most {TRANSACTION_MAX_TIMEOUT}={broker_max_ms}:"
        f" raise {TRANSACTION_MAX_TIMEOUT} on the brokers (the project's brokers: {BROKER_TRANSACTION_MAX_TIMEOUT_MS}) or lower kafka.transaction_timeout"
    )
