"""Billing's Flink adapters: the async function that delivers, and the retry scan that feeds it.

Thin over billing/delivery.py. The async operator is applied after a keyBy on (tenant, customer,
meter), so one subtask owns every delivery of a customer's meter, and on a provider that takes one
call at a time per key (Stripe v1) the deliverer's key lock keeps them to that. Its elements are
batches of those rows (dev.meterflow.operators.RowBatcher), each row delivered on its own; about
``billing.max_in_flight`` rows are on the event loop at once; a failed attempt never waits in the operator: it is scheduled in the ledger, and the retry
scan (in every subtask, about once a second) hands due deliveries back to the keyed stream.

A checkpoint barrier waits until every element in flight has its answer (the Python async
operation drains its queue when a bundle finishes), so an element is never both done for the
checkpoint and unanswered: after a crash, whatever was in flight is read again from Kafka, or
handed out again by the retry scan when its lease runs out, and re-sent with the same identifier.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from pyflink.common import Row, Types
from pyflink.datastream import AsyncFunction, FlatMapFunction

from billing.deliveries import ClosedWindow, Dead, Deferred, Outcome, Retry, Sent, Skipped
from billing.routing import Router
from jobs.billing_plan import BILLING_INPUT_COLUMNS, billing_key
from meterflow.config import config_on_worker
from meterflow.errors import ProviderError, SinkError
from meterflow.metrics_catalog import BILLING_OUTCOMES
from sinks.postgres_schema import check_identifier

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

# The delivery operator's counts, ``billing_<name>``: one per outcome kind, and sent corrections.
OUTCOME_COUNTERS = BILLING_OUTCOMES
# And rows whose delivery failed outside the delivery rules (each try).
DELIVERY_COUNTS = (*OUTCOME_COUNTERS, "delivery_errors")
# A row whose delivery failed outside the delivery rules is tried again after this, doubling up to the most.
ROW_RETRY_FIRST_S = 0.5
ROW_RETRY_MAX_S = 30.0


def input_type() -> Any:
    """Row type of a billing input row (closed window, or a retry naming its delivery)."""
    types = [Types.STRING()] * 5 + [
        Types.LONG(),
        Types.LONG(),
        Types.STRING(),
        Types.LONG(),
        Types.LONG(),
        Types.STRING(),
    ]
    return Types.ROW_NAMED(list(BILLING_INPUT_COLUMNS), types)


def batch_type() -> Any:
    """Row type of the delivery operator's elements: billing input rows, a batch at a time (dev.meterflow.operators.RowBatcher)."""
    return Types.ROW_NAMED(["rows"], [Types.OBJECT_ARRAY(input_type())])


def outcome_type() -> Any:
    """Output type of the delivery operator, which emits nothing: the ledger is the record of every
    outcome, and a row per delivery only cost an encode in Python and a decode in the JVM before
    being discarded (measured in docs/benchmarks.md)."""
    return Types.STRING()


def is_correction(identifier: str) -> bool:
    """Whether a delivery identifier names a correction, not a window's own event (billing/identifiers).

    A window's identifier ends with a hex digest; a correction's with ``-r<revision>`` (a changed
    final) or ``-l<16 hex>`` (late events), or is ``<prefix>-c-<digest>`` when that was too long.
    """
    return (
        re.search(r"-(r\d+|l[0-9a-f]{16})$", identifier) is not None
        or re.fullmatch(r"[^-]+-c-[0-9a-f]+", identifier) is not None
    )


def outcome_metrics(outcome: Outcome) -> tuple[str, ...]:
    """The counters an outcome increments: its kind, and ``corrections`` for a sent correction."""
    kind = outcome_kind(outcome)
    return (kind, "corrections") if kind == "sent" and is_correction(outcome.identifier) else (kind,)


def backlog_sql(ledger_table: str) -> str:
    """The ledger's backlog at every destination: deliveries pending, and failed (waiting for a retry)."""
    d = check_identifier(ledger_table)
    return f"SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'failed') FROM {d} WHERE provider = ANY(%(destinations)s::text[]) AND status IN ('pending', 'failed')"


def outcome_kind(outcome: Outcome) -> str:
    """The outcome's kind, which is also its metric's name."""
    if isinstance(outcome, Sent):
        return "sent"
    if isinstance(outcome, Retry):
        return "failed"
    if isinstance(outcome, Dead):
        return "dead"
    if isinstance(outcome, Deferred):
        return "deferred"
    assert isinstance(outcome, Skipped)  # noqa: S101 - the Outcome union is closed
    return "skipped"


class DeliverClosedWindows(AsyncFunction):
    """Deliver each closed window (and each retry handed out by the scan) to the billing provider."""

    def __init__(self, config_without_secrets: dict[str, Any]) -> None:
        # Secrets are resolved on the worker (env or secrets file), never shipped in the job graph.
        self.config_data = config_without_secrets
        self.router: Router | None = None
        self.slots: asyncio.Semaphore | None = None
        self.slot_count = 0
        self.counts: dict[str, int] = {}
        self.destination_counts: dict[str, dict[str, int]] = {}
        self.slot_turn: asyncio.Lock | None = None

    def open(self, runtime_context) -> None:  # noqa: ANN001 - Flink's RuntimeContext
        self.cfg = config_on_worker(self.config_data)
        self.share = runtime_context.get_number_of_parallel_subtasks()
        # Names this run's claims in the ledger: a restarted worker takes over its predecessor's at once.
        self.prefix = f"billing-{runtime_context.get_index_of_this_subtask()}-"
        self.worker = f"{self.prefix}{uuid.uuid4().hex[:12]}"
        self._release_predecessors()
        group = runtime_context.get_metrics_group().add_group("meterflow")
        # Counts kept here and reported as gauges, ``billing_<name>``: PyFlink records a counter's
        # increments only on the thread processing the bundle, and an async function's run on its
        # event loop's thread, so they never reached Flink. A gauge is read each time a bundle ends
        # (so it stands still while a bundle waits for rows in flight); it starts at 0 with the worker.
        self.counts = dict.fromkeys(DELIVERY_COUNTS, 0)
        for name in self.counts:
            group.gauge(f"billing_{name}", functools.partial(self.counts.__getitem__, name))
        # The same outcomes per destination: ``..._meterflow_destination_billing_<name>{destination="..."}``.
        self.destination_counts = {d: dict.fromkeys(OUTCOME_COUNTERS, 0) for d in self.cfg.billing.destination_names()}
        for destination, counts in self.destination_counts.items():
            at = group.add_group("destination", destination)
            for name in counts:
                at.gauge(f"billing_{name}", functools.partial(counts.__getitem__, name))
        # The SDK logs every request and response at INFO; in a Python worker each line crosses to the
        # TaskManager's log (two lines per delivery, about a tenth of the worker's CPU). The ledger
        # records every attempt; the SDK's warnings and errors still reach the log.
        logging.getLogger("stripe").setLevel(logging.WARNING)

    def _release_predecessors(self) -> None:
        """Before this run's first attempt: what the subtask's earlier run held leased (attempts in
        flight, deliveries waiting for their key's turn when it died) is due at once, not when the
        lease runs out."""
        import psycopg

        from sinks.ledger_async import release_leases
        from sinks.postgres import connect

        try:
            with connect(self.cfg.postgres) as conn:
                conn.autocommit = True
                released = release_leases(conn, self.cfg, self.prefix, self.worker)
        except (psycopg.Error, OSError, SinkError) as e:
            # Postgres away: those leases run out by themselves (billing.retry_lease past their turn).
            log.warning("releasing the leases of %s*: %s", self.prefix, e)
            return
        if released:
            log.info("released %d deliveries leased by an earlier run of %s*", len(released), self.prefix)

    def _ready(self) -> Router:
        # Built on the event loop's thread at first use: the HTTP sessions and the Postgres connections belong to that loop.
        if self.router is None:
            from jobs.deliverers import routed_deliverers

            self.router = routed_deliverers(self.cfg, self.worker, share=self.share).router
            self.router.on_outcome = self._count
            # Rows the deliverers work on at once; the operator holds more in batches (billing_job.py).
            self.slot_count = self.cfg.billing_max_in_flight
            self.slots = asyncio.Semaphore(self.slot_count)
            self.slot_turn = asyncio.Lock()
        return self.router

    async def async_invoke(self, value: Row) -> list[str]:
        """A batch of billing input rows: its closed windows delivered together where the deliverer
        can (Deliverer.on_windows), each retry on its own, and every row on its own where it can't;
        every row takes one of the subtask's ``billing.max_in_flight`` delivery slots (see RowBatcher
        and delivery_batch_capacity)."""
        router = self._ready()
        if not router.delivers_together:
            # One customer's row waiting for its key's turn (Stripe v1) holds its own slot, not a batch's.
            await asyncio.gather(*(self._deliver(router, [row]) for row in value[0]))
            return []
        windows = [row for row in value[0] if row[10] is None]
        retries = [row for row in value[0] if row[10] is not None]
        await asyncio.gather(
            self._deliver(router, windows, together=True), *(self._deliver(router, [row]) for row in retries)
        )
        return []  # see outcome_type: the ledger holds the outcomes

    async def _deliver(self, router: Router, rows: list[Row], *, together: bool = False) -> None:
        """Rows, until their outcomes are recorded. A failure outside the delivery rules (the ledger
        away, a bug) is retried here, so the rows stay in flight and the checkpoint waits for them: a
        row that fails is never behind a completed checkpoint without its outcome in the ledger (a row
        recorded before the failure is skipped the next time). A checkpoint that times out meanwhile
        restarts the job from the one before, which reads them again.
        """
        assert self.slots is not None and self.slot_turn is not None  # noqa: S101 - made by _ready
        if not rows:
            return
        # A batch's rows (a sixteenth of max_in_flight) take their slots one batch at a time: slots
        # freed one by one would otherwise go one to each waiting batch, and batches each holding a
        # few while waiting for more would wait forever. A single row takes its slot directly, so
        # rows freed together start together (and share the ledger's next statements).
        wanted, taken = min(len(rows), self.slot_count), 0
        try:
            async with self.slot_turn if wanted > 1 else contextlib.nullcontext():
                for _ in range(wanted):
                    await self.slots.acquire()
                    taken += 1
            failures = 0
            while True:
                try:
                    # The router reports each outcome to _count as it comes.
                    if together:
                        await router.on_windows([_window_of(row) for row in rows])
                    elif rows[0][10] is not None:
                        await router.on_retry(rows[0][10])
                    else:
                        await router.on_windows([_window_of(rows[0])])
                    break
                except Exception:
                    failures += 1
                    self.counts["delivery_errors"] += 1
                    delay = min(ROW_RETRY_MAX_S, ROW_RETRY_FIRST_S * 2 ** (failures - 1))
                    log.exception(
                        "delivering %d rows (%s first) failed (%d times); again in %.1f s",
                        len(rows),
                        rows[0][10] or rows[0][0],
                        failures,
                        delay,
                    )
                    await asyncio.sleep(delay)
        finally:
            for _ in range(taken):
                self.slots.release()

    def _count(self, destination: str, outcome: Outcome) -> None:
        """An outcome, counted for the job and for its destination (the router reports each once)."""
        at = self.destination_counts.get(destination)
        for name in outcome_metrics(outcome):
            self.counts[name] += 1
            if at is not None:
                at[name] += 1


def _window_of(row: Row) -> ClosedWindow:
    return ClosedWindow.from_fields(tuple(row[i] for i in range(1, 10)))


class RetryScan(FlatMapFunction):
    """Once a tick: the deliveries whose retry is due, leased in the ledger, as billing input rows.

    Each tick also counts the ledger's backlog (gauges ``billing_ledger_pending`` and
    ``billing_ledger_failed``; they keep the last count while Postgres is away). With the v2
    stream, the first subtask reads Stripe's error reports every ``ERROR_REPORT_POLL_S`` and marks
    the deliveries of each reported request dead with the report (counter
    ``billing_stream_errors_reported``; connectors/stripe_stream.py).
    """

    BATCH = 500  # per tick; a backlog drains at this rate at most, in next_attempt_at order
    ERROR_REPORT_POLL_S = 30.0
    REPORT_SETTLE_S = 600.0  # a report older than this that marks nothing is not read again

    def __init__(self, config_without_secrets: dict[str, Any]) -> None:
        self.config_data = config_without_secrets
        self.conn: psycopg.Connection | None = None

    def open(self, runtime_context) -> None:  # noqa: ANN001 - Flink's RuntimeContext
        self.cfg = config_on_worker(self.config_data)
        self.prefix = f"retry-scan-{runtime_context.get_index_of_this_subtask()}-"
        self.scanner = f"{self.prefix}{uuid.uuid4().hex[:12]}"
        self.released = False
        group = runtime_context.get_metrics_group().add_group("meterflow")
        self.handed_out = group.counter("billing_retries_handed_out")
        self.backlog = (0, 0)
        self.reads_error_reports = (
            self.cfg.stripe.meter_events_api == "v2_stream" and runtime_context.get_index_of_this_subtask() == 0
        )
        self.reports_applied: set[tuple[str, str]] = set()
        self.meter_ids: dict[str, str] = {}  # listed at the first poll, kept for the next ones
        self.next_report_poll = 0.0
        self.reported = group.counter("billing_stream_errors_reported")
        group.gauge("billing_ledger_pending", lambda: self.backlog[0])
        group.gauge("billing_ledger_failed", lambda: self.backlog[1])

    def flat_map(self, value: Row):  # noqa: ANN201 - a generator of Rows
        import psycopg

        from sinks.ledger_async import due_retries, release_leases
        from sinks.postgres import connect

        try:
            conn = self.conn
            if conn is None or conn.closed or conn.broken:
                conn = self.conn = connect(self.cfg.postgres)
                conn.autocommit = True
            if not self.released:
                # What this subtask's earlier run handed out and the job lost with it: due at once.
                release_leases(conn, self.cfg, self.prefix, self.scanner)
                self.released = True
            backlog = conn.execute(
                backlog_sql(self.cfg.billing.ledger_table), {"destinations": list(self.cfg.billing.destination_names())}
            ).fetchone()
            if backlog is not None:  # an aggregate: always one row
                self.backlog = (int(backlog[0]), int(backlog[1]))
            if self.reads_error_reports and time.time() >= self.next_report_poll:
                self.next_report_poll = time.time() + self.ERROR_REPORT_POLL_S
                self._apply_error_reports(conn)
            # Leased last: once leased, nothing may fail before they are handed out (they would wait out the lease).
            due = due_retries(conn, self.cfg, self.BATCH, self.scanner)
        except (psycopg.Error, OSError, SinkError) as e:
            # Postgres away (SinkError: no connection): the deliveries wait in the ledger; the next tick tries again.
            log.warning("retry scan: %s", e)
            return
        for identifier, tenant, customer, meter, dims, start_ms, end_ms in due:
            self.handed_out.inc()
            yield Row(
                billing_key(tenant, customer, meter),
                tenant,
                customer,
                meter,
                dims,
                int(start_ms),
                int(end_ms),
                "0",
                0,
                0,
                identifier,
            )

    def _apply_error_reports(self, conn: psycopg.Connection) -> None:
        """Stripe's error reports into the ledger: each reported request's sent deliveries, dead with the report."""
        from connectors.stripe_stream import StripeMeterEventStream
        from sinks.ledger_async import mark_reported

        async def read() -> list:
            provider = StripeMeterEventStream(self.cfg, meter_ids=self.meter_ids)
            try:
                return await provider.error_reports([m.name for m in self.cfg.meters])
            finally:
                await provider.close()

        try:
            reports = asyncio.run(read())
        except ProviderError as e:
            # Stripe away: the reports stay there; the next poll reads them.
            log.warning("reading Stripe's error reports: %s", e)
            return
        for report in reports:
            if (report.report_id, report.request_id) in self.reports_applied:
                continue
            marked = mark_reported(conn, self.cfg, report.request_id, report.reason)
            if marked:
                log.error(
                    "%s: %d deliveries marked dead (replay them once the cause is fixed)", report.reason, len(marked)
                )
                self.reported.inc(len(marked))
            # A report read before its deliveries were recorded as sent is read again at the next poll.
            if marked or report.age_s(time.time()) > self.REPORT_SETTLE_S:
                self.reports_applied.add((report.report_id, report.request_id))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
