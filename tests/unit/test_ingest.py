"""HTTP ingest without Kafka or Postgres: the app on a recording writer and an in-memory key table.

Per-event results (accepted, rejected with the reason, duplicate in the request), keys (missing,
unknown, another tenant's events), the request limits one past each, Kafka's refusal (503, retry
the request), backpressure (429), and the key cache's expiry (a revoke takes effect)."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import pytest
from fastapi.testclient import TestClient

from connectors.avro_codec import UsageEvent
from meterflow.config import JobConfig
from meterflow.serve.app import KeyCache, create_app
from meterflow.serve.ingest import RequestRefusedError, bearer_key, check_batch, hash_api_key, new_api_key

KEY_A, KEY_B = new_api_key(), new_api_key()
TENANTS = {hash_api_key(KEY_A): "tenant-a", hash_api_key(KEY_B): "tenant-b"}


class NoUsage:
    """A usage source that knows no customer: ingest never reads usage."""

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def usage(self, tenant_id: str, customer_id: str, ask: object) -> None:
        raise AssertionError("ingest read usage")


class RecordingWriter:
    def __init__(self) -> None:
        self.written: list[UsageEvent] = []
        self.fail: str | None = None
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def write(self, events: Sequence[UsageEvent], timeout_s: float) -> list[str | None]:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            return [self.fail for _ in events]
        self.written.extend(events)
        return [None for _ in events]


def event(event_id: str, tenant: str = "tenant-a", **fields: object) -> dict:
    return {
        "event_id": event_id,
        "tenant_id": tenant,
        "customer_id": "cust-1",
        "meter": "api_calls",
        "quantity": "2.5",
        "event_time": "2026-12-07T10:00:00Z",
        **fields,
    }


def client(writer: RecordingWriter, **serve: object) -> TestClient:
    cfg = JobConfig.model_validate({"serve": serve})
    return TestClient(create_app(cfg, writer, KeyCache(TENANTS.get, 30.0), NoUsage()))


def post(c: TestClient, body: object, key: str | None = KEY_A):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return c.post("/v1/events", json=body, headers=headers)


def test_a_batch_answers_each_event_in_order_and_writes_only_the_good_ones_once():
    writer = RecordingWriter()
    answer = post(
        client(writer),
        {
            "events": [
                event("e1"),
                event("e1"),  # the same id again in the request
                event("e2", quantity=1.5),  # a JSON float: inexact
                {"event_id": "e3", "tenant_id": "tenant-a"},  # fields missing
                event("e4", tenant="tenant-b"),  # another tenant's event
                event("e5", customer_id="x" * 129),  # past the contract's 128 bytes
                event("e6", customer_id="x" * 128),  # at it
            ]
        },
    )
    assert answer.status_code == 202
    body = answer.json()
    assert [(r["event_id"], r["status"]) for r in body["results"]] == [
        ("e1", "accepted"),
        ("e1", "duplicate"),
        ("e2", "rejected"),
        ("e3", "rejected"),
        ("e4", "rejected"),
        ("e5", "rejected"),
        ("e6", "accepted"),
    ]
    reasons = [r["reason"] for r in body["results"]]
    assert "not a JSON float" in reasons[2] and "missing field(s)" in reasons[3]
    assert reasons[4] == "tenant_id is not the tenant of this API key"
    assert "customer_id" in reasons[5]
    assert (body["accepted"], body["rejected"], body["duplicates"], body["failed"]) == (2, 4, 1, 0)
    assert [e["event_id"] for e in writer.written] == ["e1", "e6"]


def test_one_event_alone_is_a_request_too():
    writer = RecordingWriter()
    answer = post(client(writer), event("solo"))
    assert answer.status_code == 202 and answer.json()["accepted"] == 1


@pytest.mark.parametrize("key", [None, "mf_unknown", "not-a-key"])
def test_without_a_known_key_nothing_is_read_or_written(key):
    writer = RecordingWriter()
    answer = post(client(writer), event("e1"), key=key)
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
    assert writer.written == []


def test_the_request_limits_one_past_each():
    writer = RecordingWriter()
    c = client(writer, max_batch=3, max_body_bytes=4096)
    assert post(c, {"events": [event(f"e{i}") for i in range(3)]}).status_code == 202
    too_many = post(c, {"events": [event(f"f{i}") for i in range(4)]})
    assert too_many.status_code == 413 and "at most 3" in too_many.json()["error"]
    big = post(c, event("big", dimensions={"k": "v" * 4000}))
    assert big.status_code == 413
    assert post(c, {"events": []}).status_code == 400
    assert post(c, [event("e9")]).status_code == 400
    assert c.post("/v1/events", content=b"{not json", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 400


def test_events_kafka_did_not_acknowledge_fail_the_request_for_a_retry():
    writer = RecordingWriter()
    writer.fail = "not written: KafkaTimeoutError"
    answer = post(client(writer), {"events": [event("e1"), event("e2", quantity=1.5)]})
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
    assert [r["status"] for r in answer.json()["results"]] == ["failed", "rejected"]


def test_one_request_more_than_the_service_takes_at_once_is_answered_429():
    writer = RecordingWriter()
    writer.gate = threading.Event()
    c = client(writer, max_requests_in_flight=1)
    first: list = []
    worker = threading.Thread(target=lambda: first.append(post(c, event("slow"))))
    worker.start()
    assert writer.entered.wait(10)
    second = post(c, event("next"))
    writer.gate.set()
    worker.join(10)
    assert second.status_code == 429 and second.headers["Retry-After"] == "1"
    assert first[0].status_code == 202
    assert post(c, event("after")).status_code == 202


def test_a_key_is_looked_up_once_per_ttl_so_a_revoke_takes_effect_within_it():
    table = dict(TENANTS)
    now = [0.0]
    lookups: list[str] = []

    def lookup(digest: str) -> str | None:
        lookups.append(digest)
        return table.get(digest)

    keys = KeyCache(lookup, 30.0, clock=lambda: now[0])
    assert keys.tenant(KEY_A) == "tenant-a" and keys.tenant(KEY_A) == "tenant-a" and len(lookups) == 1
    del table[hash_api_key(KEY_A)]  # revoked
    now[0] = 29.9
    assert keys.tenant(KEY_A) == "tenant-a"
    now[0] = 30.1
    assert keys.tenant(KEY_A) is None


def test_keys_are_random_stored_hashed_and_read_only_as_bearer():
    assert KEY_A != KEY_B and KEY_A.startswith("mf_") and len(KEY_A) > 40
    assert hash_api_key(KEY_A) != KEY_A and len(hash_api_key(KEY_A)) == 64
    assert bearer_key(f"Bearer {KEY_A}") == KEY_A and bearer_key(f"Basic {KEY_A}") is None and bearer_key(None) is None


def test_check_batch_refuses_the_request_as_a_whole_only_for_its_shape():
    with pytest.raises(RequestRefusedError) as refused:
        check_batch({"events": [event("x")] * 1001}, "tenant-a", 1000)
    assert refused.value.status == 413
    assert len(check_batch({"events": [event(f"x{i}") for i in range(1000)]}, "tenant-a", 1000).to_send) == 1000


def test_the_openapi_document_describes_ingest():
    doc = client(RecordingWriter()).get("/openapi.json").json()
    assert set(doc["paths"]["/v1/events"]["post"]["responses"]) >= {"202", "401", "413", "429", "503"}


def test_the_key_cache_stays_bounded_whatever_keys_are_sent():
    keys = KeyCache(TENANTS.get, 30.0, clock=lambda: 0.0, max_entries=100)
    for i in range(1000):
        assert keys.tenant(f"mf_unknown-{i}") is None
    assert len(keys._known) <= 100
    assert keys.tenant(KEY_A) == "tenant-a"


def test_a_body_without_content_length_is_cut_off_at_the_limit():
    writer = RecordingWriter()
    c = client(writer, max_body_bytes=4096)

    def body():
        yield b'{"events": ['
        for i in range(200):
            yield (json.dumps(event(f"s{i}")) + ",").encode()
        yield b"]}"

    answer = c.post("/v1/events", content=body(), headers={"Authorization": f"Bearer {KEY_A}"})
    assert answer.status_code == 413 and writer.written == []
