"""The v2 meter event stream provider against the fake Stripe's stream on loopback.

Deliveries in flight together share one request of at most 100 events; the session is created once,
renewed before it expires and after Stripe says it expired; faults reach every caller of a request;
events Stripe validates after accepting come back as error reports that name the request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal

import pytest

from billing.deliveries import MeterEvent
from billing.retry import RateReservations
from connectors.stripe_stream import (
    SESSION_RENEW_MARGIN_S,
    StripeMeterEventStream,
    error_reports_of,
    meter_events_provider,
    stream_event,
)
from meterflow.config import JobConfig
from meterflow.errors import ProviderError
from tests.support.fake_stripe import DROP, FakeStripe, reject

EVENT_TIME = int(time.time()) - 60


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    server = FakeStripe().start()
    yield server
    server.stop()


def config(fake: FakeStripe, **stripe: object) -> JobConfig:
    return JobConfig.model_validate(
        {
            "stripe": {
                "api_base": fake.url,
                "meter_events_base": fake.url,
                "api_key": "sk_test_unit",
                "meter_events_api": "v2_stream",
                **stripe,
            },
            "billing": {"enabled": True, "request_timeout": "2s"},
        }
    )


def event(i: int, value: str = "3", timestamp: int = EVENT_TIME) -> MeterEvent:
    return MeterEvent(f"mf-{i}", "tokens", f"cus_{i % 7}", value, timestamp)


def run(cfg: JobConfig, body, clock=time.time):
    async def once():
        p = StripeMeterEventStream(cfg, clock=clock)
        try:
            return await body(p)
        finally:
            await p.close()

    return asyncio.run(once())


def send_all(p: StripeMeterEventStream, events: list[MeterEvent]):
    return asyncio.gather(*(p.send(e) for e in events), return_exceptions=True)


def test_the_config_chooses_the_stream():
    assert type(meter_events_provider(config(FakeStripe().start()))) is StripeMeterEventStream
    v1 = JobConfig.model_validate({"stripe": {"api_key": "sk_test_unit"}, "billing": {"enabled": True}})
    assert type(meter_events_provider(v1)) is not StripeMeterEventStream


def test_a_stream_event_carries_an_rfc3339_timestamp_and_string_payload():
    body = stream_event(MeterEvent("mf-1", "tokens", "cus_1", "12", 1_767_225_600))
    assert body == {
        "event_name": "tokens",
        "identifier": "mf-1",
        "timestamp": "2026-01-01T00:00:00Z",
        "payload": {"stripe_customer_id": "cus_1", "value": "12"},
    }


def test_deliveries_in_flight_together_share_requests_of_at_most_the_batch_size(fake):
    events = [event(i) for i in range(250)]

    async def body(p):
        answers = await send_all(p, events)
        return answers, p.requests_sent, p.sessions_created

    answers, requests, sessions = run(config(fake), body)
    assert (requests, sessions, fake.stream.stream_requests) == (3, 1, 3)
    assert len(set(answers)) == 3 and all(a.startswith("req_fake_stream_") for a in answers)
    assert sorted(fake.accepted) == sorted(e.identifier for e in events)
    assert fake.total("tokens", "cus_0", EVENT_TIME - 1, EVENT_TIME + 1) == Decimal(
        3 * len([i for i in range(250) if i % 7 == 0])
    )


def test_a_smaller_batch_size_and_a_lone_delivery_after_the_linger(fake):
    async def body(p):
        await send_all(p, [event(i) for i in range(10)])
        lone = await p.send(event(99))
        return p.requests_sent, lone

    requests, lone = run(config(fake, stream_batch_size=4, stream_linger="5ms"), body)
    assert requests == 3 + 1 and lone.startswith("req_fake_stream_")


def test_requests_not_deliveries_take_the_rate_slots(fake):
    """calls_per_second paces the stream's requests: 250 deliveries are 3 requests and 3 slots."""
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    async def body(p):
        p.pace_requests(RateReservations(rate=2, capacity=1, clock=lambda: 0.0), sleep)
        await send_all(p, [event(i) for i in range(250)])
        return p.requests_sent

    assert run(config(fake), body) == 3
    assert slept == [0.5, 1.0], "the first request goes at once, the next two wait for their slots"


def test_deliveries_that_arrive_while_a_request_waits_for_its_slot_ride_in_it(fake):
    """Under a rate that binds, the waiting request is cut when its slot comes: the deliveries that
    arrived meanwhile share it rather than take further slots in small requests."""
    slept: list[float] = []

    async def body(p):
        slot = asyncio.Event()

        async def sleep(s: float) -> None:
            slept.append(s)
            await slot.wait()

        p.pace_requests(RateReservations(rate=1, capacity=1, clock=lambda: 0.0), sleep)
        await p.send(event(0))  # the first slot is free
        waiting = [asyncio.ensure_future(p.send(event(i))) for i in range(1, 4)]
        await asyncio.sleep(0.05)  # past the linger: their request waits for the next slot
        later = [asyncio.ensure_future(p.send(event(i))) for i in range(4, 40)]
        await asyncio.sleep(0.05)  # past another linger
        slot.set()
        answers = await asyncio.gather(*waiting, *later)
        return p.requests_sent, set(answers)

    requests, answers = run(config(fake, stream_linger="5ms"), body)
    assert (requests, len(answers), slept) == (2, 1, [1.0])
    assert len(fake.accepted) == 40


def test_a_resent_identifier_is_counted_once(fake):
    async def body(p):
        await p.send(event(1))
        await p.send(event(1))

    run(config(fake), body)
    assert [r.outcome for r in fake.requests] == ["accepted", "duplicate"]
    assert len(fake.events) == 1


def test_the_session_is_renewed_before_it_expires(fake):
    now = [time.time()]  # the provider's clock; the fake's session expiry is on the real one

    async def body(p):
        await p.send(event(1))
        now[0] += fake.session_ttl - SESSION_RENEW_MARGIN_S - 1
        await p.send(event(2))
        first = p.sessions_created
        now[0] += 2
        await p.send(event(3))
        return first, p.sessions_created

    assert run(config(fake), body, clock=lambda: now[0]) == (1, 2)


def test_a_session_the_fake_expired_is_renewed_and_the_request_sent_again(fake):
    fake.session_ttl = 0.2

    async def body(p):
        await p.send(event(1))
        await asyncio.sleep(0.3)
        # The provider's clock says the session is good for a long time; the fake says it expired.
        await p.send(event(2))
        return p.sessions_created

    assert run(config(fake), body, clock=lambda: 0.0) == 2
    assert sorted(fake.accepted) == ["mf-1", "mf-2"]


def test_a_fault_reaches_every_delivery_of_the_request(fake):
    fake.inject(reject(429, retry_after=2))

    async def body(p):
        return await send_all(p, [event(i) for i in range(5)])

    answers = run(config(fake), body)
    assert all(
        isinstance(a, ProviderError) and a.status == 429 and a.retryable and a.retry_after == 2.0 for a in answers
    )
    assert fake.accepted == {}


def test_a_dropped_request_is_retryable_and_may_have_been_accepted(fake):
    fake.inject(DROP)

    async def body(p):
        return await send_all(p, [event(i) for i in range(3)])

    answers = run(config(fake), body)
    assert all(isinstance(a, ProviderError) and a.retryable for a in answers)
    assert sorted(fake.accepted) == ["mf-0", "mf-1", "mf-2"]


def test_more_than_100_events_in_one_request_is_refused_by_the_fake(fake):
    import json
    import urllib.request

    token = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(f"{fake.url}/v2/billing/meter_event_session", data=b"{}", method="POST")
        ).read()
    )["authentication_token"]
    body = json.dumps({"events": [stream_event(event(i)) for i in range(101)]}).encode()
    request = urllib.request.Request(
        f"{fake.url}/v2/billing/meter_event_stream",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    assert e.value.code == 400
    assert fake.accepted == {}


def test_events_stripe_refuses_after_accepting_come_back_as_error_reports(fake):
    events = [event(1), event(2, value="2.5"), event(3, timestamp=int(time.time()) + 3600), event(4)]

    async def body(p):
        answers = await send_all(p, events)
        return answers, await p.error_reports(["tokens"])

    answers, reports = run(config(fake), body)
    assert len(set(answers)) == 1  # one request, accepted
    assert sorted(fake.accepted) == ["mf-1", "mf-4"]
    assert sorted(r.code for r in reports) == ["meter_event_invalid_value", "timestamp_in_future"]
    assert {r.request_id for r in reports} == {answers[0]}
    assert all(answers[0] in r.reason for r in reports)


def test_error_reports_are_read_across_pages(fake):
    fake.stream.page_size = 2
    bad = [event(i, value="0.5") for i in range(5)]

    async def body(p):
        await send_all(p, bad)
        return await p.error_reports(["tokens"])

    reports = run(config(fake), body)
    assert len(reports) == 5 and len({r.report_id for r in reports}) == 5


def test_polls_that_share_a_meter_cache_list_the_meters_once(fake):
    """The retry scan reads error reports with a new provider each poll; the meters are listed at the first."""
    meter_ids: dict[str, str] = {}

    async def poll() -> None:
        p = StripeMeterEventStream(config(fake), meter_ids=meter_ids)
        try:
            await p.error_reports(["tokens", "api_calls"])
        finally:
            await p.close()

    for _ in range(3):
        asyncio.run(poll())
    assert fake.meter_lists == 1 and meter_ids == {"api_calls": "mtr_api_calls", "tokens": "mtr_tokens"}


def test_error_reports_of_skips_other_events_and_samples_without_a_request():
    events = [
        {"id": "evt_1", "type": "v1.billing.meter.no_meter_found", "data": {}},
        {
            "id": "evt_2",
            "type": "v1.billing.meter.error_report_triggered",
            "created": "t",
            "data": {
                "reason": {
                    "error_types": [
                        {
                            "code": "x",
                            "error_count": 3,
                            "sample_errors": [
                                {"error_message": "m", "request": {"id": "req_1"}},
                                {"error_message": "n"},
                            ],
                        }
                    ]
                }
            },
        },
    ]
    assert [(r.report_id, r.request_id, r.code, r.error_count) for r in error_reports_of(events)] == [
        ("evt_2", "req_1", "x", 3)
    ]


def test_a_report_knows_its_age():
    from connectors.stripe_stream import ErrorReport

    report = ErrorReport("evt_1", "2026-01-01T00:00:00Z", "req_1", "x", "m", 1)
    assert report.age_s(1_767_225_600 + 30) == 30
    assert ErrorReport("evt_2", "not a time", "req_1", "x", "m", 1).age_s(1_767_225_600) == 0
