"""The real schema registry (Apicurio Registry, Confluent-compatible API) as the job and producers use it.

Registers the usage event schema and an evolved version under ``<usage topic>-value``, reads each back
by id the way the job does (``GET /schemas/ids/{id}``), and decodes a framed message written with the
new schema by a reader of the old one.
"""

from __future__ import annotations

import copy
import io
from datetime import UTC, datetime
from decimal import Decimal

import fastavro
import pytest

from connectors.avro_types import USAGE_EVENT_SCHEMA, load_schema
from connectors.schema_registry import (
    MAX_SCHEMA_ID,
    SchemaRegistryError,
    fetch_schema,
    frame,
    register_schema,
    set_compatibility,
    unframe,
    value_subject,
)
from meterflow.config import JobConfig

pytestmark = [pytest.mark.e2e]

SUBJECT = value_subject(JobConfig().kafka.usage_events_topic)


def v1() -> dict:
    return load_schema(USAGE_EVENT_SCHEMA)


def v2() -> dict:
    """v1 with one optional field appended: a backward-compatible change."""
    schema = copy.deepcopy(v1())
    schema["fields"].append({"name": "source", "type": ["null", "string"], "default": None})
    return schema


@pytest.fixture(scope="module")
def ids(schema_registry) -> dict[str, int]:
    set_compatibility(schema_registry.url, SUBJECT, "BACKWARD")
    return {
        "v1": register_schema(schema_registry.url, SUBJECT, v1()),
        "v2": register_schema(schema_registry.url, SUBJECT, v2()),
    }


def test_each_version_gets_its_own_id_and_is_served_by_id(schema_registry, ids):
    assert ids["v1"] != ids["v2"]
    assert fetch_schema(schema_registry.url, ids["v1"]) == v1()
    assert fetch_schema(schema_registry.url, ids["v2"]) == v2()


def test_registering_a_known_schema_again_returns_its_id(schema_registry, ids):
    """Also in other whitespace (the .avsc file's own text): ids follow the canonical form, as in Confluent's registry."""
    assert register_schema(schema_registry.url, SUBJECT, v1()) == ids["v1"]
    assert register_schema(schema_registry.url, SUBJECT, USAGE_EVENT_SCHEMA.read_text()) == ids["v1"]
    assert register_schema(schema_registry.url, SUBJECT, v2()) == ids["v2"]


def test_an_unknown_id_is_not_found(schema_registry, ids):
    for missing in (max(ids.values()) + 1, MAX_SCHEMA_ID):
        with pytest.raises(SchemaRegistryError) as refused:
            fetch_schema(schema_registry.url, missing)
        assert refused.value.status == 404


def test_the_subject_refuses_an_incompatible_version(schema_registry, ids):
    """A new required field without a default cannot read the old data: BACKWARD refuses it."""
    breaking = v2()
    breaking["fields"].append({"name": "region", "type": "string"})
    with pytest.raises(SchemaRegistryError) as refused:
        register_schema(schema_registry.url, SUBJECT, breaking)
    assert refused.value.status == 409


def test_a_framed_v2_message_decodes_with_its_writer_schema_from_the_registry(schema_registry, ids):
    event = {
        "event_id": "e-1",
        "tenant_id": "t",
        "customer_id": "c",
        "meter": "api_calls",
        "quantity": Decimal("1.500000000"),
        "event_time": datetime(2026, 1, 1, tzinfo=UTC),
        "dimensions": {},
        "source": "edge",
    }
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(v2()), event)
    message = frame(ids["v2"], body.getvalue())

    schema_id, payload = unframe(message)
    writer = fastavro.parse_schema(fetch_schema(schema_registry.url, schema_id))
    read = fastavro.schemaless_reader(io.BytesIO(payload), writer, fastavro.parse_schema(v1()))
    assert read == {k: v for k, v in event.items() if k != "source"}


def test_ids_survive_a_restart(schema_registry, ids):
    """Storage is a file in the state directory: ids in messages already on Kafka keep resolving."""
    schema_registry.down()
    assert not schema_registry.running()
    schema_registry.up()
    assert fetch_schema(schema_registry.url, ids["v1"]) == v1()
    assert fetch_schema(schema_registry.url, ids["v2"]) == v2()
