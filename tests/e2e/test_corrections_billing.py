"""Billing of corrections from late events on the real stack: ``corrections apply`` records each
applied correction with its owed meter event in one transaction; the billing job's retry scan
delivers them. A TaskManager is killed with correction calls in flight and ``corrections apply``
runs again: every correction reaches the provider exactly once, dated in its original window; a
held one only once approved; one older than the provider accepts never; ``reconcile`` agrees."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner

from billing.deliveries import ClosedWindow, late_correction_delivery, window_identifier
from meterflow.commands import cli
from meterflow.local import flink_jobs
from meterflow.windowing import window_bounds
from sinks.ledger import apply_schemas, fetch_deliveries, map_customer
from tests.e2e.helpers import (
    closed_window,
    kill_with_calls_in_flight,
    late_event_record,
    private_job,
    publish_closed_windows,
    publish_late_events,
    wait_for,
    write_final_rows,
)
from tests.support.fake_stripe import FakeStripe

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TENANT = "tenant-late"


def _late(event_id: str, customer: str, quantity: str, window_start: datetime, size: timedelta) -> dict:
    return late_event_record(TENANT, event_id, customer, "tokens", quantity, window_start, size)


def _closed(window: dict) -> ClosedWindow:
    def ms(t: datetime) -> int:
        return int(t.timestamp() * 1000)

    return ClosedWindow.from_fields(
        (
            window["tenant_id"],
            window["customer_id"],
            window["meter"],
            "{}",
            ms(window["window_start"]),
            ms(window["window_end"]),
            window["quantity"],
            window["event_count"],
            window["revision"],
        )
    )


def test_corrections_are_billed_once_across_a_taskmanager_kill_and_a_rerun(e2e_stack):
    fake = FakeStripe(latency=0.05).start()
    try:
        run = uuid.uuid4().hex[:6]
        billing = {
            "enabled": True,
            "ledger_table": f"deliveries_cb_{run}",
            "customers_table": f"customers_cb_{run}",
            "carry_table": f"carry_cb_{run}",
            "max_in_flight": 6,
            "request_timeout": "10s",
            "retry_lease": "30s",
            "max_window_age": "2h",
        }
        corrections = {"approval_threshold": "5", "table": f"corr_cb_{run}", "events_table": f"corr_cb_{run}_events"}
        cfg, path = private_job(
            e2e_stack,
            "corrbill",
            stripe={"api_base": fake.url},
            billing=billing,
            corrections=corrections,
            flink={"parallelism": 2},
        )
        apply_schemas(cfg)
        size = cfg.event_time.window_size
        start, _ = window_bounds(datetime.now(UTC) - timedelta(hours=1), size)
        old_start, _ = window_bounds(datetime.now(UTC) - timedelta(hours=3), size)
        customers = [f"cust-{c}" for c in range(12)]
        windows = [closed_window(TENANT, c, "tokens", start, size, "10", 10) for c in customers]
        write_final_rows(cfg, windows)
        for i, c in enumerate(customers):
            map_customer(cfg, TENANT, c, f"cus_late_{i}")
        window_ids = {window_identifier(_closed(w), cfg.billing.identifier_prefix) for w in windows}
        runner = CliRunner()

        def cli_json(*args: str) -> dict | list:
            result = runner.invoke(cli, ["--config", str(path), *args, "--format", "json"], catch_exceptions=False)
            assert result.exit_code == 0, result.output
            return json.loads(result.stdout)

        job_id = flink_jobs.submit_billing(cfg, path)
        try:
            wait_for(lambda: flink_jobs.completed_checkpoints(cfg, job_id) >= 1, 60, "a first checkpoint")
            publish_closed_windows(cfg, windows)
            wait_for(
                lambda: (
                    sum(d.status == "sent" and d.identifier in window_ids for d in fetch_deliveries(cfg))
                    == len(windows)
                ),
                120,
                "every window billed",
            )

            # Late events: +3 for eleven customers (applied), +8 for the last (above the threshold:
            # held), and one in a window older than the provider accepts (reported).
            late = [_late(f"late-{c}-{n}", c, q, start, size) for c in customers[:-1] for n, q in ((1, "1"), (2, "2"))]
            late += [_late(f"late-{customers[-1]}-{n}", customers[-1], "4", start, size) for n in (1, 2)]
            late += [_late("late-old", customers[0], "5", old_start, size)]
            publish_late_events(cfg, late)
            fake.latency = 3.0
            first = cli_json("corrections", "apply")
            by_status = Counter(c["status"] for c in first["corrections"])
            assert by_status == {"applied": 11, "pending": 1, "reported": 1}, by_status
            in_flight, _ = kill_with_calls_in_flight(cfg, job_id, fake, 6, 60)
            again = cli_json("corrections", "apply")
            assert (again["corrections"], again["summary"]["known_events"]) == ([], len(late))
            [held] = [c for c in first["corrections"] if c["status"] == "pending"]
            runner.invoke(
                cli, ["--config", str(path), "corrections", "approve", held["correction_id"]], catch_exceptions=False
            )

            def corrections_sent() -> int:
                return sum(d.status == "sent" and d.identifier not in window_ids for d in fetch_deliveries(cfg))

            wait_for(lambda: corrections_sent() == 12, 180, "every applied or approved correction billed")
            # The REST metrics are a cache the JobManager refreshes every 10 s: the restart already
            # proven from the job's timestamps shows in numRestarts within that.
            wait_for(lambda: flink_jobs.restarts(cfg, job_id) >= 1, 30, "numRestarts to count the restart")
            restarts = flink_jobs.restarts(cfg, job_id)
        finally:
            flink_jobs.cancel(cfg, job_id)

        print(f"in flight at the kill: {len(in_flight)}; restarts {restarts}; fake {fake.outcomes()}")
        assert restarts >= 1
        counted = {c["correction_id"]: c for c in first["corrections"] if c["status"] != "reported"}
        by_window = {w["customer_id"]: w for w in windows}
        correction_ids = {
            late_correction_delivery(
                _closed({**by_window[c["customer_id"]], "quantity": Decimal(c["delta"])}),
                cid,
                cfg.billing.identifier_prefix,
            ).identifier: c
            for cid, c in counted.items()
        }
        accepted = Counter(e.identifier for e in fake.events)
        assert set(accepted) == window_ids | set(correction_ids) and set(accepted.values()) == {1}, (
            "each window and each correction accepted once"
        )
        assert in_flight and in_flight <= set(correction_ids), "the kill hit correction calls"
        for identifier in in_flight:
            assert fake.attempts_for(identifier) >= 2, (
                "a correction call in flight at the kill is sent again with the same identifier"
            )
        for identifier, c in correction_ids.items():
            event = fake.accepted[identifier]
            assert (event.value, event.timestamp) == (Decimal(c["delta"]), int(start.timestamp())), (
                "the delta, dated in the original window"
            )
        assert sorted(Decimal(c["delta"]) for c in counted.values()) == [Decimal(3)] * 11 + [Decimal(8)]
        [reported] = [c for c in first["corrections"] if c["status"] == "reported"]
        assert all(d.window_start != old_start.replace(tzinfo=None) for d in fetch_deliveries(cfg)), (
            f"reported {reported['correction_id']} never owed"
        )

        result = runner.invoke(
            cli, ["--config", str(path), "reconcile", "--grace", "0s", "--format", "json"], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["discrepancies"] == []
        ours = [p for p in report["periods"] if p["tenant_id"] == TENANT]
        assert sum(Decimal(p["billed_quantity"]) for p in ours) == Decimal(10 * 12 + 3 * 11 + 8)
        assert sum(c["origin"] == "late events" for c in report["corrections"]) == 12
    finally:
        fake.stop()
