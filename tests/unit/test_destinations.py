"""Declared destinations (meterflow/destinations.py) and their rules (billing/destination_rules.py), without I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from pydantic import ValidationError

from billing.deliveries import MeterEvent
from billing.destination_rules import (
    compact_size,
    event_refusal,
    fit_identifier,
    plan_correction,
    refused_in_answer,
    render_body,
    render_event,
    request_id_in_answer,
)
from meterflow.destinations import EVENT_FIELDS, declare, presets

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
START = int(datetime(2026, 3, 10, 11, 0, tzinfo=UTC).timestamp())
IDENTIFIER = "mf-1773140400000-" + "ab" * 32  # the shape billing/identifiers.py derives: 81 characters


def _event(value: str = "12.5", timestamp: int = START, customer: str = "cus_1", identifier: str = IDENTIFIER):
    return MeterEvent(identifier, "api_requests", customer, value, timestamp)


def _http(**overrides):
    """A destination declared in full, with no preset: what a fourth provider of the same kind takes."""
    declaration = {
        "preset": "http",
        "api_base": "https://usage.example.com",
        "request": {
            "path": "/v1/usage",
            "auth": "bearer",
            "body": {"data": {"items": "{events}"}, "source": "meterflow"},
            "event": {
                "id": "{identifier}",
                "account": "acct-{customer}",
                "metric": "{event_name}",
                "at": "{timestamp_ms}",
                "quantity": "{value}",
            },
            "request_id": "request",
            "failed_events": {"list": "rejected", "identifier": "id", "reason": ["code", "detail"]},
        },
        "limits": {
            "max_batch": 10,
            "max_event_bytes": 256,
            "requests_per_second": 5,
            "dedup_horizon": "7d",
            "max_age": "12h",
            "max_ahead": "5m",
            "identifier_max_length": 36,
            "customer_max_length": 20,
            "values": {"whole_numbers": False, "max_significant_digits": 12, "negative": False},
            "correction": "negative_delta",
        },
    }
    for key, value in overrides.items():
        declaration[key] = {**declaration[key], **value} if isinstance(value, dict) else value
    return declare("usage_api", declaration)


def test_a_template_keeps_a_lone_placeholders_type_and_formats_the_others_in():
    destination = _http()
    event = render_event(destination, _event())
    assert event == {
        "id": fit_identifier(IDENTIFIER, 36),
        "account": "acct-cus_1",
        "metric": "api_requests",
        "at": START * 1000,  # an integer, not "1773140400000"
        "quantity": "12.5",  # the decimal string, never a float
    }
    assert render_body(destination, [event, event]) == {"data": {"items": [event, event]}, "source": "meterflow"}


def test_every_placeholder_renders():
    template = {name: "{" + name + "}" for name in EVENT_FIELDS}
    destination = _http(request={"event": template, "failed_events": None})
    rendered = render_event(destination, _event())
    assert rendered["timestamp_s"] == START
    assert rendered["timestamp_rfc3339"] == "2026-03-10T11:00:00Z"
    assert rendered["customer"] == "cus_1"


def test_an_identifier_past_the_limit_is_hashed_to_it_deterministically():
    assert fit_identifier("short", 36) == "short"
    fitted = fit_identifier(IDENTIFIER, 36)
    assert len(fitted) == 36
    assert fitted == fit_identifier(IDENTIFIER, 36)  # every retry and replay sends the same
    assert fitted != fit_identifier(IDENTIFIER[:-1] + "c", 36)
    assert fit_identifier("x" * 36, 36) == "x" * 36
    assert len(fit_identifier("x" * 37, 36)) == 36


@pytest.mark.parametrize(
    ("event", "says"),
    [
        (_event(value="-1"), "negative"),
        (_event(value="1.0000000000001"), "significant digits"),
        (_event(value="NaN"), "not a number"),
        (_event(customer="c" * 21), "longer than 20 characters"),
        (_event(timestamp=START - 11 * 3600 - 1), "no longer accepts it"),
        (_event(timestamp=int((NOW + timedelta(minutes=5, seconds=1)).timestamp())), "in the future"),
    ],
)
def test_what_the_destination_would_refuse_is_found_before_a_call(event, says):
    refused = event_refusal(_http(), event, NOW)
    assert refused is not None
    assert says in refused
    assert refused.startswith("usage_api: ")


def test_the_limits_hold_up_to_the_edge():
    destination = _http()
    assert event_refusal(destination, _event(value="123456789012"), NOW) is None  # 12 digits
    assert event_refusal(destination, _event(customer="c" * 20), NOW) is None
    assert event_refusal(destination, _event(timestamp=int((NOW - timedelta(hours=12)).timestamp())), NOW) is None
    assert event_refusal(destination, _event(timestamp=int((NOW + timedelta(minutes=5)).timestamp())), NOW) is None


def test_an_event_one_byte_past_the_size_limit_is_refused():
    base = _event(customer="")
    size = compact_size(render_event(_http(), base))
    fits = _http(limits={"max_event_bytes": size})
    assert event_refusal(fits, base, NOW) is None
    tight = _http(limits={"max_event_bytes": size - 1})
    assert (
        event_refusal(tight, base, NOW)
        == f"usage_api: the event is {size} bytes, the provider takes at most {size - 1}"
    )


def test_a_correction_is_sent_inside_the_horizon_and_owed_past_it():
    destination = _http()
    inside = datetime(2026, 3, 10, 0, 0, tzinfo=UTC)
    assert plan_correction(destination, inside, Decimal(2), NOW).action == "send"
    past = plan_correction(destination, NOW - timedelta(hours=12, minutes=1), Decimal(2), NOW)
    assert past.action == "owed"
    assert "more than 12h ago" in (past.reason or "")
    assert "(it takes 12h back to 5m ahead)" in (past.reason or "")
    edge = plan_correction(destination, NOW - timedelta(hours=12), Decimal(2), NOW)
    assert edge.action == "send"


def test_a_lower_final_is_owed_where_the_destination_takes_no_negative_difference():
    inside = datetime(2026, 3, 10, 0, 0, tzinfo=UTC)
    none = _http(limits={"correction": "none"})
    assert plan_correction(none, inside, Decimal("0.5"), NOW).action == "send"  # more usage: one more event
    lowered = plan_correction(none, inside, Decimal("-0.5"), NOW)
    assert lowered.action == "owed"
    assert "takes no correction that lowers usage" in (lowered.reason or "")
    positive_only = _http(limits={"values": {"whole_numbers": False, "negative": False}})
    assert plan_correction(positive_only, inside, Decimal("-0.000000001"), NOW).action == "owed"


def test_the_answer_names_the_request_and_the_events_it_refused():
    destination = _http()
    answer = {"request": "req_9", "rejected": [{"id": "a", "code": "invalid", "detail": "bad account"}, {"id": "b"}]}
    assert request_id_in_answer(destination, answer, "hdr") == "req_9"
    assert request_id_in_answer(destination, None, "hdr") == "hdr"
    assert refused_in_answer(destination, answer) == {"a": "invalid; bad account", "b": "refused without a reason"}
    assert refused_in_answer(destination, "not an object") == {}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"request": {"body": {"items": []}}}, "exactly once"),
        ({"request": {"body": ["{events}", "{events}"]}}, "exactly once"),
        ({"request": {"event": {"id": "{identifier}", "who": "{tenant}"}}}, "names tenant"),
        ({"request": {"event": {"who": "{customer}"}}}, "must carry {identifier}"),
        ({"limits": {"correction": "cancel"}}, "correction"),
        ({"limits": {"max_batch": 0}}, "max_batch"),
        ({"request": {"auth": "cookie"}}, "auth"),
        ({"limits": {"typo": 1}}, "typo"),
        ({"request": {"body": {"items": "{events}", "key": "{customer}"}}}, "no placeholder but"),
        ({"request": {"event": {"ref": "evt-{identifier}", "id": "x"}}}, "must be exactly"),
        ({"api_base": "http://usage.example.com"}, "plain http to another host"),
        ({"api_base": "https://user:pw@usage.example.com"}, "api_base"),
    ],
)
def test_a_declaration_that_cannot_work_is_refused_with_what_is_wrong(change, says):
    with pytest.raises(ValidationError, match=says):
        _http(**change)


def test_an_unknown_preset_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"preset 'recurly' is not one of http, .*metronome"):
        declare("billing2", {"preset": "recurly"})


def test_a_preset_takes_the_configs_keys_over_its_own():
    assert "metronome" in presets()
    metronome = declare("metronome", {})
    assert metronome.preset == "metronome"
    assert metronome.limits.max_batch == 100
    eu = declare("metronome_eu", {"preset": "metronome", "api_base": "https://eu.example", "limits": {"max_batch": 50}})
    assert (eu.api_base, eu.limits.max_batch, eu.limits.max_age) == ("https://eu.example", 50, timedelta(days=34))


def test_a_destination_is_named_by_its_key_and_plain_http_is_for_loopback_only():
    with pytest.raises(ValueError, match="named by its key"):
        declare("metronome", {"name": "stripe"})
    assert declare("metronome", {"name": "metronome"}).name == "metronome"
    assert declare("metronome", {"api_base": "http://127.0.0.1:8080"}).api_base == "http://127.0.0.1:8080"


def test_the_declared_pace_keeps_full_requests_within_the_events_a_minute():
    site = {"api_base": "https://acme.ingest.chargebee.com/api/v2"}
    assert declare("chargebee", {**site, "limits": {"requests_per_second": 0.33}}).limits.events_per_minute == 10_000
    with pytest.raises(ValidationError, match=r"sends up to 10,020 events a minute; the provider takes 10,000"):
        declare("chargebee", {**site, "limits": {"requests_per_second": 0.334}})
    # Smaller batches leave room for more requests.
    smaller = declare("chargebee", {**site, "limits": {"requests_per_second": 2, "max_batch": 80}})
    assert smaller.limits.requests_per_second == 2
