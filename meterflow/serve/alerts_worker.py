"""Threshold alerts in ``meterflow serve``: each pass evaluates the rules over the usage committed since
the last pass (the rollup's changed rows), records each crossing once, and delivers the due
webhooks, signed as Standard Webhooks specifies (``standardwebhooks``), with retries and backoff.

The rules are meterflow/alerts.py's; the ledger is sinks/alerts_store.py's. A crossing is recorded
in Postgres before any webhook is sent, keyed by rule, customer and period, so a usage job that
restored and committed its windows again, a service restarted, or two services running, record it
once. A webhook is marked sent on a 2xx answer; one sent whose answer was lost is sent again with
the same ``webhook-id``, which receivers deduplicate on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx
import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from standardwebhooks.webhooks import Webhook

from meterflow.alerts import AlertRule, Crossing, crossed, crossing_id, is_delivered, retry_delay, spans
from meterflow.billing_cycle import BillingCycle
from meterflow.config import JobConfig
from sinks import alerts_store as store
from sinks.postgres import table_exists
from sinks.usage_rollup_schema import cycle_sql

log = logging.getLogger("meterflow.alerts")
# Crossings claimed at once, and sent side by side by as many threads; a pass claims more until
# none is due or it has run this many seconds (then evaluation runs again).
CLAIMED_AT_ONCE = 10
SENDERS = 10
MAX_DELIVERY_PASS = 10.0


class Sender(Protocol):
    def __call__(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
        """POST the body; the HTTP status (an exception when no answer came)."""


def post_webhook(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    return httpx.post(url, content=body, headers=headers, timeout=timeout_s).status_code


def _utc_now() -> datetime:
    return datetime.now(UTC)


class AlertWorker:
    """Evaluates and delivers on connections from ``connection`` (autocommit), one pass at a time."""

    def __init__(
        self,
        cfg: JobConfig,
        connection: Callable[[], AbstractContextManager[psycopg.Connection[Any]]],
        registry: CollectorRegistry,
        sender: Sender = post_webhook,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.cfg, self.a, self.connection, self.sender, self.clock = cfg, cfg.alerts, connection, sender, clock
        # The oldest transaction running when the last pass began (None: no pass yet, read alerts.lookback back).
        self.cursor: int | None = None
        self.known_rules: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._senders = ThreadPoolExecutor(SENDERS, thread_name_prefix="meterflow-webhook")
        self._lookup = threading.Lock()
        self._thread: threading.Thread | None = None
        self.crossings = Counter("meterflow_alerts_crossings", "Threshold crossings recorded.", registry=registry)
        self.deliveries = Counter(
            "meterflow_alerts_deliveries", "Webhook attempts, by outcome.", ["outcome"], registry=registry
        )
        self.errors = Counter(
            "meterflow_alerts_pass_errors", "Passes that failed (logged; the next one tries again).", registry=registry
        )
        self.backlog = Gauge(
            "meterflow_alerts_backlog", "Crossings waiting for delivery, and dead ones.", ["status"], registry=registry
        )
        self.delay = Histogram(
            "meterflow_alerts_delivery_delay_seconds",
            "From a crossing's recording to its webhook's 2xx answer.",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 3600),
            registry=registry,
        )

    def prepare(self) -> None:
        with self.connection() as conn:
            store.apply_alerts_schema(conn, self.a)

    def evaluate(self, conn: psycopg.Connection[Any]) -> int:
        """Record the crossings of the usage changed since the last pass, and of a rule new since then
        over the periods of the last ``alerts.lookback``; how many were new."""
        now_row = conn.execute("SELECT now()").fetchone()
        db_now: datetime = now_row[0] if now_row else self.clock()
        # Read before the changes: whatever is still running now is read again next pass.
        next_cursor = store.oldest_running_xid(conn)
        usage_table = self.cfg.postgres.usage_table
        rules = store.rules(conn, self.a)
        by_meter: dict[tuple[str, str], list[AlertRule]] = {}
        for rule in rules:
            by_meter.setdefault((rule.tenant_id, rule.meter), []).append(rule)
        # (rule, tenant, customer, meter) -> the range of time whose periods to check
        todo: dict[tuple[AlertRule, str, str, str], tuple[datetime, datetime]] = {}
        changed = store.changed_usage(conn, usage_table, self.a, self.cursor, db_now - self.a.lookback)
        for tenant, customer, meter, first, last in changed:
            for rule in by_meter.get((tenant, meter), []):
                todo[(rule, tenant, customer, meter)] = (first, last)
        until = db_now.astimezone(UTC).replace(tzinfo=None)
        since = until - self.a.lookback
        for rule in rules:
            if (rule.tenant_id, rule.rule_id) in self.known_rules:
                continue
            # A period is at most 31 days and a day 25 hours: the customers with usage in any period checked.
            for customer in store.customers_with_usage(
                conn, usage_table, rule.tenant_id, rule.meter, since - timedelta(days=32)
            ):
                key = (rule, rule.tenant_id, customer, rule.meter)
                first, last = todo.get(key, (since, until))
                todo[key] = (min(first, since), max(last, until))
        cycles_table = self.cfg.billing.cycles_table
        with_cycles = table_exists(conn, cycles_table)
        new = 0
        for (rule, tenant, customer, meter), (first, last) in todo.items():
            found = conn.execute(cycle_sql(cycles_table), (tenant, customer)).fetchone() if with_cycles else None
            cycle = BillingCycle(found[0], found[1]) if found else BillingCycle()
            for start, end in spans(rule, cycle, first, last):
                provisional, final = store.period_totals(conn, usage_table, (tenant, customer, meter), start, end)
                total = crossed(rule, provisional, final)
                if total is None:
                    continue
                at = self.clock().astimezone(UTC).replace(tzinfo=None)
                ident = crossing_id(rule.rule_id, tenant, customer, start)
                xing = Crossing(
                    ident,
                    rule.rule_id,
                    tenant,
                    customer,
                    meter,
                    rule.period,
                    rule.basis,
                    start,
                    end,
                    rule.threshold,
                    total,
                    at,
                )
                if store.record_crossing(conn, self.a, xing):
                    new += 1
                    log.info(
                        "threshold crossed: %s %s/%s %s >= %s", rule.rule_id, tenant, customer, total, rule.threshold
                    )
        self.crossings.inc(new)
        # Only once the pass recorded its crossings: a failed pass is done again whole.
        self.known_rules = {(r.tenant_id, r.rule_id) for r in rules}
        self.cursor = next_cursor
        return new

    def deliver(self, conn: psycopg.Connection[Any]) -> int:
        """Send the due webhooks once each, ``SENDERS`` at a time, until none is due or the pass has
        run ``MAX_DELIVERY_PASS``; how many were delivered."""
        started = time.monotonic()
        delivered = 0
        while True:
            # Held for the whole batch: its requests run side by side, each at most request_timeout.
            claimed = store.claim_due(conn, self.a, self.a.request_timeout * 3, CLAIMED_AT_ONCE)
            outcomes = list(self._senders.map(lambda c: self._send(conn, *c), claimed))
            for (xing, attempts), (status, error) in zip(claimed, outcomes, strict=True):
                if status is not None and is_delivered(status):
                    store.mark_sent(conn, self.a, xing.crossing_id)
                    self.deliveries.labels("sent").inc()
                    self.delay.observe(
                        max((self.clock().astimezone(UTC).replace(tzinfo=None) - xing.crossed_at).total_seconds(), 0)
                    )
                    delivered += 1
                else:
                    self._failed(conn, xing, attempts, error or f"HTTP {status}")
            if len(claimed) < CLAIMED_AT_ONCE or time.monotonic() - started > MAX_DELIVERY_PASS:
                break
        pending, dead = store.pending_count(conn, self.a)
        self.backlog.labels("pending").set(pending)
        self.backlog.labels("dead").set(dead)
        return delivered

    def _send(self, conn: psycopg.Connection[Any], xing: Crossing, attempts: int) -> tuple[int | None, str | None]:
        """One webhook: its HTTP status, or why there was none."""
        with self._lookup:  # the connection is the pass's, one statement at a time
            target = store.endpoint(conn, self.a, xing.tenant_id)
        if target is None:
            return None, "the tenant has no webhook endpoint (meterflow alerts endpoint)"
        url, secret = target
        body = json.dumps(xing.body(), separators=(",", ":")).encode()
        sent_at = self.clock()
        headers = {
            "content-type": "application/json",
            "webhook-id": xing.crossing_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": Webhook(secret).sign(xing.crossing_id, sent_at, body.decode()),
        }
        try:
            return self.sender(url, body, headers, self.a.request_timeout.total_seconds()), None
        except Exception as e:  # noqa: BLE001 - any failure of one receiver (a bad URL included) is that crossing's, recorded and retried
            return None, f"{type(e).__name__}: {e}"

    def _failed(self, conn: psycopg.Connection[Any], xing: Crossing, attempts: int, error: str) -> None:
        dead = attempts + 1 >= self.a.max_attempts
        wait = retry_delay(attempts + 1, self.a.retry_base, self.a.retry_cap)
        store.mark_failed(conn, self.a, xing.crossing_id, error, dead, wait)
        self.deliveries.labels("dead" if dead else "failed").inc()
        log.warning("webhook %s for %s: %s%s", xing.crossing_id, xing.tenant_id, error, " (dead)" if dead else "")

    def run_once(self) -> None:
        with self.connection() as conn:
            self.evaluate(conn)
            self.deliver(conn)

    def _loop(self) -> None:
        while not self._stop.wait(self.a.interval.total_seconds()):
            try:
                self.run_once()
            except Exception:
                # Postgres away for a moment, a bad rule or cycle row: the next pass starts where this one could not.
                self.errors.inc()
                log.exception("alerts pass failed")

    def start(self) -> None:
        self.prepare()
        self._thread = threading.Thread(target=self._loop, name="meterflow-alerts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self._senders.shutdown(wait=False)
