"""The Stripe provider (official SDK) against the project's fault-injecting fake on loopback.

Checks how each kind of answer becomes a ProviderError the retry policy understands, and that
the identifier doubles as the Idempotency-Key so a resend is replayed, not counted again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal

import pytest

from billing.deliveries import MeterEvent
from connectors.stripe_provider import StripeMeterEvents
from meterflow.config import JobConfig
from meterflow.errors import ConfigError, ProviderError
from tests.support.fake_stripe import DROP, SLOW, FakeStripe, reject


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    server = FakeStripe().start()
    yield server
    server.stop()


class SyncProvider:
    """The async provider driven from a test: each call runs in one event loop of its own."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg

    def _run(self, call):
        async def once():
            p = StripeMeterEvents(self.cfg)
            try:
                return await call(p)
            finally:
                await p.close()

        return asyncio.run(once())

    def send(self, event: MeterEvent) -> str:
        return self._run(lambda p: p.send(event))

    def total(self, *args: object) -> Decimal:
        return self._run(lambda p: p.total(*args))


def provider(fake: FakeStripe, timeout: str = "2s") -> SyncProvider:
    cfg = JobConfig.model_validate(
        {
            "stripe": {"api_base": fake.url, "api_key": "sk_test_unit"},
            "billing": {"enabled": True, "request_timeout": timeout},
        }
    )
    return SyncProvider(cfg)


# One timestamp for the module: a resend must carry exactly the parameters of the first call.
EVENT_TIME = int(time.time()) - 60


def event(identifier: str = "mf-1-abc", value: str = "12") -> MeterEvent:
    return MeterEvent(identifier, "tokens", "cus_1", value, EVENT_TIME)


def test_sent_event_is_accepted_once_and_a_resend_is_replayed(fake):
    """The same identifier and key twice: one accepted event, the second answer is Stripe's replay."""
    p = provider(fake)
    assert p.send(event()).startswith("req_fake_")
    p.send(event())
    assert list(fake.accepted) == ["mf-1-abc"] and fake.accepted["mf-1-abc"].value == Decimal("12")
    assert fake.accepted["mf-1-abc"].idempotency_key == "mf-1-abc"
    assert [r.outcome for r in fake.requests] == ["accepted", "replayed"]


def test_429_is_retryable_with_retry_after(fake):
    fake.inject(reject(429, retry_after=3))
    with pytest.raises(ProviderError) as e:
        provider(fake).send(event())
    assert (e.value.status, e.value.retryable, e.value.retry_after) == (429, True, 3.0)
    assert fake.accepted == {}


@pytest.mark.parametrize("status", [500, 503])
def test_5xx_is_retryable(fake, status):
    fake.inject(reject(status))
    with pytest.raises(ProviderError) as e:
        provider(fake).send(event())
    assert e.value.status == status and e.value.retryable


def test_same_key_with_other_parameters_is_refused(fake):
    """Stripe refuses a reused Idempotency-Key with different parameters; so does the fake, and it is final."""
    p = provider(fake)
    p.send(event(value="1"))
    with pytest.raises(ProviderError) as e:
        p.send(event(value="2"))
    assert e.value.status == 400 and not e.value.retryable and len(fake.accepted) == 1


def test_invalid_request_is_final(fake):
    """A value that is not a number is refused with 400: retrying can't help."""
    with pytest.raises(ProviderError) as e:
        provider(fake).send(event(value="twelve"))
    assert e.value.status == 400 and not e.value.retryable and "must be a number" in str(e.value)


@pytest.mark.parametrize("value", ["12.5", "0.000000001", "-3.25"])
def test_a_value_that_is_not_whole_is_refused_like_stripe(fake, value):
    """Stripe takes whole numbers only (decimals on request): the fake refuses the rest with 400, final."""
    with pytest.raises(ProviderError) as e:
        provider(fake).send(event(value=value))
    assert e.value.status == 400 and not e.value.retryable and "whole number" in str(e.value)
    assert fake.accepted == {}


def test_whole_and_negative_values_are_accepted(fake):
    p = provider(fake)
    p.send(event("mf-1", "0"))
    p.send(event("mf-2", "-7"))
    p.send(event("mf-3", "123456789012345678901234567890"))
    assert [e.value for e in fake.events] == [Decimal(0), Decimal(-7), Decimal("123456789012345678901234567890")]


def test_an_account_with_decimals_takes_up_to_15_significant_digits():
    """With decimals enabled: 15 significant digits at the limit, 16 one past it."""
    fake = FakeStripe(decimals=True).start()
    try:
        p = provider(fake)
        p.send(event("mf-1", "12345678901234.5"))
        with pytest.raises(ProviderError) as e:
            p.send(event("mf-2", "123456789012345.6"))
        assert e.value.status == 400 and "too_many_digits" in str(e.value)
        assert list(fake.accepted) == ["mf-1"]
    finally:
        fake.stop()


@pytest.mark.parametrize("fault", [DROP, SLOW])
def test_unanswered_calls_are_retryable_and_the_resend_is_not_counted_twice(fake, fault):
    """Dropped connection or an answer after the timeout: the event was accepted; the resend replays it."""
    fake.inject(fault)
    p, sent = provider(fake, timeout="1s"), event()
    with pytest.raises(ProviderError) as e:
        p.send(sent)
    assert e.value.status is None and e.value.retryable
    p.send(sent)
    assert len(fake.accepted) == 1 and fake.requests[-1].outcome == "replayed"


def test_no_api_key_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="METERFLOW_STRIPE_API_KEY"):
        StripeMeterEvents(JobConfig.model_validate({"billing": {"enabled": True}}))


def test_fail_for_starts_at_the_next_request_and_ends(fake):
    """The fake's outage window: every call inside it gets the status, the first call after it succeeds."""
    now = [time.time()]
    fake.clock = lambda: now[0]
    fake.fail_for(5, status=429, retry_after=2)
    now[0] += 30  # the outage starts with the next request, not when scheduled
    p = provider(fake)
    for _ in range(2):
        with pytest.raises(ProviderError) as e:
            p.send(event())
        assert e.value.status == 429
    now[0] += 6
    p.send(event())
    assert [r.outcome for r in fake.requests] == ["rejected-429", "rejected-429", "accepted"]


def test_meter_totals_come_from_the_event_summaries(fake):
    """The meter is found by event name; its summary for one customer and range sums what the fake accepted."""
    p = provider(fake)
    p.send(event("mf-1", "2"))
    p.send(event("mf-2", "4"))
    start = EVENT_TIME - EVENT_TIME % 60
    assert p.total("tokens", "cus_1", start, start + 60) == Decimal("6")
    assert p.total("tokens", "cus_2", start, start + 60) == Decimal(0)
    with pytest.raises(ProviderError) as e:
        p.total("no_such_meter", "cus_1", start, start + 60)
    assert not e.value.retryable and "no Stripe meter" in str(e.value)


def test_after_a_day_the_fake_forgets_identifiers_like_stripe(fake):
    """Past 24 h the same identifier and key are a new event: what the ledger's provider check guards against."""
    now = [time.time()]
    fake.clock = lambda: now[0]
    p = provider(fake)
    p.send(event("mf-1"))
    now[0] += 25 * 3600
    fake.clock = lambda: now[0]
    p.send(event("mf-1"))
    assert len(fake.events) == 2 and fake.requests[-1].outcome == "accepted-again"
