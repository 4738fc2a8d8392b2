"""Topic administration with kafka-python's admin client."""

from __future__ import annotations

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError


def ensure_topics(bootstrap_servers: str, topics: list[str], partitions: int) -> None:
    """Create the topics that do not exist yet (single broker: replication factor 1)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="meterflow-admin", request_timeout_ms=10_000)
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # created concurrently by another caller: the goal state holds
    finally:
        admin.close()


def delete_topics(bootstrap_servers: str, topics: list[str]) -> None:
    """Delete topics (tests clean up the uuid topics they created)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="meterflow-admin", request_timeout_ms=10_000)
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

    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="meterflow-admin", request_timeout_ms=10_000)
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
