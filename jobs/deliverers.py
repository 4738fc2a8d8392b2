"""The deliverers of the billing job and the replay command: one per destination, behind a router.

Stripe's sender from ``stripe.*`` (connectors/stripe_stream.py), a declared destination's from its
declaration (connectors/http_destination.py), each with its own ledger view and the destination's
limits and correction rule (billing/routing.py). Build inside the event loop that uses them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from billing.delivery import Deliverer
from billing.ports import Provider
from billing.routing import Router, delivery_limits, owed_correction
from connectors.http_destination import HttpDestination
from connectors.stripe_provider import NO_KEY
from connectors.stripe_stream import meter_events_provider
from connectors.unconfigured import UnconfiguredDestination
from meterflow.config import JobConfig
from meterflow.destinations import STRIPE
from meterflow.errors import ConfigError
from sinks.ledger_async import AsyncPostgresLedger

log = logging.getLogger(__name__)


def _sender(cfg: JobConfig, name: str) -> Provider:
    """The destination's sender; one that cannot be configured (its key missing) refuses what is
    routed to it with the reason, so the other destinations go on."""
    if name == STRIPE:
        if cfg.stripe.api_key is None and cfg.billing.destinations:
            return UnconfiguredDestination(STRIPE, NO_KEY)
        return meter_events_provider(cfg)
    try:
        key = cfg.billing.destination_api_key(name)
    except ConfigError as e:
        log.error("%s; its deliveries are refused with that reason until it is set (then replay them)", e)
        return UnconfiguredDestination(name, str(e))
    return HttpDestination(cfg.billing.destinations[name], key, timeout_s=cfg.billing.request_timeout.total_seconds())


@dataclass
class RoutedDeliverers:
    """The router, and what to close when done."""

    router: Router
    closeables: list[Any] = field(default_factory=list)

    async def close(self) -> None:
        for closeable in self.closeables:
            await closeable.close()


def routed_deliverers(
    cfg: JobConfig,
    worker: str,
    *,
    share: int = 1,
    connections: int = 2,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> RoutedDeliverers:
    """A deliverer per destination (Stripe, then each of ``billing.destinations``) and the router between them."""
    deliverers: dict[str, Deliverer] = {}
    closeables: list[Any] = []
    routes: AsyncPostgresLedger | None = None
    for name in cfg.billing.destination_names():
        ledger = AsyncPostgresLedger(cfg, worker, connections=connections, provider=name)
        routes = routes or ledger
        provider = _sender(cfg, name)
        closeables += [provider, ledger]
        deliverers[name] = Deliverer(
            cfg,
            provider,
            ledger,
            clock=clock,
            sleep=sleep,
            share=share,
            limits=delivery_limits(cfg, name),
            owed=partial(owed_correction, cfg, name),
        )
    assert routes is not None  # noqa: S101 - Stripe is always a destination
    return RoutedDeliverers(Router(deliverers, routes), closeables)
