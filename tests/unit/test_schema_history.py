"""The writer schema history (avro/history) and the framings producers may use: fingerprints as the job
computes them, every history schema readable by the job's reader schema, headers laid out as specified."""

from __future__ import annotations

import io
import struct
from datetime import UTC, datetime
from decimal import Decimal

import fastavro
import pytest

from connectors.avro_codec import (
    HISTORY_DIR,
    SINGLE_OBJECT_MAGIC,
    decode_usage_event,
    encode_registry_framed,
    encode_single_object,
    encode_usage_event,
    schema_fingerprint,
    schema_history,
)
from connectors.avro_types import USAGE_EVENT_SCHEMA, load_schema
from jobs.source_plan import SCHEMA_REGISTRY_URL_OPTION, kafka_source_options, usage_source_ddl
from meterflow.config import load_config

# The same values jvm/ WriterSchemasTest asserts with Avro's Java SchemaNormalization: the two agree.
FINGERPRINTS = {1: "f95e3719ae243584", 2: "2fbfd7beb502e9a4"}

EVENT = {
    "event_id": "e1",
    "tenant_id": "t1",
    "customer_id": "c1",
    "meter": "tokens",
    "quantity": Decimal("12.345678901"),
    "event_time": datetime(2026, 6, 1, 12, tzinfo=UTC),
    "dimensions": {"model": "m"},
}


def reader() -> object:
    return fastavro.parse_schema(load_schema(USAGE_EVENT_SCHEMA))


def sample(schema: dict) -> dict:
    """EVENT with every field the schema adds set to a value other than its default."""
    extra = {f["name"]: f"x-{f['name']}" for f in schema["fields"] if f["name"] not in EVENT}
    return {**EVENT, **extra}


def test_history_is_v1_v2_without_gaps_with_the_fingerprints_java_computes():
    history = schema_history()
    assert [h.version for h in history] == list(range(1, len(history) + 1))
    assert {h.version: h.fingerprint for h in history} == FINGERPRINTS
    assert sorted(p.name for p in HISTORY_DIR.glob("*.avsc")) == [h.path.name for h in history], (
        "the job loads only usage_event-vN.avsc"
    )


def test_fingerprint_is_crc64_avro_in_header_byte_order():
    # The Avro specification's example: "null" is 0x63dd24e7cc258f8a, sent little-endian.
    assert schema_fingerprint("null") == "8a8f25cce724dd63"


def test_v1_is_the_reader_schema_byte_for_byte():
    assert (HISTORY_DIR / "usage_event-v1.avsc").read_bytes() == USAGE_EVENT_SCHEMA.read_bytes()


def test_v2_is_v1_plus_an_optional_source_at_the_end():
    v1, v2 = (load_schema(HISTORY_DIR / f"usage_event-v{v}.avsc") for v in (1, 2))
    assert v2["fields"][:-1] == v1["fields"]
    assert {k: v for k, v in v2.items() if k != "fields"} == {k: v for k, v in v1.items() if k != "fields"}
    assert v2["fields"][-1] == {
        "name": "source",
        "type": ["null", "string"],
        "default": None,
        "doc": "The service that emitted the event; carried by producers, not stored by the job.",
    }


@pytest.mark.parametrize("version", sorted(FINGERPRINTS))
def test_the_reader_reads_every_history_writer(version):
    writer_schema = load_schema(HISTORY_DIR / f"usage_event-v{version}.avsc")
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(writer_schema), sample(writer_schema))
    read = fastavro.schemaless_reader(io.BytesIO(out.getvalue()), fastavro.parse_schema(writer_schema), reader())
    assert read == EVENT


def test_each_history_schema_reads_the_one_before():
    history = schema_history()
    for older, newer in zip(history, history[1:], strict=False):
        old_schema, new_schema = load_schema(older.path), load_schema(newer.path)
        out = io.BytesIO()
        fastavro.schemaless_writer(out, fastavro.parse_schema(old_schema), sample(old_schema))
        read = fastavro.schemaless_reader(
            io.BytesIO(out.getvalue()), fastavro.parse_schema(old_schema), fastavro.parse_schema(new_schema)
        )
        added = {f["name"]: f["default"] for f in new_schema["fields"] if f["name"] not in sample(old_schema)}
        assert read == {**sample(old_schema), **added}


def test_single_object_framing_is_magic_fingerprint_body():
    plain = encode_usage_event(EVENT)  # type: ignore[arg-type]  # a plain dict standing for a UsageEvent
    framed = encode_single_object(EVENT)
    assert framed == SINGLE_OBJECT_MAGIC + bytes.fromhex(FINGERPRINTS[1]) + plain
    v2 = encode_single_object({**EVENT, "source": "gateway"}, schema_path=HISTORY_DIR / "usage_event-v2.avsc")
    assert v2[:10] == b"\xc3\x01" + bytes.fromhex(FINGERPRINTS[2])
    v2_schema = fastavro.parse_schema(load_schema(HISTORY_DIR / "usage_event-v2.avsc"))
    assert fastavro.schemaless_reader(io.BytesIO(v2[10:]), v2_schema, reader()) == EVENT


def test_registry_framing_is_zero_then_the_big_endian_id_then_the_body():
    framed = encode_registry_framed(EVENT, 7, load_schema(USAGE_EVENT_SCHEMA))
    assert framed[:5] == b"\x00\x00\x00\x00\x07"
    assert decode_usage_event(framed[5:]) == EVENT
    assert encode_registry_framed(EVENT, 2**31 - 1, load_schema(USAGE_EVENT_SCHEMA))[:5] == b"\x00" + struct.pack(
        ">i", 2**31 - 1
    )
    for bad in (-1, 2**31):
        with pytest.raises(ValueError, match="outside 0..2147483647"):
            encode_registry_framed(EVENT, bad, load_schema(USAGE_EVENT_SCHEMA))


def test_the_source_carries_the_registry_url_only_when_configured(write_config):
    assert SCHEMA_REGISTRY_URL_OPTION == "meterflow-avro.schema-registry.url"
    assert SCHEMA_REGISTRY_URL_OPTION not in usage_source_ddl(load_config(write_config(""), environ={}))

    cfg = load_config(
        write_config("kafka:\n  schema_registry_url: http://127.0.0.1:8085/apis/ccompat/v7\n"), environ={}
    )
    assert "'meterflow-avro.schema-registry.url' = 'http://127.0.0.1:8085/apis/ccompat/v7'" in usage_source_ddl(cfg)
    # Only the meterflow-avro format has the option (the raw-bytes bench source has none).
    assert SCHEMA_REGISTRY_URL_OPTION not in kafka_source_options(cfg, "raw")
