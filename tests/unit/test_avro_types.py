"""Avro schema -> Flink SQL types: every schema in avro/ maps, and inexact types are refused."""

from __future__ import annotations

import json

import pytest

from connectors.avro_codec import decode_usage_event, encode_usage_event
from connectors.avro_types import AVRO_DIR, avro_to_flink_type, derive_columns, load_schema
from meterflow.errors import SchemaError


@pytest.mark.parametrize("path", sorted(AVRO_DIR.glob("*.avsc")), ids=lambda p: p.name)
def test_every_schema_in_avro_dir_maps(path):
    """Each .avsc in avro/ derives one column per field, in field order."""
    schema = load_schema(path)
    columns = derive_columns(schema)
    assert [c.name for c in columns] == [f["name"] for f in schema["fields"]]


def test_usage_event_contract_columns():
    """The usage event contract maps to exact, non-null Flink types."""
    columns = {c.name: c.sql_type for c in derive_columns(load_schema())}
    assert columns == {
        "event_id": "STRING NOT NULL",
        "tenant_id": "STRING NOT NULL",
        "customer_id": "STRING NOT NULL",
        "meter": "STRING NOT NULL",
        "quantity": "DECIMAL(38, 9) NOT NULL",
        "event_time": "TIMESTAMP(3) NOT NULL",
        "dimensions": "MAP<STRING NOT NULL, STRING NOT NULL> NOT NULL",
    }


@pytest.mark.parametrize(
    ("avro_type", "flink_type"),
    [
        ("long", "BIGINT NOT NULL"),
        ("int", "INT NOT NULL"),
        ("boolean", "BOOLEAN NOT NULL"),
        (["null", "string"], "STRING"),
        ({"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}, "DECIMAL(10, 2) NOT NULL"),
        ({"type": "array", "items": "long"}, "ARRAY<BIGINT NOT NULL> NOT NULL"),
        ({"type": "enum", "name": "E", "symbols": ["A"]}, "STRING NOT NULL"),
        ({"type": "record", "name": "R", "fields": [{"name": "x", "type": "int"}]}, "ROW<`x` INT NOT NULL> NOT NULL"),
        (["null", {"type": "map", "values": "long"}], "MAP<STRING NOT NULL, BIGINT NOT NULL>"),
    ],
)
def test_type_mapping(avro_type, flink_type):
    """Avro types map to the Flink type whose derived Avro schema is binary-identical."""
    assert avro_to_flink_type(avro_type) == flink_type


@pytest.mark.parametrize(
    ("avro_type", "message"),
    [
        ("double", "binary float"),
        ("float", "binary float"),
        (["null", "double"], "binary float"),
        (["null", "string", "long"], "unions"),
        ({"type": "bytes", "logicalType": "decimal", "precision": 40, "scale": 2}, "outside Flink"),
        ("fixed-ish", "unsupported"),
    ],
)
def test_unsupported_types_are_refused(avro_type, message):
    """Floats, wide unions and oversized decimals are refused with a reason."""
    with pytest.raises(SchemaError, match=message):
        avro_to_flink_type(avro_type, "E.q")


def test_schema_file_has_no_binary_floats():
    """The contract never carries quantities as float/double."""
    assert '"double"' not in json.dumps(load_schema()) and '"float"' not in json.dumps(load_schema())


def test_codec_round_trip_is_exact():
    """Encoding then decoding keeps quantity and time exact."""
    from datetime import UTC, datetime
    from decimal import Decimal

    event = {
        "event_id": "e1",
        "tenant_id": "t",
        "customer_id": "c",
        "meter": "tokens",
        "quantity": Decimal("12345678901234567890.123456789"),
        "event_time": datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        "dimensions": {"model": "m1"},
    }
    assert decode_usage_event(encode_usage_event(event)) == event
