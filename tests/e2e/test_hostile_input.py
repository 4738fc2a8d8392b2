"""Hostile records amid normal traffic on the real stack: none stops or corrupts metering.

One job (3 partitions, parallelism 2) counts a steady stream of normal events while every kind of
record that once stopped it, or could, is produced in the middle of that stream: a 900 KB meter
name, a NUL in each identifying field, ids of 3 KB and 70 KB, quantities whose sum overflows
``decimal(38, 9)``, a burst of group-by combinations past ``input.max_dimension_combinations``, a
burst of distinct values of a UNIQUE_COUNT meter past ``input.max_unique_values``, an
event from a producer whose clock is 50 minutes fast followed by a gap in the traffic, writers of an
evolved schema (single-object encoding and the registry's wire format, against a real registry),
a message with an unknown schema fingerprint and one with an unknown registry id, and the largest
message the input topic accepts.

Asserted from the Flink REST API and the outputs: the job never restarted and never restored a
checkpoint; every hostile record is in the dead-letter topic once, with its reason; the evolved
writers' events are counted; no event is late; and every normal window equals the oracle.
"""

from __future__ import annotations

import io
import json
import threading
import zlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import fastavro
import pytest

from connectors.avro_codec import (
    HISTORY_DIR,
    UsageEvent,
    decode_usage_event,
    encode_registry_framed,
    encode_single_object,
    encode_usage_event,
)
from connectors.avro_types import load_schema
from connectors.kafka_admin import group_lag
from connectors.producer import SyntheticSpec, message_key, send_events, synthetic_events
from connectors.schema_registry import register_schema, value_subject
from jobs.plan import DEAD_LETTER_SCHEMA, LATE_EVENT_SCHEMA
from meterflow.local import flink_jobs
from sinks.postgres import fetch_usage
from tests.e2e.helpers import (
    CLOSER_TENANT,
    closing_events,
    expected_totals,
    largest_accepted_value,
    private_job,
    read_topic,
    send_raw,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEAD_SCHEMA = fastavro.parse_schema(load_schema(DEAD_LETTER_SCHEMA))
BURST_TENANT = "burst"
MAX_COMBINATIONS = 5
BURST_EVENTS = 8
UNIQUE_TENANT = "unique_burst"
MAX_UNIQUE = 4
UNIQUE_USERS = 6  # two past the cap
METERS = [
    {"name": "api_calls", "aggregation": "SUM"},
    {"name": "tokens", "aggregation": "SUM"},
    {"name": "tokens_by_model", "aggregation": "SUM", "group_by": ["model"]},
    {"name": "active_users", "aggregation": "UNIQUE_COUNT", "unique_dimension": "user"},
]


def _decode_dead(value: bytes) -> dict:
    return fastavro.schemaless_reader(io.BytesIO(value), DEAD_SCHEMA)


def _event(event_id: str, at: datetime, **fields) -> UsageEvent:
    event = UsageEvent(
        event_id=event_id,
        tenant_id="hostile",
        customer_id="c1",
        meter="api_calls",
        quantity=Decimal(1),
        event_time=at,
        dimensions={},
    )
    event.update(fields)  # type: ignore[typeddict-item]  # hostile fields on purpose
    return event


def hostile_records(at: datetime) -> list[tuple[str, bytes, str]]:
    """(name, message value, expected reason prefix) of each record that must be a dead letter."""
    records = [
        (
            "meter of 900 KB",
            encode_usage_event(_event("big-meter", at, meter="m" * 900_000)),
            "contract: meter is 900000 bytes",
        )
    ]
    for field in ("event_id", "tenant_id", "customer_id", "meter"):
        value = {"event_id": "nul", "tenant_id": "hostile", "customer_id": "c1", "meter": "api_calls"}[field] + "\x00x"
        event = _event(f"nul-{field}", at)
        event[field] = value  # type: ignore[literal-required]  # any field name, hostile on purpose
        records.append(
            (f"NUL in {field}", encode_usage_event(event), f"contract: {field} has control character U+0000")
        )
    records += [
        (
            "NUL in a dimension key",
            encode_usage_event(_event("nul-dim-key", at, dimensions={"re\x00gion": "eu"})),
            "contract: dimension key has control character U+0000",
        ),
        (
            "NUL in a dimension value",
            encode_usage_event(_event("nul-dim-value", at, dimensions={"region": "e\x00u"})),
            "contract: dimension 'region' has control character U+0000",
        ),
        ("event_id of 3 KB", encode_usage_event(_event("e" * 3_000, at)), "contract: event_id is 3000 bytes"),
        ("event_id of 70 KB", encode_usage_event(_event("e" * 70_000, at)), "contract: event_id is 70000 bytes"),
        (
            "customer_id of 3 KB",
            encode_usage_event(_event("big-customer", at, customer_id="c" * 3_000)),
            "contract: customer_id is 3000 bytes",
        ),
        (
            "tenant_id of 70 KB",
            encode_usage_event(_event("big-tenant", at, tenant_id="t" * 70_000)),
            "contract: tenant_id is 70000 bytes",
        ),
        (
            "17 dimensions",
            encode_usage_event(_event("many-dims", at, dimensions={f"d{i}": "v" for i in range(17)})),
            "contract: 17 dimensions",
        ),
    ]
    # Two of these in one window once overflowed the window's SUM; each is now refused on its own.
    for i in range(2):
        records.append(
            (
                f"quantity 6e28 #{i}",
                encode_usage_event(_event(f"huge-{i}", at, quantity=Decimal("6e28"))),
                "contract: |quantity| exceeds",
            )
        )
    unknown = bytearray(encode_single_object(_event("unknown-fingerprint", at)))
    unknown[2:10] = bytes.fromhex("0123456789abcdef")
    records.append(("unknown schema fingerprint", bytes(unknown), "unknown schema fingerprint: "))
    return records


def test_no_hostile_record_stops_or_corrupts_metering(e2e_stack, schema_registry):
    url = schema_registry.url
    # An idle timeout longer than the test: every partition holds the watermark throughout. Flink's
    # idle-split handling lets the first partition to deliver after a gap move the watermark on its
    # own (docs/operations.md, "How time moves"), which under load made events late whatever this
    # test is about; the fast clock is judged by its dead letter and by no event going late.
    event_time = {**e2e_stack.base["event_time"], "source_idle_timeout": "10m", "source_catch_up_timeout": "10m"}
    cfg, path = private_job(
        e2e_stack,
        "hostile",
        kafka={"schema_registry_url": url},
        meters=METERS,
        input={"max_dimension_combinations": MAX_COMBINATIONS, "max_unique_values": MAX_UNIQUE},
        event_time=event_time,
    )
    k = cfg.kafka
    job_id = flink_jobs.submit(cfg, path)
    try:
        start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=30)
        first = list(
            synthetic_events(
                SyntheticSpec(count=15_000, tenants=3, customers=7, start=start, span=timedelta(minutes=2), seed=11)
            )
        )
        hostile_at = start + timedelta(minutes=1)
        hostile = hostile_records(hostile_at)
        # Evolved writers: the same events from producers on schema v1 and v2 (an appended optional field), single-object encoded.
        evolved = [
            UsageEvent(
                event_id=f"evolved-{i}",
                tenant_id="evolved",
                customer_id=f"c{i % 3}",
                meter="api_calls",
                quantity=Decimal(i + 1),
                event_time=hostile_at + timedelta(seconds=i),
                dimensions={},
            )
            for i in range(20)
        ]
        # Writers on v1 and v2 (an appended optional field) in one topic: single-object encoded, and
        # framed with the ids the real registry gave their schemas.
        v1, v2 = HISTORY_DIR / "usage_event-v1.avsc", HISTORY_DIR / "usage_event-v2.avsc"
        ids = {v: register_schema(url, value_subject(k.usage_events_topic), v.read_text()) for v in (v1, v2)}
        assert ids[v1] != ids[v2]

        def evolved_value(i: int, e: UsageEvent) -> bytes:
            schema = (v1, v2)[i % 2]
            record = {**e, "source": "checkout"} if schema == v2 else e
            if i % 4 < 2:
                return encode_single_object(record, schema)
            return encode_registry_framed(record, ids[schema], json.loads(schema.read_text()))

        evolved_values = [evolved_value(i, e) for i, e in enumerate(evolved)]
        unknown_id = encode_registry_framed(_event("unknown-id", hostile_at), 987_654, json.loads(v1.read_text()))
        hostile.append(("unknown registry id", unknown_id, "unknown schema id: 987654"))
        burst = [
            UsageEvent(
                event_id=f"burst-{i}",
                tenant_id=BURST_TENANT,
                customer_id="c1",
                meter="tokens_by_model",
                quantity=Decimal(10 + i),
                event_time=hostile_at,
                dimensions={"model": f"model-{i}"},
            )
            for i in range(BURST_EVENTS)
        ]
        # Distinct users, then one already counted: the cap takes the first four, the repeat still counts.
        users = [*range(UNIQUE_USERS), 0]
        unique_burst = [
            UsageEvent(
                event_id=f"user-{n}",
                tenant_id=UNIQUE_TENANT,
                customer_id="c1",
                meter="active_users",
                quantity=Decimal(1),
                event_time=hostile_at,
                dimensions={"user": f"user-{u}"},
            )
            for n, u in enumerate(users)
        ]

        # Normal traffic flows while the hostile records are produced. It keeps out of partition 0, where the
        # writers dated a minute ahead go (below): a partition's watermark is its own largest event time, so
        # normal events queued behind them in one partition would be protected only while the other
        # partitions lag, and would go late whenever that partition is read slower than the rest.
        sender = threading.Thread(
            target=send_events,
            args=(k.bootstrap_servers, k.usage_events_topic, first),
            kwargs={"rate": 2_500, "partition_for": lambda i, e: 1 + zlib.crc32(message_key(e)) % (k.partitions - 1)},
        )
        sender.start()
        send_raw(k.bootstrap_servers, k.usage_events_topic, [value for _, value, _ in hostile])
        # The counted ones among them are dated a minute ahead of the traffic they join: all in partition 0,
        # so the others hold the watermark back (it is the least over partitions) and the normal
        # traffic is not made late by them.
        send_raw(k.bootstrap_servers, k.usage_events_topic, evolved_values, partition=0)
        send_events(k.bootstrap_servers, k.usage_events_topic, burst + unique_burst, partition_for=lambda i, e: 0)
        oversized = largest_accepted_value(k.bootstrap_servers, k.usage_events_topic, k.max_message_bytes)
        sender.join()

        # Everything so far consumed, so the gap below is one the job sees.
        wait_for(
            lambda: group_lag(k.bootstrap_servers, k.consumer_group, k.usage_events_topic) == 0,
            180,
            "the job to consume the first phase",
        )
        # A producer whose clock runs 50 minutes fast, then a gap with no other traffic: had its event
        # counted, the watermark would jump 50 minutes and every window would close before its data.
        # Its Kafka client stamps the record with the same fast clock; the broker's append time replaces that stamp.
        fast_clock = datetime.now(UTC) + timedelta(minutes=50)
        future = _event("fast-clock", fast_clock, tenant_id="fast-clock")
        send_events(
            k.bootstrap_servers,
            k.usage_events_topic,
            [future],
            partition_for=lambda i, e: 0,
            timestamp_for=lambda i, e: int(fast_clock.timestamp() * 1000),
        )
        idle = 10.0
        threading.Event().wait(idle)
        # Then only the closers: events sent after an idle gap can be made late by the first partition to
        # deliver again (Flink's source idleness, docs/operations.md), whatever this test is about.
        send_events(
            k.bootstrap_servers,
            k.usage_events_topic,
            closing_events(start + timedelta(minutes=2), k.partitions),
            partition_for=lambda i, e: i,
        )

        counted = first + evolved
        expected = expected_totals(counted, cfg.event_time.window_size)

        def totals() -> dict:
            rows = [
                r for r in fetch_usage(cfg.postgres) if r.tenant_id not in (CLOSER_TENANT, BURST_TENANT, UNIQUE_TENANT)
            ]
            return {(r.tenant_id, r.customer_id, r.meter, r.window_start): (r.quantity, r.event_count) for r in rows}

        try:
            wait_for(lambda: totals() == expected, 300, "every normal window in Postgres equal to the oracle")
        except AssertionError:
            got = totals()
            wrong = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
            kinds = sorted(
                {d["reason"][:70] for d in read_topic(k.bootstrap_servers, k.dead_letter_topic, _decode_dead)}
            )
            late_schema = fastavro.parse_schema(load_schema(LATE_EVENT_SCHEMA))
            late_events = read_topic(
                k.bootstrap_servers,
                k.late_events_topic,
                lambda v: fastavro.schemaless_reader(io.BytesIO(v), late_schema),
            )
            marks = sorted({(str(e["watermark"]), e["tenant_id"][:12], e["customer_id"][:12]) for e in late_events})[
                :12
            ]
            late = f"{len(late_events)}, windows {min((e['window_start'] for e in late_events), default=None)}..{max((e['window_start'] for e in late_events), default=None)}, watermarks {marks}"
            failures = (
                flink_jobs.rest(cfg, f"/jobs/{job_id}/exceptions").get("exceptionHistory", {}).get("entries", [])[:2]
            )
            failures = [(f.get("exceptionName"), (f.get("stacktrace") or "")[:1500]) for f in failures]
            checkpoints = flink_jobs.checkpoint_stats(cfg, job_id).get("counts") or {}
            raise AssertionError(
                f"{len(wrong)} windows differ, e.g. {[(w, expected.get(w), got.get(w)) for w in wrong[:5]]}; dead letters: {kinds};"
                f" late events: {late}; restarts: {flink_jobs.restarts(cfg, job_id)}; checkpoints: {checkpoints}; failures: {failures}"
            ) from None
        wait_for(
            lambda: all(r.is_final for r in fetch_usage(cfg.postgres) if r.tenant_id != CLOSER_TENANT),
            120,
            "the windows to be final",
        )

        # Never restarted, never restored: no record held the job.
        assert flink_jobs.restarts(cfg, job_id) == 0
        assert (flink_jobs.checkpoint_stats(cfg, job_id).get("latest") or {}).get("restored") is None

        dead = read_topic(k.bootstrap_servers, k.dead_letter_topic, _decode_dead)
        expected_dead = len(hostile) + 1 + 1 + (BURST_EVENTS - MAX_COMBINATIONS) + (UNIQUE_USERS - MAX_UNIQUE)
        wait_for(
            lambda: len(read_topic(k.bootstrap_servers, k.dead_letter_topic, _decode_dead)) >= expected_dead,
            60,
            "every dead letter",
        )
        dead = read_topic(k.bootstrap_servers, k.dead_letter_topic, _decode_dead)
        by_payload = {}
        for letter in dead:
            by_payload.setdefault(letter["payload"], []).append(letter)
        for name, value, reason in hostile:
            letters = by_payload.get(value, [])
            assert len(letters) == 1, f"{name}: {len(letters)} dead letters"
            assert letters[0]["reason"].startswith(reason), f"{name}: {letters[0]['reason'][:200]!r}"
            assert len(letters[0]["reason"]) <= 1100
        assert [d["reason"][:60] for d in by_payload[oversized]] == [
            "malformed Avro: varint longer than 10 bytes in field event_id"[:60]
        ]
        fast = [d for d in dead if d["reason"].startswith("event_time out of range")]
        assert len(fast) == 1 and fast[0]["source_partition"] == 0

        # The burst: exactly the cap of combinations counted, the rest dead letters, nothing lost.
        burst_rows = [r for r in fetch_usage(cfg.postgres) if r.tenant_id == BURST_TENANT]
        refused = [d for d in dead if d["reason"].startswith("dimension combinations")]
        assert len(burst_rows) == MAX_COMBINATIONS and len(refused) == BURST_EVENTS - MAX_COMBINATIONS
        assert sum(r.quantity for r in burst_rows) + sum(
            decode_usage_event(d["payload"])["quantity"] for d in refused
        ) == sum(e["quantity"] for e in burst)
        # The distinct values: exactly the cap counted, the two past it dead letters with their reason.
        unique_rows = [r for r in fetch_usage(cfg.postgres) if r.tenant_id == UNIQUE_TENANT]
        assert [r.quantity for r in unique_rows] == [MAX_UNIQUE]
        past_cap = [d for d in dead if d["reason"].startswith("unique values")]
        assert sorted(decode_usage_event(d["payload"])["dimensions"]["user"] for d in past_cap) == ["user-4", "user-5"]
        assert "already has 4 distinct values of user (input.max_unique_values)" in past_cap[0]["reason"]
        assert len(dead) == expected_dead, sorted({d["reason"][:80] for d in dead})

        # Nothing went late: the fast clock did not move the watermark past the data.
        assert read_topic(k.bootstrap_servers, k.late_events_topic, lambda v: {"bytes": v}) == []
    finally:
        flink_jobs.cancel(cfg, job_id)
