"""The billing job's delivery operator: a batch of input rows, each delivered on its own, all at once."""

from __future__ import annotations

import asyncio

import pytest
from pyflink.common import Row

from billing.deliveries import ClosedWindow, Sent
from jobs.billing_operator import DeliverClosedWindows


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def inc(self, n: int = 1) -> None:
        self.count += n


class RecordingDeliverer:
    """Answers each window after a pause; fails the window of ``failing`` customer."""

    def __init__(self, failing: str | None = None) -> None:
        self.failing, self.running, self.most_running, self.done = failing, 0, 0, []

    async def on_window(self, window: ClosedWindow) -> list:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await asyncio.sleep(0.01)
        self.running -= 1
        if window.customer_id == self.failing:
            raise RuntimeError("ledger away")
        self.done.append(window.customer_id)
        return [Sent(f"id-{window.customer_id}", "resp", 1)]

    async def on_retry(self, identifier: str) -> Sent:
        self.done.append(identifier)
        return Sent(identifier, "resp", 2)


def operator(deliverer: RecordingDeliverer) -> DeliverClosedWindows:
    op = DeliverClosedWindows({})
    op.deliverer = deliverer  # type: ignore[assignment]
    op.counters = {name: Counter() for name in ("sent", "failed", "dead", "skipped", "deferred", "corrections")}
    return op


def row(customer: str, retry: str | None = None) -> Row:
    return Row(
        f"t\x1f{customer}\x1fapi_calls",
        "t",
        customer,
        "api_calls",
        "",
        1_700_000_000_000,
        1_700_000_060_000,
        "2",
        2,
        1,
        retry,
    )


def test_a_batch_delivers_every_row_at_once():
    deliverer = RecordingDeliverer()
    op = operator(deliverer)
    batch = Row([row("a"), row("b"), row("c", retry="mf-retry-1")])
    assert asyncio.run(op.async_invoke(batch)) == []
    assert sorted(deliverer.done) == ["a", "b", "mf-retry-1"]
    assert deliverer.most_running == 2, "the windows of a batch are in flight together"
    assert op.counters["sent"].count == 3


def test_a_failed_row_fails_the_batch_after_the_others_are_done():
    """As with one row per element, the job fails (and reads the rows again after its restore), but
    only once every other row of the batch has its outcome recorded."""
    deliverer = RecordingDeliverer(failing="b")
    op = operator(deliverer)
    with pytest.raises(RuntimeError, match="ledger away"):
        asyncio.run(op.async_invoke(Row([row("a"), row("b"), row("c")])))
    assert sorted(deliverer.done) == ["a", "c"]
    assert op.counters["sent"].count == 2
