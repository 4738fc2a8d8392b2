"""Routing: each window to its customer's destination, retries to the destination that recorded
them, a mapping no destination declares dead with its reason, the rules of a move, and a
destination's own limits and correction rule in the deliverer."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial

import pytest
from pydantic import SecretStr

from billing.deliveries import ClosedWindow, Dead, Retry, Sent, Skipped
from billing.delivery import Deliverer
from billing.routing import Router, delivery_limits, mapping_refusal, owed_correction
from meterflow.config import JobConfig
from meterflow.errors import ProviderError
from tests.unit.test_billing_delivery import NOW, FakeTime, MemoryLedger, ScriptedProvider, run, window

DECLARED = ("stripe", "chargebee", "metronome")


def _cfg() -> JobConfig:
    return JobConfig.model_validate(
        {
            "billing": {
                "enabled": True,
                "destinations": {
                    "metronome": {},
                    "chargebee": {"api_base": "https://acme.ingest.chargebee.com/api/v2"},
                },
            },
            "meters": [{"name": "tokens"}],
        }
    )


@dataclass
class MappedRoutes:
    """The Routes of billing/routing.py over the shared in-memory ledger and a mapping per customer."""

    ledger: MemoryLedger
    mapped: dict[str, str] = field(default_factory=dict)
    lookups: int = 0

    async def destinations_of(self, windows: list[ClosedWindow]) -> list[str]:
        self.lookups += 1
        out = []
        for w in windows:
            recorded = next(
                (
                    r["provider"]
                    for r in self.ledger.rows.values()
                    if r["kind"] == "window" and r["delivery"].window.key == w.key
                ),
                None,
            )
            out.append(recorded or self.mapped.get(w.customer_id, "stripe"))
        return out

    async def destinations_of_deliveries(self, identifiers: list[str]) -> dict[str, str]:
        self.lookups += 1
        return {i: self.ledger.rows[i]["provider"] for i in identifiers if i in self.ledger.rows}

    async def recorded_elsewhere(self) -> bool:
        return any(r["provider"] != "stripe" for r in self.ledger.rows.values())


def _routed(names=("stripe", "metronome")):
    cfg, t = _cfg(), FakeTime()
    ledger = MemoryLedger(t)
    ledger.customers.update({("tenant-1", "cust-2"): "m-2", ("tenant-1", "cust-3"): "m-3"})
    providers = {n: ScriptedProvider(name=n, one_call_per_key=n == "stripe") for n in names}
    deliverers = {
        n: Deliverer(
            cfg,
            p,
            ledger,
            clock=t.clock,
            sleep=t.sleep,
            rng=lambda: 1.0,
            limits=delivery_limits(cfg, n),
            owed=partial(owed_correction, cfg, n),
        )
        for n, p in providers.items()
    }
    routes = MappedRoutes(ledger, {"cust-2": "metronome", "cust-3": "metronome"})
    return Router(deliverers, routes), providers, ledger, routes, t


def test_each_window_goes_to_its_customers_destination_and_a_retry_to_the_one_that_recorded_it():
    router, providers, ledger, routes, t = _routed()
    providers["metronome"].script = [ProviderError("busy", status=503, retryable=True)]
    outcomes = run(router.on_windows([window("cust-1"), window("cust-2"), window("cust-3")]))
    assert [type(o) for o in outcomes] == [Sent, Retry, Sent]
    assert [e.provider_customer_id for e in providers["stripe"].sent] == ["cus_1"]
    assert sorted(e.provider_customer_id for e in providers["metronome"].sent) == ["m-2", "m-3"]
    [retry] = [o for o in outcomes if isinstance(o, Retry)]
    assert ledger.rows[retry.identifier]["provider"] == "metronome"
    # The mapping changes; the recorded window and its retry stay where they were recorded.
    routes.mapped = {}
    t.now += 3600
    assert isinstance(run(router.on_retry(retry.identifier)), Sent)
    assert len(providers["metronome"].sent) == 3 and len(providers["stripe"].sent) == 1
    assert run(router.on_windows([window("cust-2")])) == [Skipped(retry.identifier, "sent")]
    assert len(providers["stripe"].sent) == 1, "a recorded window never goes to a second destination"


def test_a_mapping_to_a_destination_not_declared_is_dead_with_its_reason_and_nothing_sent():
    router, providers, ledger, routes, _ = _routed()
    routes.mapped["cust-1"] = "chargebee"  # mapped, but this router has no chargebee
    [dead] = run(router.on_windows([window("cust-1")]))
    assert (
        isinstance(dead, Dead)
        and "'chargebee', where the customer is mapped or the delivery was recorded, is not declared" in dead.reason
    )
    assert ledger.rows[dead.identifier]["provider"] == "chargebee" and ledger.rows[dead.identifier]["status"] == "dead"
    assert all(p.sent == [] for p in providers.values())
    again = run(router.on_retry(dead.identifier))
    assert again == Skipped(dead.identifier, "dead")


def test_with_stripe_alone_nothing_is_looked_up():
    router, providers, _, routes, _ = _routed(names=("stripe",))
    [sent] = run(router.on_windows([window("cust-1")]))
    assert isinstance(sent, Sent) and routes.lookups == 0
    run(router.on_retry(sent.identifier))
    assert routes.lookups == 0


def _chargebee() -> tuple[ScriptedProvider, MemoryLedger, FakeTime, Deliverer]:
    cfg, t = _cfg(), FakeTime()
    ledger, provider = MemoryLedger(t), ScriptedProvider(name="chargebee", one_call_per_key=False)
    d = Deliverer(
        cfg,
        provider,
        ledger,
        clock=t.clock,
        sleep=t.sleep,
        rng=lambda: 1.0,
        limits=delivery_limits(cfg, "chargebee"),
        owed=partial(owed_correction, cfg, "chargebee"),
    )
    return provider, ledger, t, d


def test_a_lower_final_at_a_destination_without_negative_values_is_owed_and_a_higher_one_sent():
    provider, ledger, _, d = _chargebee()
    run(d.on_window(window(quantity="12", revision=1)))
    [_, owed] = run(d.on_window(window(quantity="10", revision=2)))
    assert isinstance(owed, Dead) and owed.reason.startswith("owed: chargebee takes no correction that lowers usage")
    assert ledger.rows[owed.identifier]["quantity"] == Decimal(-2), "the owed difference is recorded"
    [_, more] = run(d.on_window(window(quantity="15", revision=3)))
    assert isinstance(more, Sent) and provider.sent[-1].value == "5", "usage added late is one more event"


def test_a_window_older_than_the_destinations_window_is_reported_not_sent():
    provider, ledger, t, d = _chargebee()
    start = int((NOW - timedelta(hours=12, minutes=1)).timestamp() * 1000)
    [dead] = run(d.on_window(window(start_ms=start)))
    assert isinstance(dead, Dead) and "more than 12h ago" in dead.reason and provider.sent == []
    inside = int((NOW - timedelta(hours=11, minutes=59)).timestamp() * 1000)
    assert isinstance(run(d.on_window(window(start_ms=inside)))[0], Sent)


def test_each_destination_is_paced_and_checked_by_its_own_limits():
    cfg = _cfg()
    chargebee, metronome, stripe = (delivery_limits(cfg, n) for n in ("chargebee", "metronome", "stripe"))
    assert (chargebee.max_age, chargebee.max_ahead, chargebee.calls_per_second) == (
        timedelta(hours=12),
        timedelta(0),
        0.33,
    )
    assert (metronome.max_age, metronome.dedup_window) == (timedelta(days=34), timedelta(days=34))
    assert (stripe.max_age, stripe.calls_per_second) == (cfg.billing.max_window_age, cfg.billing.calls_per_second)
    assert cfg.billing.destination_names() == ("stripe", "chargebee", "metronome")


DEC = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("destination", "effective_from", "mapped", "latest", "refused"),
    [
        ("metronome", None, {}, None, None),
        ("stripe", None, {"stripe": None}, NOW, None),  # a new id at the same destination
        ("metronome", DEC, {"stripe": None}, DEC - timedelta(minutes=1), None),  # one before the boundary
        ("metronome", None, {"stripe": None}, None, "billed at stripe: moving them to metronome takes effect"),
        ("recurly", DEC, {}, None, "destination 'recurly' is not declared"),
        ("metronome", DEC + timedelta(days=1), {}, None, "at the start of a UTC month"),
        ("metronome", DEC + timedelta(minutes=1), {}, None, "at the start of a UTC month"),
        ("metronome", DEC.replace(tzinfo=None), {}, None, "give the time in UTC"),
        ("metronome", DEC, {"stripe": None}, DEC, "the ledger holds a window of this customer from 2026-12-01 00:00"),
        ("chargebee", DEC, {"metronome": DEC}, None, "mapping at metronome takes effect from 2026-12-01 too"),
        # A new id at the destination the customer is mapped at keeps its month, billed windows or not.
        ("metronome", None, {"stripe": None, "metronome": DEC}, DEC + timedelta(days=3), None),
        ("metronome", DEC, {"stripe": None, "metronome": DEC}, DEC + timedelta(days=3), None),
        ("stripe", None, {"stripe": None, "metronome": DEC}, DEC + timedelta(days=3), None),
    ],
)
def test_a_customer_moves_at_the_start_of_a_month_none_of_their_windows_was_billed_in(
    destination, effective_from, mapped, latest, refused
):
    reason = mapping_refusal(destination, effective_from, DECLARED, mapped, latest)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


def test_the_job_builds_a_deliverer_per_destination_with_its_sender_and_limits():
    from connectors.http_destination import HttpDestination
    from connectors.unconfigured import UnconfiguredDestination
    from jobs.deliverers import routed_deliverers

    cfg = _cfg()
    keys = {"metronome": SecretStr("m-key")}  # chargebee's is missing
    cfg = cfg.model_copy(update={"billing": cfg.billing.model_copy(update={"destination_api_keys": keys})})
    deliverers = routed_deliverers(cfg, "w1").router.deliverers
    assert list(deliverers) == ["stripe", "chargebee", "metronome"]
    assert isinstance(deliverers["metronome"].provider, HttpDestination)
    assert deliverers["chargebee"].max_age == timedelta(hours=12)
    assert deliverers["metronome"].dedup_window == timedelta(days=34)
    # No Stripe key, yet destinations declared; no key for chargebee: the job runs, and what goes
    # to either is refused with the reason, without stopping the others.
    assert isinstance(deliverers["stripe"].provider, UnconfiguredDestination)
    assert isinstance(deliverers["chargebee"].provider, UnconfiguredDestination)
    assert "METERFLOW_DESTINATION_CHARGEBEE_API_KEY" in deliverers["chargebee"].provider.reason
    assert all(d.delivers_together for d in deliverers.values()), "nothing forces the job to go row by row"


def test_without_a_stripe_key_what_goes_to_stripe_is_dead_with_the_reason_and_replayable():
    from connectors.stripe_provider import NO_KEY
    from connectors.unconfigured import UnconfiguredDestination

    cfg, t = _cfg(), FakeTime()
    ledger = MemoryLedger(t)
    d = Deliverer(cfg, UnconfiguredDestination("stripe", NO_KEY), ledger, clock=t.clock, sleep=t.sleep)
    [dead] = run(d.on_windows([window()]))
    assert isinstance(dead, Dead) and "there is no Stripe API key" in dead.reason
    assert ledger.rows[dead.identifier]["status"] == "dead"


def test_a_replay_goes_through_the_destination_that_recorded_the_delivery():
    router, providers, ledger, routes, t = _routed()
    providers["metronome"].script = [ProviderError("no such customer", status=400, retryable=False)]
    [dead] = run(router.on_windows([window("cust-2")]))
    assert isinstance(dead, Dead) and ledger.rows[dead.identifier]["provider"] == "metronome"
    routes.mapped = {}  # the mapping is gone; the delivery still belongs to Metronome
    assert isinstance(run(router.deliver(dead.identifier, replay=True)), Sent)
    assert [e.identifier for e in providers["metronome"].sent] == [dead.identifier, dead.identifier]
    assert providers["stripe"].sent == []


def test_with_stripe_alone_a_window_recorded_at_a_destination_no_longer_declared_stays_there():
    """The destination was removed from the config: its recorded windows are neither claimed at
    Stripe nor replayed there; they are dead with the reason until it is declared again."""
    router, providers, ledger, routes, t = _routed(names=("stripe",))
    full, _, _, full_routes, _ = _routed()
    full.deliverers["metronome"].ledger = ledger  # the same ledger, when metronome was declared
    full_routes.ledger = ledger
    providers_full = full.deliverers["metronome"].provider
    providers_full.script = [ProviderError("busy", status=503, retryable=True)]  # type: ignore[attr-defined]
    [retry] = run(full.on_windows([window("cust-2")]))
    assert isinstance(retry, Retry) and ledger.rows[retry.identifier]["provider"] == "metronome"
    routes.mapped = {}
    t.now += 3600
    [again] = run(router.on_windows([window("cust-2")]))
    assert (
        isinstance(again, Dead)
        and "'metronome', where the customer is mapped or the delivery was recorded, is not declared" in again.reason
    )
    assert providers["stripe"].sent == [] and ledger.rows[retry.identifier]["provider"] == "metronome"
    assert run(router.deliver(retry.identifier, replay=True)) == Skipped(retry.identifier, "dead")
    assert providers["stripe"].sent == [] and ledger.rows[retry.identifier]["status"] == "dead"
