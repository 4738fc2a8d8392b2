"""Billing through Stripe's v2 meter event stream (``stripe.meter_events_api: v2_stream``), against the
fake Stripe's stream (tests/support/fake_stripe_stream.py): Stripe's rules, sessions, validation
after acceptance with error reports that name the request."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal

import pytest
from click.testing import CliRunner

from billing.deliveries import ClosedWindow, MeterEvent, window_delivery
from billing.identifiers import WindowKey, derive_identifier
from billing.whole_values import billing_period_start
from meterflow.commands import cli
from meterflow.local import flink_jobs
from meterflow.local.base import port_open
from meterflow.local.postgres import PostgresServer
from meterflow.window_row import from_epoch_ms
from sinks.ledger import apply_schemas, fetch_deliveries, map_customer
from sinks.ledger_async import AsyncPostgresLedger, mark_reported
from sinks.postgres import connect
from tests.e2e.helpers import (
    closed_window,
    kill_with_calls_in_flight,
    private_job,
    publish_closed_windows,
    restored_before,
    wait_for,
)
from tests.support.fake_stripe import FakeStripe

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _stream_job(e2e_stack, name: str, fake: FakeStripe, **billing: object):
    run = uuid.uuid4().hex[:6]
    ledger = {
        "enabled": True,
        "ledger_table": f"deliveries_{name}_{run}",
        "customers_table": f"customers_{name}_{run}",
        "carry_table": f"carry_{name}_{run}",
        **billing,
    }
    stripe = {"api_base": fake.url, "meter_events_base": fake.url, "meter_events_api": "v2_stream"}
    cfg, path = private_job(e2e_stack, name, stripe=stripe, billing=ledger, flink={"parallelism": 2})
    apply_schemas(cfg)
    return cfg, path


def _identifier(cfg, w: dict) -> str:
    start_ms = int(w["window_start"].replace(tzinfo=UTC).timestamp() * 1000)
    size_ms = int(cfg.event_time.window_size.total_seconds() * 1000)
    return derive_identifier(
        WindowKey(
            w["tenant_id"],
            w["customer_id"],
            w["meter"],
            "{}",
            from_epoch_ms(start_ms),
            from_epoch_ms(start_ms + size_ms),
        ),
        cfg.billing.identifier_prefix,
    )


def test_error_reports_mark_the_sent_deliveries_of_their_request_dead(e2e_stack):
    """The deliveries a reported request carried become dead with the report; others, and a second pass, change nothing."""
    run = uuid.uuid4().hex[:6]
    cfg, _ = e2e_stack.config(
        f"reported-{run}",
        billing={
            "enabled": True,
            "ledger_table": f"deliveries_{run}",
            "customers_table": f"customers_{run}",
            "carry_table": f"carry_{run}",
        },
    )
    apply_schemas(cfg)
    start = (int(time.time()) - 3600) * 1000
    deliveries = [
        window_delivery(
            ClosedWindow.from_fields(("t1", f"c{i}", "tokens", "{}", start, start + 10_000, Decimal(3), 1, 1)), "mf"
        )
        for i in range(4)
    ]

    async def send() -> None:
        ledger = AsyncPostgresLedger(cfg, "w1", connections=1)
        try:
            for i, d in enumerate(deliveries):
                await ledger.claim(d, "stripe", "tokens", retry=False)
                if i < 3:
                    await ledger.mark_sent(
                        d.identifier,
                        MeterEvent(d.identifier, "tokens", f"cus_{i}", "3", start // 1000),
                        "req_1" if i < 2 else "req_2",
                        1,
                    )
        finally:
            await ledger.close()

    asyncio.run(send())
    with connect(cfg.postgres) as conn:
        conn.autocommit = True
        marked = mark_reported(conn, cfg, "req_1", "Stripe reported meter_event_customer_not_found")
        assert sorted(marked) == sorted(d.identifier for d in deliveries[:2])
        assert mark_reported(conn, cfg, "req_1", "again") == []
    rows = {r.identifier: r for r in fetch_deliveries(cfg)}
    assert [(rows[d.identifier].status, rows[d.identifier].last_error) for d in deliveries] == [
        ("dead", "Stripe reported meter_event_customer_not_found"),
        ("dead", "Stripe reported meter_event_customer_not_found"),
        ("sent", None),
        ("pending", None),
    ]


def _windows_of_mapped_customers(cfg, customers: int, per_customer: int, mapped: int | None = None) -> dict[str, dict]:
    """Closed windows an hour ago, ``per_customer`` for each of ``customers`` (cust-<c>, mapped to cus_<c>
    up to ``mapped``), by identifier."""
    size = cfg.event_time.window_size
    start = (datetime.now(UTC) - timedelta(hours=1)).replace(second=0, microsecond=0)
    windows = [
        closed_window("tenant-0", f"cust-{c}", "tokens", start + i * size, size, f"{c}.{i}5", 2)
        for c in range(customers)
        for i in range(per_customer)
    ]
    for c in range(customers if mapped is None else mapped):
        map_customer(cfg, "tenant-0", f"cust-{c}", f"cus_{c}")
    return {_identifier(cfg, w): w for w in windows}


def test_taskmanager_killed_with_stream_requests_in_flight(e2e_stack):
    """kill -9 with stream requests in flight: they are sent again with the same identifiers and each
    window counts once; a customer Stripe does not have comes back as an error report, marks its
    deliveries dead, and the operator's replay after fixing the mapping bills them once."""
    fake = FakeStripe(latency=3.0).start()
    fake.known_customers = {f"cus_{c}" for c in range(20)}
    try:
        cfg, path = _stream_job(e2e_stack, "stream", fake, max_in_flight=6, request_timeout="10s", retry_lease="30s")
        ids = _windows_of_mapped_customers(cfg, 21, 3, mapped=20)
        windows = list(ids.values())
        map_customer(cfg, "tenant-0", "cust-20", "cus_gone")  # a customer deleted at Stripe
        gone = {i for i, w in ids.items() if w["customer_id"] == "cust-20"}
        job_id = flink_jobs.submit_billing(cfg, path)
        try:
            wait_for(lambda: flink_jobs.completed_checkpoints(cfg, job_id) >= 1, 60, "a first checkpoint")
            publish_closed_windows(cfg, windows)
            # Stream requests in flight with at least 6 events (each subtask gathers its deliveries in
            # flight into one request; a session request in flight does not count).
            wait_for(lambda: len(fake.unanswered()) >= 6, 120, "events in flight")
            in_flight, killed_at = kill_with_calls_in_flight(cfg, job_id, fake, 1, 10)
            ledger = lambda: {d.identifier: d for d in fetch_deliveries(cfg)}
            wait_for(
                lambda: len(ledger()) == len(ids) and all(ledger()[i].status == "sent" for i in set(ids) - gone),
                180,
                "every window of a known customer sent",
            )
            # Stripe's error report comes back through the retry scan (it reads them every 30 s).
            wait_for(lambda: all(ledger()[i].status == "dead" for i in gone), 120, "the reported deliveries dead")
            stats = flink_jobs.checkpoint_stats(cfg, job_id)
        finally:
            flink_jobs.cancel(cfg, job_id)
        restored = restored_before(stats, killed_at)
        print(
            f"in flight at the kill: {len(in_flight)}; restored checkpoint {restored['id']}; requests {fake.stream.stream_requests}; fake {fake.outcomes()}"
        )
        assert len(in_flight) >= 6
        for identifier in in_flight:
            assert fake.attempts_for(identifier) >= 2, (
                "an event in flight at the kill is sent again with the same identifier"
            )
        assert fake.outcomes().get("duplicate", 0) >= 1, "Stripe deduplicated an event the killed worker had sent"
        accepted = Counter(e.identifier for e in fake.events)
        assert set(accepted) == set(ids) - gone and set(accepted.values()) == {1}, "one accepted event per window"
        assert fake.stream.stream_requests < len(ids), "deliveries share requests"
        rows = {d.identifier: d for d in fetch_deliveries(cfg)}
        assert all("meter_event_customer_not_found" in rows[i].last_error for i in gone)

        # The operator maps the customer to the one Stripe has and replays the dead deliveries.
        fake.known_customers.add("cus_20")
        runner = CliRunner()
        assert (
            runner.invoke(
                cli, ["--config", str(path), "billing", "customers", "set", "tenant-0", "cust-20", "cus_20"]
            ).exit_code
            == 0
        )
        replay = runner.invoke(cli, ["--config", str(path), "billing", "replay"])
        assert replay.exit_code == 0, replay.output
        rows = {d.identifier: d for d in fetch_deliveries(cfg)}
        assert all(d.status == "sent" for d in rows.values())
        accepted = Counter(e.identifier for e in fake.events)
        assert set(accepted) == set(ids) and set(accepted.values()) == {1}
        # Each value sent is the one fixed at its first attempt; per customer they add up to the whole part of the quantities.
        assert all(fake.accepted[i].value == Decimal(rows[i].value) for i in ids)
        held: dict[tuple, Decimal] = {}
        exact: dict[tuple, Decimal] = {}
        for i, w in ids.items():
            key = (w["customer_id"], billing_period_start(w["window_start"]))
            held[key] = held.get(key, Decimal(0)) + fake.accepted[i].value
            exact[key] = exact.get(key, Decimal(0)) + w["quantity"]
        assert held == {k: v.to_integral_value(rounding=ROUND_FLOOR) for k, v in exact.items()}
    finally:
        fake.stop()


def _delivery_counts(cfg, job_id: str) -> dict[str, int]:
    """The delivery operator's ``meterflow.billing_<name>`` counts, summed over its subtasks (REST API)."""
    vertex = next(v for v in flink_jobs.job_details(cfg, job_id)["vertices"] if "deliver" in v["name"].lower())
    base = f"/jobs/{job_id}/vertices/{vertex['id']}/subtasks/metrics"
    ids = [m["id"] for m in flink_jobs.rest(cfg, base) if ".meterflow.billing_" in m["id"]]
    if not ids:
        return {}
    summed = flink_jobs.rest(cfg, f"{base}?get={','.join(ids)}&agg=sum")
    return {m["id"].rsplit(".billing_", 1)[1]: int(float(m["sum"])) for m in summed}


def test_postgres_crashed_with_stream_requests_in_flight(e2e_stack):
    """The ledger's Postgres crashes while stream requests are in flight: their outcomes cannot be
    recorded, so their rows stay in flight in the worker, the job keeps running and no checkpoint
    completes past them (what ``MeterflowCheckpointsNotCompleting`` alerts on); once Postgres is back
    every window is billed once, with the value fixed at its first claim, ``billing_delivery_errors``
    has counted the failed tries and the TaskManager's log names each."""
    fake = FakeStripe(latency=3.0).start()
    try:
        cfg, path = _stream_job(e2e_stack, "pgdown", fake, max_in_flight=64, request_timeout="10s", retry_lease="15s")
        ids = _windows_of_mapped_customers(cfg, 8, 6)
        windows = list(ids.values())
        server = PostgresServer(cfg)
        job_id = flink_jobs.submit_billing(cfg, path)
        try:
            wait_for(lambda: flink_jobs.completed_checkpoints(cfg, job_id) >= 1, 60, "a first checkpoint")
            publish_closed_windows(cfg, windows)
            wait_for(lambda: len(fake.unanswered()) >= 6, 120, "events in flight")
            in_flight = fake.unanswered()
            down_at = int(time.time() * 1000)
            server.down(mode="immediate")
            try:
                assert not port_open(cfg.postgres.host, cfg.postgres.port), "Postgres is down"
                # The answers of the requests in flight come (3 s), and their outcomes cannot be recorded.
                time.sleep(3 + 3 * cfg.flink.checkpoint_interval.total_seconds())
                latest = (flink_jobs.checkpoint_stats(cfg, job_id).get("latest") or {}).get("completed") or {}
                assert latest.get("trigger_timestamp", 0) < down_at, "no checkpoint completes past rows in flight"
                assert flink_jobs.restarts(cfg, job_id) == 0, "the job rides through the outage"
            finally:
                server.up()
            up_at = int(time.time() * 1000)
            ledger = lambda: {d.identifier: d for d in fetch_deliveries(cfg)}
            wait_for(
                lambda: len(ledger()) == len(ids) and all(d.status == "sent" for d in ledger().values()),
                180,
                "every window sent once Postgres is back",
            )

            def checkpoint_after_outage() -> bool:
                latest = (flink_jobs.checkpoint_stats(cfg, job_id).get("latest") or {}).get("completed") or {}
                return latest.get("trigger_timestamp", 0) > up_at

            wait_for(checkpoint_after_outage, 120, "a checkpoint completed after the outage")
            assert flink_jobs.restarts(cfg, job_id) == 0
            # The worker's counts, read when a bundle ends: every window sent, the failed tries counted.
            wait_for(
                lambda: (
                    _delivery_counts(cfg, job_id).get("sent") == len(ids)
                    and _delivery_counts(cfg, job_id).get("delivery_errors", 0) >= 1
                ),
                60,
                "the counts of the delivery operator",
            )
            # Each failed try is in the TaskManager's log, with what failed and when the rows go again.
            logs = "".join(
                p.read_text(errors="replace") for p in (cfg.state_dir / "flink" / "log").glob("*taskexecutor*.log")
            )
            assert re.search(r"delivering \d+ rows \(.*\) failed \(1 times\); again in 0\.5 s", logs)
        finally:
            flink_jobs.cancel(cfg, job_id)
        print(f"in flight at the crash: {len(in_flight)}; fake {fake.outcomes()}")
        accepted = Counter(e.identifier for e in fake.events)
        assert set(accepted) == set(ids) and set(accepted.values()) == {1}, "one accepted event per window"
        rows = ledger()
        assert all(fake.accepted[i].value == Decimal(rows[i].value) for i in ids), "the value fixed at the first claim"
    finally:
        fake.stop()
