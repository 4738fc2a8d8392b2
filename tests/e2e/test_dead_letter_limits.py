"""Dead letters always fit, on the real stack: the largest records a producer can send are written
whole to the dead-letter topic amid normal traffic, and the job never restarts.

Once a valid event with a 900 KB meter became a 1.8 MB dead letter (its payload and a reason that
quoted the meter); the transactional dead-letter writer refused it (max.request.size 1 MB), the
checkpoint failed, and the job restarted forever: metering stopped for every tenant. Now the reason
is cut at 1,000 characters and the dead-letter topic and its writer take ``kafka.max_message_bytes``
+ 64 KiB, so even the largest message the input topic accepts is written whole as a dead letter.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import fastavro
import pytest

from connectors.avro_codec import UsageEvent, encode_usage_event
from connectors.avro_types import load_schema
from connectors.kafka_admin import describe_topic_configs
from connectors.kafka_reader import assigned_consumer
from connectors.producer import SyntheticSpec, send_events, synthetic_events
from connectors.topics import topic_configs
from jobs.plan import DEAD_LETTER_SCHEMA
from meterflow.input_contract import MAX_REASON_CHARS
from meterflow.local import flink_jobs
from tests.e2e.helpers import (
    closing_events,
    expected_totals,
    largest_accepted_value,
    private_job,
    read_topic,
    send_large,
    table_totals,
    wait_for,
)

pytestmark = [pytest.mark.e2e]

DEAD_SCHEMA = fastavro.parse_schema(load_schema(DEAD_LETTER_SCHEMA))
LOG_APPEND_TIME = 1  # kafka-python's ConsumerRecord.timestamp_type: 0 CreateTime, 1 LogAppendTime


def _decode_dead(value: bytes) -> dict:
    return {**fastavro.schemaless_reader(io.BytesIO(value), DEAD_SCHEMA), "record_bytes": len(value)}


def test_the_largest_records_are_dead_letters_whole_and_the_job_never_restarts(e2e_stack):
    """A 900 KB meter and the largest garbage the input accepts: both dead letters with their full payloads, no restart, exact windows."""
    # The search for the largest message leaves the partitions without events for seconds: an idle
    # timeout longer than the test keeps every partition holding the watermark (docs/operations.md,
    # "How time moves": after an idle gap the first partition to deliver moves it on its own).
    cfg, path = private_job(
        e2e_stack,
        "dlsize",
        event_time={**e2e_stack.base["event_time"], "source_idle_timeout": "10m", "source_catch_up_timeout": "10m"},
    )
    k = cfg.kafka
    assert cfg.flink.parallelism == 2 and k.partitions == 3
    # The topics as the project creates them, which `meterflow submit` accepts.
    goal = topic_configs(cfg)
    assert describe_topic_configs(k.bootstrap_servers, goal) == goal  # the late and closed-windows topics: defaults
    flink_jobs.check_input_topics(cfg)

    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    before = list(
        synthetic_events(
            SyntheticSpec(count=3_000, tenants=3, customers=5, start=start, span=timedelta(seconds=60), seed=21)
        )
    )
    after = list(
        synthetic_events(
            SyntheticSpec(
                count=3_000,
                tenants=3,
                customers=5,
                start=start + timedelta(seconds=60),
                span=timedelta(seconds=60),
                seed=22,
            )
        )
    )
    after = [{**e, "event_id": f"after-{e['event_id']}"} for e in after]
    big_meter = encode_usage_event(
        UsageEvent(
            event_id="big-meter",
            tenant_id="tenant-0",
            customer_id="cust-0",
            meter="m" * 900_000,
            quantity=Decimal(1),
            event_time=start + timedelta(seconds=30),
            dimensions={},
        )
    )
    assert len(big_meter) > 900_000

    job_id = flink_jobs.submit(cfg, path)
    try:
        send_events(k.bootstrap_servers, k.usage_events_topic, before, rate=1_000)
        send_large(k.bootstrap_servers, k.usage_events_topic, big_meter)
        garbage = largest_accepted_value(k.bootstrap_servers, k.usage_events_topic, k.max_message_bytes)
        assert k.max_message_bytes - 200 < len(garbage) < k.max_message_bytes
        send_events(k.bootstrap_servers, k.usage_events_topic, after, rate=1_000)
        send_events(
            k.bootstrap_servers,
            k.usage_events_topic,
            closing_events(start + timedelta(minutes=2), k.partitions),
            partition_for=lambda i, e: i,
        )

        expected = expected_totals(before + after, cfg.event_time.window_size)
        wait_for(
            lambda: {key: (r.quantity, r.event_count) for key, r in table_totals(cfg).items()} == expected,
            300,
            "the normal windows equal to the oracle",
        )
        wait_for(
            lambda: len(read_topic(k.bootstrap_servers, k.dead_letter_topic, _decode_dead)) >= 2,
            120,
            "both dead letters committed",
        )

        # Never restarted, never restored: the writer took both dead letters in its first attempt.
        assert flink_jobs.job_details(cfg, job_id)["state"] == "RUNNING"
        assert flink_jobs.restarts(cfg, job_id) == 0
        assert (flink_jobs.checkpoint_stats(cfg, job_id).get("latest") or {}).get("restored") is None

        dead = read_topic(k.bootstrap_servers, k.dead_letter_topic, _decode_dead)
        assert len(dead) == 2, [d["reason"][:120] for d in dead]
        by_payload = {d["payload"]: d for d in dead}
        assert set(by_payload) == {big_meter, garbage}  # full payloads, byte for byte
        meter_letter, garbage_letter = by_payload[big_meter], by_payload[garbage]
        # The reason says why without quoting the whole meter: at most MAX_REASON_CHARS and the cut mark.
        assert meter_letter["reason"].startswith(("contract: meter", "unknown meter: ")), meter_letter["reason"][:200]
        assert len(meter_letter["reason"]) <= MAX_REASON_CHARS + 40
        assert garbage_letter["reason"].startswith("malformed Avro"), garbage_letter["reason"][:200]
        assert "payload cut" not in meter_letter["reason"] + garbage_letter["reason"]
        # The garbage's dead letter is larger than anything the input topic takes: the headroom is used.
        assert garbage_letter["record_bytes"] > k.max_message_bytes
        assert {d["source_topic"] for d in dead} == {k.usage_events_topic}
    finally:
        flink_jobs.cancel(cfg, job_id)

    # The input's record timestamps are the broker's: LogAppendTime, whatever the producer stamped.
    with assigned_consumer(
        k.bootstrap_servers,
        k.usage_events_topic,
        consumer_timeout_ms=5000,
        max_partition_fetch_bytes=2 * k.max_message_bytes,
    ) as (consumer, partitions):
        consumer.seek_to_beginning(*partitions)
        batch = next(iter(consumer.poll(timeout_ms=5000, max_records=10).values()))
        assert {r.timestamp_type for r in batch} == {LOG_APPEND_TIME}
