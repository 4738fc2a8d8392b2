"""The dead-letter writer: its producer takes what its topic takes, what it writes is bounded, and a
second instance to the same topic is one call."""

from __future__ import annotations

import io
import re

import fastavro
import pytest

from connectors.avro_types import load_schema
from connectors.topics import dead_letter_max_message_bytes
from jobs.plan import (
    BOUNDED_PAYLOAD_FUNCTION,
    COUNT_DEAD_LETTER_FUNCTION,
    DEAD_LETTER_SCHEMA,
    closed_windows_sink_ddl,
    dead_letter_insert,
    dead_letter_sink_ddl,
    late_events_sink_ddl,
)
from meterflow.config import load_config
from meterflow.input_contract import DEAD_LETTER_HEADROOM_BYTES, MAX_REASON_CHARS
from tests.conftest import REPO_ROOT

OPERATORS = REPO_ROOT / "jvm" / "src" / "main" / "java" / "dev" / "meterflow" / "operators"


@pytest.fixture
def cfg(write_config):
    return load_config(write_config("kafka:\n  max_message_bytes: 2000000\n  dead_letter_topic: dl\n"), environ={})


def _options(ddl: str) -> dict[str, str]:
    return dict(re.findall(r"'([^']+)' = '([^']*)'", ddl))


def test_the_dead_letter_producer_takes_what_its_topic_takes(cfg):
    """max.request.size = the dead-letter topic's max.message.bytes; the other Kafka sinks keep the client default."""
    options = _options(dead_letter_sink_ddl(cfg))
    assert (
        options["properties.max.request.size"]
        == str(2_000_000 + DEAD_LETTER_HEADROOM_BYTES)
        == str(dead_letter_max_message_bytes(cfg))
    )
    assert options["topic"] == "dl" and options["sink.delivery-guarantee"] == "exactly-once"
    assert options["sink.transactional-id-prefix"] == "meterflow-usage-dead-letter"
    assert "CREATE TABLE `dead_letter_sink`" in dead_letter_sink_ddl(cfg)
    for other in (late_events_sink_ddl(cfg), closed_windows_sink_ddl(cfg)):
        assert "properties.max.request.size" not in _options(other)


def test_the_insert_bounds_payload_and_reason(cfg):
    """The payload cut to kafka.max_message_bytes, the reason bounded and told of a cut payload, both in the JVM."""
    sql = dead_letter_insert(cfg)
    assert sql.startswith(
        "INSERT INTO `dead_letter_sink`\nSELECT `bounded_payload`(`payload`, 2000000), `count_dead_letter`(`reject_reason`, `payload`, 2000000),"
    )
    assert (
        "`source_topic`, `source_partition`, `source_offset`, LOCALTIMESTAMP\nFROM `classified_events` WHERE `reject_reason` IS NOT NULL"
        in sql
    )


def test_a_second_sink_to_the_same_topic_is_one_call_each(cfg):
    """Another source of rejects: its own table and transactions, the same topic, the same bounds."""
    ddl = dead_letter_sink_ddl(cfg, table="guard_dead_letter_sink", purpose="guard-dead-letter")
    assert "CREATE TABLE `guard_dead_letter_sink`" in ddl
    assert (
        _options(ddl)["topic"] == "dl"
        and _options(ddl)["sink.transactional-id-prefix"] == "meterflow-usage-guard-dead-letter"
    )
    assert (
        _options(ddl)["properties.max.request.size"]
        == _options(dead_letter_sink_ddl(cfg))["properties.max.request.size"]
    )
    sql = dead_letter_insert(cfg, table="guard_dead_letter_sink", source="guard_rejects", where="`refused`")
    assert sql.startswith("INSERT INTO `guard_dead_letter_sink`\nSELECT `bounded_payload`(`payload`, 2000000)")
    assert sql.endswith("FROM `guard_rejects` WHERE `refused`")


def test_the_functions_are_the_java_ones_with_the_python_limit():
    """The registered classes exist; CountDeadLetter cuts at input_contract.MAX_REASON_CHARS."""
    for _, cls in (COUNT_DEAD_LETTER_FUNCTION, BOUNDED_PAYLOAD_FUNCTION):
        assert (OPERATORS / f"{cls.rsplit('.', 1)[1]}.java").exists()
    source = (OPERATORS / "CountDeadLetter.java").read_text()
    assert int(re.search(r"MAX_REASON_CHARS = (\d+);", source).group(1)) == MAX_REASON_CHARS
    assert "public String eval(String reason, byte[] payload, int maxPayloadBytes)" in source
    assert "public byte[] eval(byte[] payload, int maxBytes)" in (OPERATORS / "BoundedPayload.java").read_text()


@pytest.mark.parametrize("max_message_bytes", [65_536, 1_048_576, 64 * 1_048_576])
def test_the_largest_dead_letter_fits_the_headroom(max_message_bytes):
    """The largest dead letter CountDeadLetter and BoundedPayload let through, Avro-encoded with the
    longest topic name Kafka allows and Kafka's batch and record overhead, fits the dead-letter topic."""
    cut_mark = f"\u2026 (reason cut at {MAX_REASON_CHARS} characters)"
    payload_note = f"; payload cut to {max_message_bytes} of {2**31 - 1} bytes"
    letter = {
        "payload": b"\xff" * max_message_bytes,
        "reason": "\U0001f4a5" * MAX_REASON_CHARS + cut_mark + payload_note,  # 4 UTF-8 bytes per character
        "source_topic": "t" * 249,
        "source_partition": 2**31 - 1,
        "source_offset": 2**63 - 1,
        "seen_at": 253402300799999,
    }
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(load_schema(DEAD_LETTER_SCHEMA)), letter)
    batch_and_record_overhead = 61 + 21 + 2 * 5  # v2 batch header, record header, key and header varints
    assert len(out.getvalue()) + batch_and_record_overhead <= max_message_bytes + DEAD_LETTER_HEADROOM_BYTES
