"""Topic administration with kafka-python's admin client."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka.errors import TopicAlreadyExistsError

from connectors.topics import TRANSACTION_MAX_TIMEOUT, config_drift, topic_configs
from meterflow.config import JobConfig


def _admin(bootstrap_servers: str) -> KafkaAdminClient:
    return KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="meterflow-admin", request_timeout_ms=10_000)


def ensure_project_topics(cfg: JobConfig) -> dict[str, dict[str, str]]:
    """The project's topics (connectors/topics.py ``topic_configs``) created or brought to their configs."""
    return ensure_topics(cfg.kafka.bootstrap_servers, topic_configs(cfg), cfg.kafka.partitions)


def ensure_topics(
    bootstrap_servers: str, topics: Iterable[str] | Mapping[str, Mapping[str, str]], partitions: int
) -> dict[str, dict[str, str]]:
    """Create the topics that do not exist yet with their configs (single broker: replication factor 1),
    and set on the existing ones the configs they lack; returns what it set on existing topics.

    ``topics`` maps each name to its configs; a plain list of names means no configs. Only the
    given keys are set (IncrementalAlterConfigs), every other config of the topic stays as it is.
    Altering is safe for these keys: a new timestamp type or size limit applies to records
    appended from then on, and the records already in the log keep theirs.
    """
    goal = {t: dict(c) for t, c in topics.items()} if isinstance(topics, Mapping) else {t: {} for t in topics}
    admin = _admin(bootstrap_servers)
    try:
        existing = set(admin.list_topics())
        missing = {
            t: {"num_partitions": partitions, "replication_factor": 1, "configs": c}
            for t, c in goal.items()
            if t not in existing
        }
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                existing |= set(missing)  # created concurrently by another caller: checked below like the others
        present = {t: c for t, c in goal.items() if t in existing and c}
        drift = config_drift(present, _describe(admin, present)) if present else {}
        if drift:
            results = admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, t, c) for t, c in drift.items()])
            failed = {t: r for t, r in results.get("topic", {}).items() if r != "OK"}
            if failed:
                msg = f"cannot set the configs of topics {failed}"
                raise RuntimeError(msg)
        return drift
    finally:
        admin.close()


def describe_topic_configs(bootstrap_servers: str, topics: Mapping[str, Iterable[str]]) -> dict[str, dict[str, str]]:
    """The effective values of the given config keys of each topic that exists (absent ones are left out)."""
    admin = _admin(bootstrap_servers)
    try:
        existing = set(admin.list_topics())
        return _describe(admin, {t: keys for t, keys in topics.items() if t in existing})
    finally:
        admin.close()


def broker_transaction_max_timeout_ms(bootstrap_servers: str) -> int:
    """The smallest ``transaction.max.timeout.ms`` over the cluster's brokers: what every transaction coordinator allows."""
    admin = _admin(bootstrap_servers)
    try:
        brokers = [b["broker_id"] for b in admin.describe_cluster()["brokers"]]
        resources = [
            ConfigResource(ConfigResourceType.BROKER, str(b), {TRANSACTION_MAX_TIMEOUT: None}) for b in brokers
        ]
        described = admin.describe_configs(resources, config_filter="all").get("broker", {})
        return min(int(entries[TRANSACTION_MAX_TIMEOUT]["value"]) for entries in described.values())
    finally:
        admin.close()


def _describe(admin: KafkaAdminClient, topics: Mapping[str, Iterable[str]]) -> dict[str, dict[str, str]]:
    topics = {t: list(keys) for t, keys in topics.items()}
    # No keys asked would mean every key to the broker: a topic without keys is not asked about.
    resources = [ConfigResource(ConfigResourceType.TOPIC, t, dict.fromkeys(keys)) for t, keys in topics.items() if keys]
    # Every source ('all'): a key the topic does not override has the broker's value, which is the effective one.
    described = admin.describe_configs(resources, config_filter="all").get("topic", {}) if resources else {}
    values = {}
    for topic, keys in topics.items():
        wanted = set(keys)
        values[topic] = {key: entry["value"] for key, entry in described.get(topic, {}).items() if key in wanted}
    return values


def delete_topics(bootstrap_servers: str, topics: list[str]) -> None:
    """Delete topics (tests clean up the uuid topics they created)."""
    admin = _admin(bootstrap_servers)
    try:
        present = set(admin.list_topics())
        doomed = [t for t in topics if t in present]
        if doomed:
            admin.delete_topics(doomed)
    finally:
        admin.close()


def group_lag(bootstrap_servers: str, group: str, topic: str) -> int:
    """Records of ``topic`` the consumer group has not committed yet (end offsets − committed offsets)."""
    from kafka import KafkaConsumer, TopicPartition

    admin = _admin(bootstrap_servers)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, isolation_level="read_committed")
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = consumer.end_offsets(partitions)
        # kafka-python 3.x (2.x called it list_consumer_group_offsets). Asked for explicit partitions,
        # a partition the group never committed comes back with offset -1: count it from 0.
        committed = admin.list_group_offsets({group: partitions}).get(group, {})
        return sum(ends[tp] - max(committed[tp].offset if tp in committed else 0, 0) for tp in partitions)
    finally:
        consumer.close()
        admin.close()


def committed_offsets(bootstrap_servers: str, group: str, topic: str) -> dict[int, int]:
    """The next offset per partition of ``topic`` that ``group`` committed (partitions it never committed are absent)."""
    from kafka import KafkaConsumer, TopicPartition

    admin = _admin(bootstrap_servers)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        committed = admin.list_group_offsets({group: partitions}).get(group, {})
        return {
            tp.partition: committed[tp].offset for tp in partitions if tp in committed and committed[tp].offset >= 0
        }
    finally:
        consumer.close()
        admin.close()
