"""The billing job's delivery operator: a batch of input rows in the subtask's delivery slots, its
windows delivered together where the deliverer can (else each row on its own), and rows whose
delivery fails outside the rules tried again until they go through."""

from __future__ import annotations

import asyncio

from pyflink.common import Row

from billing.deliveries import ClosedWindow, Sent
from jobs.billing_operator import DeliverClosedWindows


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def inc(self, n: int = 1) -> None:
        self.count += n


class RecordingDeliverer:
    """Stands in for the router (billing/routing.py): answers each window after a pause; the window of customer ``failing`` fails ``failures`` times first."""

    delivers_together = False

    def __init__(self, failing: str | None = None, failures: int = 0) -> None:
        self.failing, self.failures, self.running, self.most_running, self.done = failing, failures, 0, 0, []
        self.batches: list[list[str]] = []

    def on_outcome(self, destination: str, outcome: object) -> None:
        """Set to the operator's count, as the router's is."""

    async def on_window(self, window: ClosedWindow) -> list:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await asyncio.sleep(0.01)
        self.running -= 1
        if window.customer_id == self.failing and self.failures:
            self.failures -= 1
            raise RuntimeError("ledger away")
        self.done.append(window.customer_id)
        outcome = Sent(f"id-{window.customer_id}", "resp", 1)
        self.on_outcome("stripe", outcome)
        return [outcome]

    async def on_windows(self, windows: list[ClosedWindow]) -> list:
        return [o for w in windows for o in await self.on_window(w)]

    async def on_retry(self, identifier: str) -> Sent:
        self.done.append(identifier)
        outcome = Sent(identifier, "resp", 2)
        self.on_outcome("stripe", outcome)
        return outcome


class TogetherDeliverer(RecordingDeliverer):
    """Takes a batch's windows in one call (as Deliverer.on_windows on the v2 stream)."""

    delivers_together = True

    free_slots: list[int] | None = None
    slots: asyncio.Semaphore | None = None

    async def on_windows(self, windows: list[ClosedWindow]) -> list:
        self.batches.append([w.customer_id for w in windows])
        if self.slots is not None:
            self.free_slots = [*(self.free_slots or []), self.slots._value]
        return [o for w in windows for o in await self.on_window(w)]


def operator(deliverer: RecordingDeliverer, slots: int = 64) -> DeliverClosedWindows:
    op = DeliverClosedWindows({})
    op.router = deliverer  # type: ignore[assignment]
    deliverer.on_outcome = op._count  # type: ignore[method-assign]
    op.destination_counts = {
        "stripe": dict.fromkeys(("sent", "failed", "dead", "skipped", "deferred", "corrections"), 0)
    }
    op.slot_count = slots
    op.slots = asyncio.Semaphore(slots)
    op.slot_turn = asyncio.Lock()
    op.counts = dict.fromkeys(("sent", "failed", "dead", "skipped", "deferred", "corrections", "delivery_errors"), 0)
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
    assert op.counts["sent"] == 3


def test_rows_take_the_subtasks_delivery_slots_whatever_their_batch():
    """billing.max_in_flight bounds the rows delivered at once, not the batches: what one customer
    holds is its rows, never a whole batch of slots."""
    deliverer = RecordingDeliverer()
    op = operator(deliverer, slots=2)

    async def two_batches() -> None:
        await asyncio.gather(
            op.async_invoke(Row([row("a"), row("b"), row("c")])), op.async_invoke(Row([row("d"), row("e")]))
        )

    asyncio.run(two_batches())
    assert sorted(deliverer.done) == ["a", "b", "c", "d", "e"]
    assert deliverer.most_running == 2


def test_a_row_that_fails_outside_the_rules_is_tried_again_and_its_batch_waits(monkeypatch):
    """Its batch (and so the checkpoint) waits until the row's outcome is recorded: a failed row is
    never behind a completed checkpoint with nothing in the ledger."""
    monkeypatch.setattr("jobs.billing_operator.ROW_RETRY_FIRST_S", 0.001)
    deliverer = RecordingDeliverer(failing="b", failures=2)
    op = operator(deliverer)
    assert asyncio.run(op.async_invoke(Row([row("a"), row("b"), row("c")]))) == []
    assert sorted(deliverer.done) == ["a", "b", "c"]
    assert op.counts["delivery_errors"] == 2
    assert op.counts["sent"] == 3


def test_where_the_deliverer_can_a_batchs_windows_go_together_and_its_retries_on_their_own():
    deliverer = TogetherDeliverer()
    op = operator(deliverer, slots=8)
    deliverer.slots = op.slots
    asyncio.run(op.async_invoke(Row([row("a"), row("b", retry="mf-retry-1"), row("c")])))
    assert deliverer.batches == [["a", "c"]]
    assert deliverer.free_slots in ([6], [5]), "the windows hold a slot each (the retry may hold its own)"
    assert sorted(deliverer.done) == ["a", "c", "mf-retry-1"] and op.counts["sent"] == 3


def test_windows_together_take_a_slot_each_and_no_more_than_there_are():
    deliverer = TogetherDeliverer()
    op = operator(deliverer, slots=2)

    async def batches() -> None:
        await asyncio.gather(
            op.async_invoke(Row([row("a"), row("b"), row("c")])), op.async_invoke(Row([row("d"), row("e")]))
        )
        assert op.slots._value == 2, "every slot given back"

    asyncio.run(batches())
    assert deliverer.batches == [["a", "b", "c"], ["d", "e"]], "a batch larger than the slots still goes"
    assert sorted(deliverer.done) == ["a", "b", "c", "d", "e"]


def test_windows_together_that_fail_outside_the_rules_are_tried_again_together(monkeypatch):
    monkeypatch.setattr("jobs.billing_operator.ROW_RETRY_FIRST_S", 0.001)
    deliverer = TogetherDeliverer(failing="b", failures=1)
    op = operator(deliverer)
    asyncio.run(op.async_invoke(Row([row("a"), row("b")])))
    assert deliverer.batches == [["a", "b"], ["a", "b"]] and op.counts["delivery_errors"] == 1
    assert deliverer.done == ["a", "a", "b"], "the batch again: what was recorded before is the ledger's to skip"


def test_the_retry_scan_rides_through_postgres_being_away(monkeypatch):
    """No connection (SinkError) or a broken one (psycopg's error): the tick yields nothing and the
    next one tries again; the job does not fail over it."""
    import psycopg

    from jobs.billing_operator import RetryScan
    from meterflow.config import JobConfig
    from meterflow.errors import SinkError

    scan = RetryScan({})
    scan.cfg = JobConfig.model_validate({"billing": {"enabled": True}})
    scan.prefix, scan.scanner, scan.released, scan.reads_error_reports = "retry-scan-0-", "retry-scan-0-x", False, False
    scan.handed_out, scan.backlog = Counter(), (3, 4)
    tries = []

    def away(pg):
        tries.append(pg)
        raise (SinkError("cannot connect to Postgres") if len(tries) == 1 else psycopg.OperationalError("gone"))

    monkeypatch.setattr("sinks.postgres.connect", away)
    assert list(scan.flat_map(Row(0))) == [] and list(scan.flat_map(Row(1))) == []
    assert len(tries) == 2 and scan.backlog == (3, 4), "the gauges keep the last count"


def test_many_batches_waiting_for_slots_all_go_through():
    """A batch takes its slots one after another while the others wait for their turn to take
    theirs: slots freed one by one never end up spread over waiting batches that each hold a few
    and wait for more."""
    deliverer = TogetherDeliverer()
    op = operator(deliverer, slots=4)

    async def many() -> None:
        await asyncio.wait_for(
            asyncio.gather(*(op.async_invoke(Row([row(f"{b}-{i}") for i in range(3)])) for b in range(10))), timeout=5
        )

    asyncio.run(many())
    assert len(deliverer.done) == 30 and op.slots._value == 4
