"""Billing forwarder: a thin Flink adapter that hands each closed window to the billing core.

Keyed by (tenant, customer, meter), so one subtask owns every call for a customer's meter and
calls are made one at a time: at most one in flight per (customer, meter), as Stripe requires.
A retry does not block the subtask: it waits in keyed state for a processing-time timer, so other
customers keep flowing while one is backing off. Volume is one element per closed window.

Exactly-once towards the provider rests on three things: the identifier is derived from the
window (sinks/idempotency.py), the ledger skips windows it already has as sent, and a window
re-emitted after a failover whose earlier call got no answer is re-sent with the same identifier
and Idempotency-Key, which the provider deduplicates.
"""

from __future__ import annotations

import time
from typing import Any

from pyflink.common import Row, Types
from pyflink.datastream import KeyedProcessFunction
from pyflink.datastream.state import MapStateDescriptor
from pyflink.table import DataTypes

from meterflow.config import config_on_worker
from sinks.billing import ClosedWindow, Dead, Deliverer, Outcome, Retry, Sent
from sinks.ledger import PostgresLedger
from sinks.stripe_provider import StripeMeterEvents

BILLING_OUTCOME_COLUMNS = (
    ("identifier", Types.STRING(), DataTypes.STRING()),
    ("status", Types.STRING(), DataTypes.STRING()),
    ("attempts", Types.INT(), DataTypes.INT()),
    ("detail", Types.STRING(), DataTypes.STRING()),
)


def billing_outcome_type() -> Any:
    """DataStream row type of the forwarder's outcomes."""
    return Types.ROW_NAMED([c[0] for c in BILLING_OUTCOME_COLUMNS], [c[1] for c in BILLING_OUTCOME_COLUMNS])


def _outcome_row(outcome: Outcome) -> tuple[str, Row]:
    """The outcome's kind (its metric) and its row."""
    if isinstance(outcome, Sent):
        return "sent", Row(outcome.identifier, "sent", outcome.attempts, outcome.response_id)
    if isinstance(outcome, Retry):
        return "failed", Row(outcome.identifier, "failed", outcome.attempts, outcome.error)
    if isinstance(outcome, Dead):
        return "dead", Row(outcome.identifier, "dead", outcome.attempts, outcome.reason)
    return "skipped", Row(outcome.identifier, f"skipped ({outcome.status})", 0, None)


class BillingForwarder(KeyedProcessFunction):
    """Deliver closed windows to the provider; outcomes go to the ledger and downstream as rows."""

    def __init__(self, config_without_secrets: dict[str, Any]) -> None:
        # Secrets are resolved on the worker (env or secrets file), never shipped in the job graph.
        self.config_data = config_without_secrets
        self.deliverer: Deliverer | None = None
        self.ledger: PostgresLedger | None = None
        self.retries = None
        self.counters: dict[str, Any] = {}

    def open(self, runtime_context) -> None:  # noqa: ANN001 - Flink's RuntimeContext
        cfg = config_on_worker(self.config_data)
        self.ledger = PostgresLedger(cfg)
        share = runtime_context.get_number_of_parallel_subtasks()
        self.deliverer = Deliverer(cfg, StripeMeterEvents(cfg), self.ledger, clock=time.time, sleep=time.sleep, share=share)
        self.retries = runtime_context.get_map_state(MapStateDescriptor("billing-retries", Types.STRING(), Types.PICKLED_BYTE_ARRAY()))
        group = runtime_context.get_metrics_group().add_group("meterflow")
        self.counters = {name: group.counter(f"billing_{name}") for name in ("sent", "failed", "dead", "skipped")}

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()

    def process_element(self, row, ctx):  # noqa: ANN001, ANN201 - Flink callback signature
        window = ClosedWindow.from_fields(tuple(row[i] for i in range(9)))
        yield self._attempt(window, 1, ctx)

    def on_timer(self, timestamp, ctx):  # noqa: ANN001, ANN201 - Flink callback signature
        for identifier, (fields, attempt, due_ms) in list(self.retries.items()):
            if due_ms <= timestamp:
                self.retries.remove(identifier)
                yield self._attempt(ClosedWindow.from_fields(fields), attempt, ctx)

    def _attempt(self, window: ClosedWindow, attempt: int, ctx) -> Row:  # noqa: ANN001 - Flink's Context
        outcome = self.deliverer.attempt(window, attempt)
        if isinstance(outcome, Retry):
            due_ms = ctx.timer_service().current_processing_time() + max(1, int(outcome.delay * 1000))
            fields = (window.tenant_id, window.customer_id, window.meter, window.dimensions_key, window.window_start_ms, window.window_end_ms, str(window.quantity), window.event_count, window.revision)
            self.retries.put(outcome.identifier, (fields, attempt + 1, due_ms))
            ctx.timer_service().register_processing_time_timer(due_ms)
        kind, row = _outcome_row(outcome)
        self.counters[kind].inc()
        return row
