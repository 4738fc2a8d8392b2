"""Routing (pure apart from what is injected): which destination bills a window, and moving a customer.

Each (tenant, customer) is billed to one destination at a time. Its mappings in ``billing
customers`` each name a destination, the customer's id there, and the UTC month the mapping takes
effect from (none: from the start). A window goes to the mapping in effect at the window's start;
a window the ledger has recorded stays with the destination that recorded it, so its retries and
corrections follow it whatever the mappings say later (sinks/routing_schema.py holds the SQL).

A customer moves at the start of a month no window of theirs was recorded at or after: each month
of a customer's usage is billed whole by one destination, and no window is billed by two.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Protocol

from billing.attempts import gather_all
from billing.deliveries import ClosedWindow, Delivery, DeliveryLimits, Outcome
from billing.delivery import Deliverer
from billing.destination_rules import plan_correction
from meterflow.config import JobConfig
from meterflow.destinations import STRIPE


def delivery_limits(cfg: JobConfig, destination: str) -> DeliveryLimits:
    """Stripe's from ``billing.*``; a declared destination's from its ``limits``."""
    billing = cfg.billing
    if destination == STRIPE:
        return DeliveryLimits(
            billing.max_window_age, billing.max_window_ahead, billing.provider_dedup_window, billing.calls_per_second
        )
    limits = billing.destinations[destination].limits
    return DeliveryLimits(limits.max_age, limits.max_ahead, limits.dedup_horizon, limits.requests_per_second)


def owed_correction(cfg: JobConfig, destination: str, delivery: Delivery, now: datetime) -> str | None:
    """Why a correction is owed rather than sent at a declared destination (billing/destination_rules.py
    plan_correction), or None. Stripe's corrections follow its own rules (billing/deliveries.py)."""
    if destination == STRIPE or delivery.kind != "correction":
        return None
    plan = plan_correction(cfg.billing.destinations[destination], delivery.window.window_start, delivery.quantity, now)
    return None if plan.action == "send" else f"owed: {plan.reason}"


def is_month_start(at: datetime) -> bool:
    return at == datetime(at.year, at.month, 1, tzinfo=at.tzinfo)


def mapping_refusal(
    destination: str,
    effective_from: datetime | None,
    declared: Collection[str],
    mapped: Mapping[str, datetime | None],
    latest_recorded: datetime | None,
) -> str | None:
    """Why a customer may not be mapped at ``destination`` from ``effective_from`` (None: from the
    start), or None. ``mapped``: the customer's mappings now, destination to the month each takes
    effect from (UTC); ``latest_recorded`` (UTC): the start of the customer's latest window in the ledger, at any
    destination."""
    if destination not in declared:
        return f"destination {destination!r} is not declared; declared: {', '.join(declared)}"
    if destination in mapped and effective_from in (None, mapped[destination]):
        return None  # a new id at the destination the customer is mapped at: its month stays
    others = {name: at for name, at in mapped.items() if name != destination}
    if effective_from is None:
        if others:
            return (
                f"the customer is billed at {', '.join(sorted(others))}: moving them to {destination} takes effect"
                " at the start of a month (--from)"
            )
        return None
    if effective_from.tzinfo is None or effective_from.utcoffset() != timedelta(0):
        return f"{effective_from.isoformat()}: give the time in UTC"
    if not is_month_start(effective_from):
        return f"{effective_from:%Y-%m-%d %H:%M}: a move takes effect at the start of a UTC month (a billing period), such as {_next_month(effective_from):%Y-%m-01}"
    if latest_recorded is not None and latest_recorded >= effective_from:
        return (
            f"the ledger holds a window of this customer from {latest_recorded:%Y-%m-%d %H:%M} UTC, at or after"
            f" {effective_from:%Y-%m-%d}: a move takes effect from a month none of their windows was billed in yet"
        )
    clash = sorted(name for name, at in others.items() if at is not None and at == effective_from)
    if clash:
        return f"the customer's mapping at {', '.join(clash)} takes effect from {effective_from:%Y-%m-%d} too"
    return None


def _next_month(at: datetime) -> datetime:
    return datetime(at.year + at.month // 12, at.month % 12 + 1, 1, tzinfo=UTC)


class Routes(Protocol):
    """The ledger's routing reads (Postgres: sinks/ledger_async.py)."""

    async def destinations_of(self, windows: Sequence[ClosedWindow]) -> list[str]:
        """Each window's destination: the one that recorded it, else its customer's mapping at its start, else Stripe."""

    async def destinations_of_deliveries(self, identifiers: Sequence[str]) -> dict[str, str]:
        """The destination that recorded each delivery (an unknown identifier is absent)."""

    async def recorded_elsewhere(self) -> bool:
        """Whether the ledger holds deliveries at a destination the config does not declare."""


class Router:
    """Closed windows and retries, each to the deliverer of its destination."""

    def __init__(self, deliverers: Mapping[str, Deliverer], routes: Routes) -> None:
        self.deliverers, self.routes = deliverers, routes
        self._look_up: bool | None = None
        # Every outcome with its destination, those of parked deliveries' attempts too (the billing job's counts).
        self.on_outcome: Callable[[str, Outcome], None] = lambda destination, outcome: None
        for name, deliverer in deliverers.items():
            deliverer.on_background_outcome = partial(self._report, name)

    def _report(self, destination: str, outcome: Outcome) -> None:
        self.on_outcome(destination, outcome)

    def _reported(self, destination: str, outcomes: list[Outcome]) -> list[Outcome]:
        for outcome in outcomes:
            self.on_outcome(destination, outcome)
        return outcomes

    @property
    def delivers_together(self) -> bool:
        return all(d.delivers_together for d in self.deliverers.values())

    async def on_windows(self, windows: Sequence[ClosedWindow]) -> list[Outcome]:
        """Each window through its destination's deliverer, the windows of one destination together."""
        if not windows:
            return []
        names = await self.routes.destinations_of(windows) if await self._looks_up() else [STRIPE] * len(windows)
        groups: dict[str, list[ClosedWindow]] = {}
        for window, name in zip(windows, names, strict=True):
            groups.setdefault(name, []).append(window)
        work = [self._deliver(name, group) for name, group in groups.items()]
        return [o for outcomes in await gather_all(work) for o in outcomes]

    async def _deliver(self, name: str, windows: list[ClosedWindow]) -> list[Outcome]:
        deliverer = self.deliverers.get(name)
        if deliverer is None:
            # A mapping to a destination the config does not declare: recorded there and dead with
            # the reason, so a replay sends them once the destination is declared again.
            refused = await self.deliverers[STRIPE].refuse_windows(windows, name, _undeclared(name, self.deliverers))
            return self._reported(name, refused)
        return self._reported(name, await deliverer.on_windows(windows))

    async def _looks_up(self) -> bool:
        """Whether windows need their destination looked up: not with Stripe alone and a ledger that
        holds nothing elsewhere (asked once; the CLI maps customers only at declared destinations)."""
        if self._look_up is None:
            self._look_up = len(self.deliverers) > 1 or await self.routes.recorded_elsewhere()
        return self._look_up

    async def _recorded_at(self, identifier: str, *, look_up: bool = False) -> tuple[str, Deliverer | None]:
        if not look_up and not await self._looks_up():
            return STRIPE, self.deliverers[STRIPE]
        name = (await self.routes.destinations_of_deliveries([identifier])).get(identifier, STRIPE)
        return name, self.deliverers.get(name)

    async def on_retry(self, identifier: str, *, replay: bool = False) -> Outcome:
        """A recorded delivery handed out again, through the deliverer of the destination that recorded it."""
        name, deliverer = await self._recorded_at(identifier)
        if deliverer is None:
            outcome = await self.deliverers[STRIPE].refuse_recorded(identifier, _undeclared(name, self.deliverers))
        else:
            outcome = await deliverer.on_retry(identifier, replay=replay)
        self.on_outcome(name, outcome)
        return outcome

    async def deliver(self, identifier: str, *, replay: bool = False) -> Outcome:
        """:meth:`Deliverer.deliver` through the delivery's destination (the replay command, which may
        choose a delivery of any destination: always looked up)."""
        name, deliverer = await self._recorded_at(identifier, look_up=True)
        if deliverer is None:
            return await self.deliverers[STRIPE].refuse_recorded(identifier, _undeclared(name, self.deliverers))
        return await deliverer.deliver(identifier, replay=replay)

    async def drain(self) -> None:
        for deliverer in self.deliverers.values():
            await deliverer.drain()


def _undeclared(name: str, deliverers: Mapping[str, Deliverer]) -> str:
    return (
        f"destination {name!r}, where the customer is mapped or the delivery was recorded, is not declared in"
        f" billing.destinations (declared: {', '.join(deliverers)}); declare it, then replay"
    )
