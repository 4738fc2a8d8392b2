"""The deliverers of the billing job and the replay command: one per destination, behind a router.

Stripe's sender from ``stripe.*`` (connectors/stripe_stream.py), a declared destination's from its
declaration (connectors/http_destination.py), each with its own ledger view and the destination's
limits and correction rule (billing/routing.py). Build inside the event loop that uses them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from billing.delivery import Deliverer
from billing.ports import Provider
from billing.routing import Router, delivery_limits, owed_correction
from connectors.http_destination import HttpDestination
from connectors.stripe_provider import StripeWithoutKey
from connectors.stripe_stream import meter_events_provider
from meterflow.config import JobConfig
from meterflow.destinations import STRIPE
from sinks.ledger_async import AsyncPostgresLedger


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
        provider: Provider
        if name == STRIPE:
            # Without a Stripe key, a config billing only through declared destinations still runs.
            no_key = cfg.stripe.api_key is None and bool(cfg.billing.destinations)
            provider = StripeWithoutKey() if no_key else meter_events_provider(cfg)
        else:
            provider = HttpDestination(
                cfg.billing.destinations[name],
                cfg.billing.destination_api_key(name),
                timeout_s=cfg.billing.request_timeout.total_seconds(),
            )
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
