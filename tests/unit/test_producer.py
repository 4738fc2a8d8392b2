"""Producer input: JSON-lines parsing with reasons, and the deterministic synthetic generator."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from connectors.producer import SyntheticSpec, message_key, parse_event, read_jsonl, synthetic_events

GOOD = {
    "event_id": "e1",
    "tenant_id": "t",
    "customer_id": "c",
    "meter": "tokens",
    "quantity": "1.25",
    "event_time": "2026-01-01T00:00:01Z",
}


def test_parse_good_event():
    """A valid line becomes an exact event in UTC."""
    event = parse_event(GOOD)
    assert event["quantity"] == Decimal("1.25")
    assert event["event_time"] == datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert event["dimensions"] == {}


def test_parse_epoch_millis_and_integer_quantity():
    """Epoch milliseconds and integer quantities are accepted."""
    event = parse_event({**GOOD, "quantity": 3, "event_time": 1_767_225_600_000})
    assert event["quantity"] == Decimal(3)
    assert event["event_time"] == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"event_id": ""}, "missing field"),
        ({"meter": None}, "missing field"),
        ({"quantity": 1.5}, "not a JSON float"),
        ({"quantity": "abc"}, "not a decimal"),
        ({"quantity": "1e40"}, "decimal\\(38, 9\\)"),
        ({"quantity": "0.0000000001"}, "decimal\\(38, 9\\)"),
        ({"event_time": "2026-01-01T00:00:00"}, "no time zone"),
        ({"event_time": "yesterday"}, "ISO-8601"),
        ({"dimensions": {"a": 1}}, "string values"),
        ({"tenant_id": 5}, "must be a string"),
    ],
)
def test_parse_rejects_with_reason(change, reason):
    """Invalid events are refused with a reason that names the problem."""
    with pytest.raises(ValueError, match=reason):
        parse_event({**GOOD, **change})


def test_read_jsonl_keeps_good_lines_and_reports_bad(tmp_path):
    """Bad lines are collected with their line numbers; good ones still flow."""
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n\n" + json.dumps({**GOOD, "quantity": 0.1}) + "\n")
    rejected = []
    events = list(read_jsonl(path, rejected))
    assert [e["event_id"] for e in events] == ["e1"]
    assert [(r.line_number, "float" in r.reason or "Expecting" in r.reason) for r in rejected] == [(2, True), (4, True)]


def test_synthetic_events_are_deterministic_and_inside_span():
    """Same seed, same events; every event time within [start, start + span)."""
    spec = SyntheticSpec(count=500, start=datetime(2026, 1, 1, tzinfo=UTC), span=timedelta(minutes=3), seed=3)
    a, b = list(synthetic_events(spec)), list(synthetic_events(spec))
    assert a == b and len(a) == 500
    assert len({e["event_id"] for e in a}) == 500
    assert all(spec.start <= e["event_time"] < spec.start + spec.span for e in a)
    assert all(isinstance(e["quantity"], Decimal) for e in a)


def test_message_key_groups_by_customer():
    """One customer's events share a key (and so a partition)."""
    assert message_key(parse_event(GOOD)) == b"t/c"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"event_id": "e" * 129}, "contract: event_id is 129 bytes, at most 128"),
        ({"tenant_id": "t\u0000"}, "contract: tenant_id has control character U+0000 at character 1"),
        ({"customer_id": "c\u0085"}, "contract: customer_id has control character U+0085 at character 1"),
        ({"meter": "m" * 65}, "contract: meter is 65 bytes, at most 64"),
        ({"dimensions": {f"k{i}": "v" for i in range(17)}}, "contract: 17 dimensions, at most 16"),
        ({"dimensions": {"k" * 65: "v"}}, "contract: dimension key is 65 bytes, at most 64"),
        ({"dimensions": {"region": "v" * 129}}, "contract: dimension 'region' is 129 bytes, at most 128"),
        (
            {"dimensions": {"region": "eu\u007f"}},
            "contract: dimension 'region' has control character U+007F at character 2",
        ),
        ({"quantity": "1000000000000000.000000001"}, "contract: |quantity| exceeds 1000000000000000"),
        ({"quantity": -1_000_000_000_000_001}, "contract: |quantity| exceeds 1000000000000000"),
        ({"event_id": "a\ud800"}, "contract: event_id has lone surrogate U+D800 at character 1"),
    ],
)
def test_parse_refuses_what_breaks_the_input_contract(change, reason):
    """The producer refuses, with the job's own reason, what the job would dead-letter."""
    with pytest.raises(ValueError) as refused:
        parse_event({**GOOD, **change})
    assert str(refused.value) == reason


def test_parse_keeps_events_exactly_at_the_contract_limits():
    """At every limit an event is still sent."""
    at_limits = {
        "event_id": "e" * 128,
        "tenant_id": "é" * 32,
        "customer_id": "c" * 128,
        "meter": "m" * 64,
        "quantity": "-1000000000000000",
        "dimensions": {"k" * 64: "v" * 128, **{f"k{i}": "" for i in range(15)}},
    }
    assert parse_event({**GOOD, **at_limits})["meter"] == "m" * 64


def test_reasons_never_repeat_a_huge_field():
    """A 900 KB field shows as a short reason, in the terminal and the rejected file."""
    for change in ({"quantity": "x" * 900_000}, {"event_time": "y" * 900_000}, {"meter": "m" * 900_000}):
        with pytest.raises(ValueError) as refused:
            parse_event({**GOOD, **change})
        assert len(str(refused.value)) < 100


def test_produce_does_not_send_lines_that_break_the_contract(tmp_path, monkeypatch):
    """`meterflow produce --file`: a contract-breaking line is listed with its reason, saved, not sent; exit 2."""
    from click.testing import CliRunner

    import connectors.producer as producer
    from meterflow.commands import cli

    sent: list[list] = []

    def send(bootstrap_servers, topic, events, **kwargs):
        sent.append(list(events))
        return len(sent[-1])

    monkeypatch.setattr(producer, "send_events", send)
    config = tmp_path / "m.yaml"
    config.write_text("{}\n")
    lines = [
        GOOD,
        {**GOOD, "event_id": "e2", "dimensions": {"[bold]": "\u0000"}},
        {**GOOD, "event_id": "e3", "quantity": "2000000000000000"},
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = CliRunner().invoke(cli, ["--config", str(config), "produce", "--file", str(path)])
    assert result.exit_code == 2, result.output
    assert [[e["event_id"] for e in batch] for batch in sent] == [["e1"]]
    rejected = [json.loads(line) for line in (tmp_path / "events.jsonl.rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (2, "contract: dimension '[bold]' has control character U+0000 at character 0"),
        (3, "contract: |quantity| exceeds 1000000000000000"),
    ]
    assert "contract: dimension '[bold]' has control character U+0000" in result.output
