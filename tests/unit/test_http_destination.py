"""The declared destinations' sender (connectors/http_destination.py) against the providers' fakes on loopback."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from billing.deliveries import MeterEvent
from billing.destination_rules import fit_identifier
from connectors.http_destination import HttpDestination
from meterflow.destinations import declare
from meterflow.errors import ProviderError
from tests.support.fake_destinations import FakeChargebee, FakeMetronome
from tests.support.fake_stripe import DROP, reject

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
HOUR_AGO = int((NOW - timedelta(hours=1)).timestamp())


def _event(n: int, value: str = "1.5", timestamp: int = HOUR_AGO, customer: str = "cus_1") -> MeterEvent:
    return MeterEvent(f"mf-{timestamp * 1000}-{n:064x}", "api_requests", customer, value, timestamp)


@pytest.fixture
def metronome():
    fake = FakeMetronome(clock=NOW.timestamp).start()
    yield fake
    fake.stop()


def _sender(fake, declaration=None, clock=lambda: NOW, **kwargs) -> HttpDestination:
    destination = declare("metronome", {"api_base": fake.url, **(declaration or {})})
    return HttpDestination(destination, fake.api_key, clock=clock, linger_s=0.01, timeout_s=2.0, **kwargs)


async def _send_all(sender: HttpDestination, events: list[MeterEvent]):
    try:
        return await sender.send_all(events)
    finally:
        await sender.close()


def test_deliveries_in_flight_together_go_in_requests_of_at_most_the_batch(metronome):
    events = [_event(n) for n in range(250)]
    sender = _sender(metronome)
    answers = asyncio.run(_send_all(sender, events))
    assert all(isinstance(a, str) for a in answers)
    assert sorted(len(r.identifiers) for r in metronome.requests) == [50, 100, 100]
    assert metronome.total("cus_1", "api_requests") == Decimal("375.0")
    assert metronome.outcomes() == {"accepted": 3}
    assert {e.value_sent for e in metronome.events} == {"1.5"}  # a decimal string, never a JSON number


def test_a_resend_of_the_same_deliveries_counts_nothing_twice(metronome):
    events = [_event(n) for n in range(5)]
    asyncio.run(_send_all(_sender(metronome), events))
    asyncio.run(_send_all(_sender(metronome), events))
    assert metronome.total("cus_1", "api_requests") == Decimal("7.5")
    assert metronome.duplicates == 5


def test_what_the_provider_would_refuse_is_refused_without_a_call(metronome):
    too_old = _event(1, timestamp=int((NOW - timedelta(days=34, seconds=1)).timestamp()))
    too_far = _event(2, timestamp=int((NOW + timedelta(hours=24, seconds=1)).timestamp()))
    good = _event(3)
    answers = asyncio.run(_send_all(_sender(metronome), [too_old, too_far, good]))
    assert isinstance(answers[0], ProviderError) and not answers[0].retryable
    assert "more than 34d ago" in str(answers[0])
    assert isinstance(answers[1], ProviderError) and "in the future" in str(answers[1])
    assert isinstance(answers[2], str)
    assert [r.identifiers for r in metronome.requests] == [[good.identifier]]


def test_the_fake_refuses_what_metronome_refuses_when_the_senders_rules_would_let_it_through(metronome):
    """Rules loosened in the declaration: the fake still refuses, from the published schema and the docs."""
    loose = {"limits": {"max_batch": 101, "max_age": "40d", "identifier_max_length": 200}}
    oversized = [_event(n) for n in range(101)]
    answers = asyncio.run(_send_all(_sender(metronome, loose), oversized))
    # Refused whole, then sent again in halves that Metronome takes.
    assert [(r.outcome, r.detail, len(r.identifiers)) for r in metronome.requests][0] == (
        "invalid",
        "body: breaks maxItems 100",
        101,
    )
    assert all(isinstance(a, str) for a in answers)
    assert metronome.total("cus_1", "api_requests") == Decimal("151.5")
    metronome.events.clear()
    old = _event(1, timestamp=int((NOW - timedelta(days=35)).timestamp()))
    [answer] = asyncio.run(_send_all(_sender(metronome, loose), [old]))
    assert isinstance(answer, ProviderError) and "more than 34 days in the past" in str(answer)
    long_id = MeterEvent("x" * 129, "api_requests", "cus_1", "1", HOUR_AGO)
    [answer] = asyncio.run(_send_all(_sender(metronome, loose), [long_id]))
    assert isinstance(answer, ProviderError) and "transaction_id" in str(answer)
    assert metronome.events == []


def test_an_identifier_longer_than_the_destination_takes_is_sent_hashed_to_fit(metronome):
    long_id = MeterEvent("mf-" + "y" * 200, "api_requests", "cus_1", "2", HOUR_AGO)
    [answer] = asyncio.run(_send_all(_sender(metronome), [long_id]))
    assert isinstance(answer, str)
    assert [e.identifier for e in metronome.events] == [fit_identifier(long_id.identifier, 128)]


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(429, True), (500, True), (503, True), (501, True), (520, True), (403, False), (307, False)],
)
def test_a_failed_request_fails_each_of_its_deliveries_and_says_whether_to_retry(metronome, status, retryable):
    metronome.inject(reject(status, retry_after=2.0))
    answers = asyncio.run(_send_all(_sender(metronome), [_event(1), _event(2)]))
    assert all(isinstance(a, ProviderError) and a.status == status and a.retryable is retryable for a in answers)
    if status == 429:
        assert all(isinstance(a, ProviderError) and a.retry_after == 2.0 for a in answers)
    assert metronome.events == []


def test_a_request_refused_whole_is_sent_again_in_halves_down_to_the_event_refused(metronome):
    """Metronome refuses a request with one bad event as a whole: the others still arrive, once."""
    events = [_event(n) for n in range(7)]
    bad = MeterEvent("x" * 129, "api_requests", "cus_1", "1", HOUR_AGO)  # past transaction_id's 128
    loose = {"limits": {"identifier_max_length": 200}}
    answers = asyncio.run(_send_all(_sender(metronome, loose), [*events[:3], bad, *events[3:]]))
    assert isinstance(answers[3], ProviderError) and answers[3].status == 400 and not answers[3].retryable
    assert "transaction_id" in str(answers[3])
    assert all(isinstance(a, str) for i, a in enumerate(answers) if i != 3)
    assert metronome.total("cus_1", "api_requests") == Decimal("10.5")
    assert metronome.duplicates == 0
    metronome.inject(reject(400))  # the pair refused whole once: each half then arrives
    [one, two] = asyncio.run(_send_all(_sender(metronome), [_event(20), _event(21)]))
    assert isinstance(one, str) and isinstance(two, str)
    assert [len(r.identifiers) for r in metronome.requests[-3:]] == [2, 1, 1]


def test_a_dropped_connection_is_retryable_and_the_retry_is_deduplicated(metronome):
    metronome.inject(DROP)  # the fake took the events, the answer never came
    events = [_event(1), _event(2)]
    [first, _] = asyncio.run(_send_all(_sender(metronome), events))
    assert isinstance(first, ProviderError) and first.retryable and first.status is None
    answers = asyncio.run(_send_all(_sender(metronome), events))
    assert all(isinstance(a, str) for a in answers)
    assert metronome.total("cus_1", "api_requests") == Decimal("3.0")
    assert metronome.duplicates == 2


def test_a_wrong_key_is_refused_and_not_retried(metronome):
    destination = declare("metronome", {"api_base": metronome.url})
    sender = HttpDestination(destination, "wrong", clock=lambda: NOW, linger_s=0.01)
    [answer] = asyncio.run(_send_all(sender, [_event(1)]))
    assert isinstance(answer, ProviderError) and answer.status == 401 and not answer.retryable


def test_requests_are_paced_one_slot_each(metronome):
    class Slots:
        def __init__(self):
            self.reserved = 0

        def reserve(self) -> float:
            self.reserved += 1
            return 0.0

    slots = Slots()
    sender = _sender(metronome)
    assert sender.pace_requests(slots, asyncio.sleep) is True  # type: ignore[arg-type]
    asyncio.run(_send_all(sender, [_event(n) for n in range(230)]))
    assert slots.reserved == 3


@pytest.fixture
def chargebee():
    fake = FakeChargebee(clock=NOW.timestamp).start()
    yield fake
    fake.stop()


def _chargebee(fake, declaration=None) -> HttpDestination:
    destination = declare("chargebee", {"api_base": fake.url + "/api/v2", **(declaration or {})})
    return HttpDestination(destination, fake.api_key, clock=lambda: NOW, linger_s=0.01, timeout_s=2.0)


def test_chargebee_takes_batches_of_500_with_identifiers_fitted_to_36_characters(chargebee):
    events = [_event(n, customer="sub_1") for n in range(600)]
    answers = asyncio.run(_send_all(_chargebee(chargebee), events))
    assert all(isinstance(a, str) and a.startswith("chargebee-req-") for a in answers)  # the answer's batch_id
    assert sorted(len(r.identifiers) for r in chargebee.requests) == [100, 500]
    assert {len(i) for r in chargebee.requests for i in r.identifiers} == {36}
    assert chargebee.total("sub_1", "api_requests") == Decimal("900.0")
    assert {e.value_sent for e in chargebee.events} == {"1.5"}
    asyncio.run(_send_all(_chargebee(chargebee), events[:10]))  # the same events again: recorded once
    assert chargebee.total("sub_1", "api_requests") == Decimal("900.0")
    assert chargebee.duplicates == 10


def test_chargebee_takes_the_last_12_hours_only_and_the_sender_refuses_older_without_a_call(chargebee):
    edge = _event(1, timestamp=int((NOW - timedelta(hours=12)).timestamp()), customer="sub_1")
    past = _event(2, timestamp=int((NOW - timedelta(hours=12, seconds=1)).timestamp()), customer="sub_1")
    answers = asyncio.run(_send_all(_chargebee(chargebee), [edge, past]))
    assert isinstance(answers[0], str)
    assert isinstance(answers[1], ProviderError) and "more than 12h ago" in str(answers[1])
    # With the sender's rule loosened, the fake refuses it as Chargebee documents.
    [answer] = asyncio.run(_send_all(_chargebee(chargebee, {"limits": {"max_age": "1d"}}), [past]))
    assert isinstance(answer, ProviderError) and answer.status == 400 and "within the last 12 hours" in str(answer)


def test_chargebee_refuses_what_its_schema_and_docs_refuse(chargebee):
    loose = {"limits": {"max_batch": 501, "max_event_bytes": None, "customer_max_length": None}}
    answers = asyncio.run(_send_all(_chargebee(chargebee, loose), [_event(n, customer="s") for n in range(501)]))
    assert "at most 500" in chargebee.requests[0].detail  # refused whole, then taken in halves
    assert all(isinstance(a, str) for a in answers)
    chargebee.events.clear()
    [answer] = asyncio.run(_send_all(_chargebee(chargebee, loose), [_event(1, customer="s" * 51)]))
    assert isinstance(answer, ProviderError) and "subscription_id" in str(answer) and "is too long" in str(answer)
    big = {
        "request": {
            "event": {
                "deduplication_id": "{identifier}",
                "subscription_id": "{customer}",
                "usage_timestamp": "{timestamp_ms}",
                "properties": {"value": "{value}", "note": "n" * 1000},
            }
        }
    }
    [answer] = asyncio.run(_send_all(_chargebee(chargebee, {**loose, **big}), [_event(1, customer="s")]))
    assert isinstance(answer, ProviderError) and "an event is at most 1 KB" in str(answer)
    assert chargebee.events == []


def test_the_sender_refuses_what_chargebee_refuses_before_a_call(chargebee):
    assert isinstance(asyncio.run(_send_all(_chargebee(chargebee), [_event(1, customer="s" * 51)]))[0], ProviderError)
    assert isinstance(
        asyncio.run(_send_all(_chargebee(chargebee), [_event(1, value="-2", customer="s")]))[0], ProviderError
    )
    assert chargebee.requests == []


def test_chargebee_past_10000_events_a_minute_answers_429_and_the_request_may_be_retried(chargebee):
    chargebee.events_per_minute = 700
    events = [_event(n, customer="sub_1") for n in range(1000)]
    answers = asyncio.run(_send_all(_chargebee(chargebee), events))
    refused = [a for a in answers if isinstance(a, ProviderError)]
    assert len(refused) == 500
    assert all(a.status == 429 and a.retryable and a.retry_after == 60.0 for a in refused)


def test_a_failed_event_in_chargebees_answer_fails_that_delivery_alone(chargebee):
    events = [_event(n, customer="sub_1") for n in range(3)]
    refused_id = fit_identifier(events[1].identifier, 36)
    chargebee.fail_events = {refused_id: {"api_error_code": "invalid_request", "message": "unknown subscription"}}
    answers = asyncio.run(_send_all(_chargebee(chargebee), events))
    assert isinstance(answers[0], str) and isinstance(answers[2], str)
    assert isinstance(answers[1], ProviderError) and not answers[1].retryable
    assert "invalid_request; unknown subscription" in str(answers[1])
    assert chargebee.total("sub_1", "api_requests") == Decimal("3.0")


def test_failed_events_the_answer_does_not_name_fail_the_request_for_a_retry(chargebee):
    events = [_event(n, customer="sub_1") for n in range(2)]
    chargebee.fail_events = {fit_identifier(events[0].identifier, 36): {"message": "bad"}}
    chargebee.unnamed_failures = True
    answers = asyncio.run(_send_all(_chargebee(chargebee), events))
    assert all(isinstance(a, ProviderError) and a.retryable and "without naming them" in str(a) for a in answers)


def test_a_key_never_shows_in_a_connection_error(metronome):
    destination = declare("metronome", {"api_base": "http://127.0.0.1:9"})  # nothing listens
    sender = HttpDestination(destination, "sk_secret_value", clock=lambda: NOW, linger_s=0.01)
    [answer] = asyncio.run(_send_all(sender, [_event(1)]))
    assert isinstance(answer, ProviderError) and answer.retryable
    assert "sk_secret_value" not in str(answer) and "connection failed (ClientConnectorError)" in str(answer)


def test_a_batch_answered_for_fewer_events_than_it_carried_leaves_no_caller_waiting():
    from connectors.request_batches import RequestBatches

    async def short(events):
        return ["only-one"]

    async def run():
        batches = RequestBatches(short, 10, 0.0)
        try:
            return await asyncio.wait_for(asyncio.gather(*batches.enqueue([1, 2]), return_exceptions=True), 5)
        finally:
            await batches.close()

    answers = asyncio.run(run())
    assert all(isinstance(a, RuntimeError) and "2 events came back with 1 answers" in str(a) for a in answers)


def test_the_fakes_refuse_future_timestamps_past_their_providers_rule(metronome, chargebee):
    loose = {"limits": {"max_ahead": "2d"}}
    ahead = _event(1, timestamp=int((NOW + timedelta(hours=24, seconds=1)).timestamp()))
    [answer] = asyncio.run(_send_all(_sender(metronome, loose), [ahead]))
    assert isinstance(answer, ProviderError) and "more than 24 hours in the future" in str(answer)
    soon = _event(2, timestamp=int((NOW + timedelta(seconds=1)).timestamp()), customer="s")
    [answer] = asyncio.run(_send_all(_chargebee(chargebee, loose), [soon]))
    assert isinstance(answer, ProviderError) and "within the last 12 hours" in str(answer)
    # The presets refuse both without a call.
    assert isinstance(asyncio.run(_send_all(_chargebee(chargebee), [soon]))[0], ProviderError)
    assert len(chargebee.requests) == 1


def test_chargebee_takes_only_its_own_key(chargebee):
    destination = declare("chargebee", {"api_base": chargebee.url + "/api/v2"})
    sender = HttpDestination(destination, "another-key", clock=lambda: NOW, linger_s=0.01)
    [answer] = asyncio.run(_send_all(sender, [_event(1, customer="s")]))
    assert isinstance(answer, ProviderError) and answer.status == 401 and not answer.retryable
    assert chargebee.events == []
