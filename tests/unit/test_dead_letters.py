"""Dead letters: decoding, kinds, the selection at each of its bounds, output shapes, and the commands without Kafka."""

from __future__ import annotations

import ast
import base64
import io
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import fastavro
import pytest
from click.testing import CliRunner

from connectors import dead_letters as dl
from connectors.avro_codec import encode_usage_event
from connectors.dead_letters import (
    CONFIRM_ABOVE,
    Criteria,
    DeadLetter,
    counts_by_kind,
    decode_all,
    decode_dead_letter,
    kind_of,
    one_line,
    parse_time,
    replay_key,
    replayable,
    select,
    start_offsets,
    table_row,
    to_json,
)
from tests.conftest import REPO_ROOT

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MS = timedelta(milliseconds=1)


def _event(event_id: str = "e1", tenant: str = "t1", customer: str = "c1", meter: str = "storage") -> bytes:
    return encode_usage_event(
        {
            "event_id": event_id,
            "tenant_id": tenant,
            "customer_id": customer,
            "meter": meter,
            "quantity": Decimal("1.5"),
            "event_time": T0,
            "dimensions": {},
        }
    )


def _letter(
    offset: int,
    *,
    partition: int = 0,
    reason: str = "unknown meter: storage",
    seen_at: datetime = T0,
    payload: bytes | None = None,
) -> DeadLetter:
    return DeadLetter(
        partition,
        offset,
        _event(f"e{partition}-{offset}") if payload is None else payload,
        reason,
        "usage-events",
        2,
        1000 + offset,
        seen_at,
    )


def _encode(letter: DeadLetter) -> bytes:
    out = io.BytesIO()
    record = {
        "payload": letter.payload,
        "reason": letter.reason,
        "source_topic": letter.source_topic,
        "source_partition": letter.source_partition,
        "source_offset": letter.source_offset,
        "seen_at": letter.seen_at,
    }
    fastavro.schemaless_writer(out, dl.dead_letter_schema(), record)
    return out.getvalue()


# --- kinds ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("unknown meter: storage", "unknown_meter"),
        ("malformed Avro: Malformed data. Length is negative: -3", "malformed_avro"),  # first colon only
        ("contract: tenant_id is 65 bytes, at most 64", "contract"),
        ("missing field: tenant_id", "missing_field"),
        ("negative quantity: meter api_calls does not allow it", "negative_quantity"),
        ("event_time out of range: 2020-01-01 00:00:00 is not within ...", "event_time_out_of_range"),
        ("truncated record: 3 bytes", "truncated_record"),
        ("  \tspaced -- kind : x", "spaced_kind"),  # trimmed like Java's trim(), then each run -> one "_"
        ("odd kind!: x", "odd_kind_"),
        ("no colon at all", "no_colon_at_all"),
        (":empty kind", ""),
        ("", ""),
    ],
)
def test_kind_is_the_text_before_the_first_colon_as_the_job_names_it(reason, kind):
    """The same kind jvm/ CountDeadLetter puts in the metric name."""
    assert kind_of(reason) == kind


def test_kind_option_is_normalised_like_the_reason():
    """--kind "unknown meter", "Unknown_Meter" and "unknown_meter" choose the same dead letters."""
    letters = [_letter(0), _letter(1, reason="contract: meter is 65 bytes, at most 64")]
    for spelling in ("unknown meter", "Unknown_Meter", "unknown_meter", "unknown meter: anything"):
        assert [d.offset for d in select(letters, Criteria(kinds=(spelling,)))] == [0]
    assert [d.offset for d in select(letters, Criteria(kinds=("contract", "unknown_meter")))] == [0, 1]
    assert select(letters, Criteria(kinds=("unknown",))) == []  # a kind is matched whole, not as a prefix


# --- times ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-01T12:00:00Z", T0),
        ("2026-03-01T13:00:00+01:00", T0),
        ("2026-03-01T12:00:00", T0),  # no zone: UTC, never the machine's zone
        ("2026-03-01 12:00:00.000", T0),
        ("2026-03-01", datetime(2026, 3, 1, tzinfo=UTC)),
        ("1772366400000", T0),  # epoch milliseconds
        ("1772366400001", T0 + MS),
        ("0", datetime(1970, 1, 1, tzinfo=UTC)),
    ],
)
def test_parse_time_iso_with_zone_epoch_ms_and_naive_as_utc(text, expected):
    parsed = parse_time(text)
    assert parsed == expected and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "12.5", ""])
def test_parse_time_refuses_what_is_not_a_time(text):
    with pytest.raises(ValueError, match="neither ISO-8601 nor epoch milliseconds"):
        parse_time(text)


def test_criteria_refuse_naive_bounds_and_negative_numbers():
    """Bounds compare against aware seen_at: a naive one would be ambiguous, so it is refused."""
    with pytest.raises(ValueError, match="aware"):
        Criteria(since=datetime(2026, 3, 1))
    with pytest.raises(ValueError, match="limit must not be negative"):
        Criteria(limit=-1)


# --- selection at each bound ----------------------------------------------------------------------


def test_since_is_inclusive_and_until_exclusive_to_the_millisecond():
    letters = [_letter(i, seen_at=T0 + i * MS) for i in range(5)]  # seen_at T0 .. T0+4ms
    assert [d.offset for d in select(letters, Criteria(since=T0 + MS))] == [1, 2, 3, 4]  # exactly at since: in
    assert [d.offset for d in select(letters, Criteria(until=T0 + 3 * MS))] == [0, 1, 2]  # exactly at until: out
    assert [d.offset for d in select(letters, Criteria(since=T0 + 2 * MS, until=T0 + 3 * MS))] == [2]
    assert select(letters, Criteria(since=T0 + 2 * MS, until=T0 + 2 * MS)) == []


def test_bounds_in_other_zones_compare_as_instants():
    """A bound given with a zone, and one given naive (UTC), pick the same dead letters."""
    letters = [_letter(0, seen_at=T0), _letter(1, seen_at=T0 + timedelta(hours=1))]
    plus_one = datetime(2026, 3, 1, 13, 0, tzinfo=timezone(timedelta(hours=1)))  # = T0
    assert [d.offset for d in select(letters, Criteria(until=plus_one + MS))] == [0]
    assert select(letters, Criteria(since=parse_time("2026-03-01T12:00:00"))) == select(letters, Criteria(since=T0))


def test_offsets_are_inclusive_at_both_ends_in_every_partition():
    letters = [_letter(o, partition=p) for p in (0, 1) for o in range(10, 15)]
    chosen = select(letters, Criteria(from_offset=11, to_offset=13))
    assert sorted((d.partition, d.offset) for d in chosen) == [(0, 11), (0, 12), (0, 13), (1, 11), (1, 12), (1, 13)]
    only = select(letters, Criteria(partition=1, from_offset=14, to_offset=14))
    assert [(d.partition, d.offset) for d in only] == [(1, 14)]
    assert select(letters, Criteria(from_offset=15)) == [] and select(letters, Criteria(to_offset=9)) == []


def test_reason_contains_is_any_substring_case_insensitive():
    letters = [
        _letter(0),
        _letter(1, reason="malformed Avro: EOF"),
        _letter(2, reason="contract: meter is 65 bytes, at most 64"),
    ]
    assert [d.offset for d in select(letters, Criteria(reason_contains=("STORAGE",)))] == [0]
    assert [d.offset for d in select(letters, Criteria(reason_contains=("eof", "at most")))] == [1, 2]
    assert [d.offset for d in select(letters, Criteria(reason_contains=("meter",), kinds=("contract",)))] == [
        2
    ]  # conditions combine with AND


def test_limit_takes_the_oldest_first_at_and_past_the_count():
    """Oldest seen_at first across partitions, ties by partition then offset."""
    letters = [
        _letter(5, partition=1, seen_at=T0),
        _letter(9, partition=0, seen_at=T0 + MS),
        _letter(3, partition=0, seen_at=T0),
    ]
    assert [(d.partition, d.offset) for d in select(letters, Criteria())] == [(0, 3), (1, 5), (0, 9)]
    assert [(d.partition, d.offset) for d in select(letters, Criteria(limit=2))] == [(0, 3), (1, 5)]
    assert len(select(letters, Criteria(limit=3))) == 3  # exactly the count
    assert len(select(letters, Criteria(limit=4))) == 3  # one past it
    assert select(letters, Criteria(limit=0)) == []


def test_limit_applies_after_the_filter():
    letters = [_letter(0, reason="contract: x"), _letter(1), _letter(2)]
    assert [d.offset for d in select(letters, Criteria(kinds=("unknown_meter",), limit=1))] == [1]


def test_reading_starts_at_from_offset_in_whatever_partition():
    """connectors/kafka_reader.read_from asks ``starts.get(partition, 0)`` for each partition it finds."""
    assert start_offsets(Criteria(from_offset=42)).get(7, 0) == 42
    assert start_offsets(Criteria()).get(0, 0) == 0


# --- decoding -------------------------------------------------------------------------------------


def test_dead_letter_round_trip_keeps_the_payload_byte_for_byte():
    letter = _letter(3, partition=1, payload=b"\x00\xffnot avro\n")
    decoded = decode_dead_letter(1, 3, _encode(letter))
    assert decoded == letter and decoded.seen_at.tzinfo is not None and decoded.kind == "unknown_meter"


def test_records_that_are_not_dead_letters_are_reported_apart():
    good = _encode(_letter(0))
    letters, unreadable = decode_all([(0, 0, good), (0, 1, b"\xff\xff\xff"), (0, 2, good + b"x")])
    assert [d.offset for d in letters] == [0]
    assert [(u.offset, u.error.startswith("not a dead letter")) for u in unreadable] == [(1, True), (2, True)]
    assert "1 bytes after the record" in unreadable[1].error


# --- cut payloads ---------------------------------------------------------------------------------


def test_a_payload_the_job_cut_is_known_by_its_reason_and_length():
    """jvm/ CountDeadLetter appends "; payload cut to N of M bytes" when BoundedPayload kept N of M."""
    cut = _letter(0, reason="malformed Avro: EOF; payload cut to 4 of 9 bytes", payload=b"abcd")
    after_cut_reason = _letter(
        1,
        reason="contract: " + "x" * 10 + "… (reason cut at 1000 characters); payload cut to 2 of 3 bytes",
        payload=b"ab",
    )
    quoted = _letter(
        2, reason="unknown meter: ; payload cut to 4 of 9 bytes", payload=b"abcdef"
    )  # a meter name that says so: length differs
    not_longer = _letter(3, reason="malformed Avro: EOF; payload cut to 4 of 4 bytes", payload=b"abcd")
    assert [d.payload_cut for d in (cut, after_cut_reason, quoted, not_longer)] == [True, True, False, False]
    assert replayable([cut, quoted, after_cut_reason]) == ([quoted], [cut, after_cut_reason])
    assert table_row(cut)[-1] == "4 (cut)"


# --- replay keys ----------------------------------------------------------------------------------


def test_replay_key_is_tenant_slash_customer_like_produce():
    assert replay_key(_event(tenant="t9", customer="c7")) == b"t9/c7"


def test_replay_key_of_a_schema_registry_framed_event():
    """Magic byte 0 and a 4-byte schema id before the body: keyed from the body."""
    assert replay_key(b"\x00\x00\x00\x00\x07" + _event(tenant="t2", customer="c3")) == b"t2/c3"


@pytest.mark.parametrize("payload", [b"", b"\xff\xfe garbage", _event() + b"trailing", _event(tenant="")])
def test_replay_key_is_none_for_what_is_not_a_whole_usage_event(payload):
    """Unkeyed: bytes that are not exactly one event, or an event without a tenant."""
    assert replay_key(payload) is None


# --- output ---------------------------------------------------------------------------------------


def test_one_line_escapes_control_characters_and_cuts_at_the_width():
    assert one_line("a\nb\x1b[31mc") == "a\\u000ab\\u001b[31mc"
    assert one_line("x" * 100, 100) == "x" * 100  # exactly the width: whole
    assert one_line("x" * 101, 100) == "x" * 99 + "…"  # one past: cut to the width


def test_table_row_shows_place_time_source_kind_reason_and_size():
    letter = _letter(7, partition=2, reason="unknown meter: sto\nrage", seen_at=T0 + 5 * MS, payload=b"12345")
    assert table_row(letter) == (
        "2/7",
        "2026-03-01 12:00:00.005",
        "usage-events/2/1007",
        "unknown_meter",
        "unknown meter: sto\\u000arage",
        "5",
    )


def test_counts_by_kind_most_first():
    letters = [_letter(0), _letter(1, reason="contract: a"), _letter(2), _letter(3, reason="bad: b")]
    assert counts_by_kind(letters) == [("unknown_meter", 2), ("bad", 1), ("contract", 1)]


def test_json_output_shape():
    letter = _letter(4, partition=1, seen_at=T0 + 5 * MS)
    doc = json.loads(to_json("dead", 10, [letter, _letter(5, payload=b"\x01")], []))
    assert set(doc) == {"topic", "read", "selected", "by_kind", "dead_letters", "unreadable"}
    assert (doc["topic"], doc["read"], doc["selected"], doc["by_kind"], doc["unreadable"]) == (
        "dead",
        10,
        2,
        {"unknown_meter": 2},
        [],
    )
    first = doc["dead_letters"][0]
    assert first == {
        "partition": 1,
        "offset": 4,
        "seen_at": "2026-03-01T12:00:00.005+00:00",
        "source_topic": "usage-events",
        "source_partition": 2,
        "source_offset": 1004,
        "kind": "unknown_meter",
        "reason": "unknown meter: storage",
        "payload_bytes": len(letter.payload),
        "payload_cut": False,
        "payload_base64": base64.b64encode(letter.payload).decode(),
        "event": {"event_id": "e1-4", "tenant_id": "t1", "customer_id": "c1", "meter": "storage"},
    }
    assert doc["dead_letters"][1]["event"] is None


def test_the_module_is_pure():
    """No Kafka or other I/O client: the commands do the reading and sending."""
    tree = ast.parse((REPO_ROOT / "connectors" / "dead_letters.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    roots = {m.split(".")[0] for m in imported}
    assert not roots & {"kafka", "psycopg", "pyflink", "requests", "urllib", "httpx"}
    assert not any(m.startswith(("meterflow.commands", "meterflow.local")) for m in imported)


# --- the commands, Kafka replaced -----------------------------------------------------------------


@pytest.fixture
def cli_env(write_config, monkeypatch):
    """The CLI with a config of its own, the dead-letter topic replaced by ``letters`` and Kafka writes recorded."""
    from connectors import kafka_writer
    from meterflow.commands import dead_letters as command

    for name in ("METERFLOW_CONFIG",):
        monkeypatch.delenv(name, raising=False)
    path = write_config("kafka:\n  usage_events_topic: in\n  dead_letter_topic: dead\n")
    state: dict = {"letters": [], "sent": [], "read_from": []}

    def read(cfg, topic, criteria):
        state["read_from"].append((topic, criteria))
        return decode_all((d.partition, d.offset, _encode(d)) for d in state["letters"])

    def send(bootstrap, topic, records, *, max_request_size, on_sent):
        records = list(records)
        state["sent"].append((topic, records, max_request_size))
        on_sent(len(records))
        return len(records)

    monkeypatch.setattr(command, "read_dead_letters", read)
    monkeypatch.setattr(kafka_writer, "send_values", send)

    def run(*args: str, stdin: str | None = None):
        from meterflow.commands import cli

        return CliRunner().invoke(cli, ["--config", str(path), "dead-letters", *args], input=stdin)

    state["run"] = run
    return state


def test_list_json_through_the_command(cli_env):
    cli_env["letters"] = [_letter(0), _letter(1, reason="contract: x")]
    result = cli_env["run"]("list", "--json", "--kind", "unknown_meter")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["topic"], doc["read"], doc["selected"], [d["offset"] for d in doc["dead_letters"]]) == (
        "dead",
        2,
        1,
        [0],
    )
    assert cli_env["sent"] == []


def test_list_table_never_reads_a_reason_as_markup(cli_env):
    cli_env["letters"] = [_letter(0, reason="unknown meter: [bold red]x[/]")]
    result = cli_env["run"]("list")
    assert result.exit_code == 0, result.output
    assert "[bold red]x[/]" in result.stdout and "1 dead letters selected of 1 read from dead" in result.stderr


def test_replay_sends_payloads_unchanged_keyed_when_they_decode(cli_env):
    odd = b"\xde\xad"
    cli_env["letters"] = [
        _letter(0, seen_at=T0),
        _letter(1, payload=odd, seen_at=T0 + MS),
        _letter(2, reason="contract: x"),
    ]
    result = cli_env["run"]("replay", "--kind", "unknown_meter", "--yes")
    assert result.exit_code == 0, result.output
    [(topic, records, max_request_size)] = cli_env["sent"]
    assert topic == "in" and records == [(b"t1/c1", _event("e0-0")), (None, odd)]
    assert max_request_size > 1_048_576  # the largest input message plus the dead-letter headroom
    assert "replayed 2 dead letters to in (1 keyed tenant_id/customer_id, 1 unkeyed)" in result.stderr


def test_replay_never_sends_a_cut_payload(cli_env):
    cli_env["letters"] = [
        _letter(0),
        _letter(1, reason="malformed Avro: EOF; payload cut to 2 of 5 bytes", payload=b"ab"),
    ]
    result = cli_env["run"]("replay", "--yes")
    assert result.exit_code == 0, result.output
    assert [v for _, v in cli_env["sent"][0][1]] == [_event("e0-0")]
    assert "1 selected dead letters not replayed: the job kept only the start of their message (0/1)" in result.stderr


def test_replay_dry_run_sends_nothing(cli_env):
    cli_env["letters"] = [_letter(0)]
    result = cli_env["run"]("replay", "--dry-run")
    assert result.exit_code == 0 and cli_env["sent"] == []
    assert "dry run: would replay 1 dead letters to in" in result.stderr


def test_replay_asks_above_the_threshold_and_not_at_it(cli_env):
    cli_env["letters"] = [_letter(i) for i in range(CONFIRM_ABOVE + 1)]
    refused = cli_env["run"]("replay", "--limit", str(CONFIRM_ABOVE + 1), stdin="n\n")
    assert refused.exit_code == 1 and cli_env["sent"] == []  # one past the threshold: asked, declined
    no_stdin = cli_env["run"]("replay")
    assert no_stdin.exit_code == 1 and cli_env["sent"] == []  # no answer (CI without a terminal): nothing sent
    at_threshold = cli_env["run"]("replay", "--limit", str(CONFIRM_ABOVE))
    assert at_threshold.exit_code == 0 and len(cli_env["sent"][0][1]) == CONFIRM_ABOVE  # exactly at it: not asked
    confirmed = cli_env["run"]("replay", "--to-topic", "elsewhere", stdin="y\n")
    assert (
        confirmed.exit_code == 0
        and cli_env["sent"][1][0] == "elsewhere"
        and len(cli_env["sent"][1][1]) == CONFIRM_ABOVE + 1
    )


def test_replay_to_the_dead_letter_topic_is_refused(cli_env):
    result = cli_env["run"]("replay", "--to-topic", "dead", "--yes")
    assert result.exit_code == 2 and "dead-letter topic" in result.output and cli_env["sent"] == []


def test_bad_time_is_a_usage_error(cli_env):
    result = cli_env["run"]("list", "--since", "yesterday")
    assert result.exit_code == 2 and "neither ISO-8601 nor epoch milliseconds" in result.output


def test_options_reach_the_reader_as_criteria(cli_env):
    """--from-offset decides where reading starts; naive --since is UTC."""
    result = cli_env["run"](
        "list",
        "--since",
        "2026-03-01T12:00:00",
        "--until",
        "1772366400001",
        "--partition",
        "1",
        "--from-offset",
        "5",
        "--to-offset",
        "9",
        "--limit",
        "3",
        "--reason-contains",
        "a",
        "--reason-contains",
        "b",
    )
    assert result.exit_code == 0, result.output
    [(topic, criteria)] = cli_env["read_from"]
    assert topic == "dead"
    assert criteria == Criteria(
        reason_contains=("a", "b"), since=T0, until=T0 + MS, partition=1, from_offset=5, to_offset=9, limit=3
    )
