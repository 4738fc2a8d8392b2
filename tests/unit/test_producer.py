"""Producer input: JSON-lines parsing with reasons, and the deterministic synthetic generator."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from meterflow.producer import SyntheticSpec, message_key, parse_event, read_jsonl, synthetic_events

GOOD = {"event_id": "e1", "tenant_id": "t", "customer_id": "c", "meter": "tokens", "quantity": "1.25", "event_time": "2026-01-01T00:00:01Z"}


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
