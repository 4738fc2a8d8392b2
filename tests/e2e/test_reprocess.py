"""``meterflow reprocess`` on the real stack: a billed period with a late event billed as a
correction, a duplicate inside the dedup horizon, a copy past it (counted twice by the job, once as
a late event), a bad record and an event on a window boundary. The recomputation finds exactly the
double count, ``--bill`` bills only that difference, a second run finds nothing, and the provider
total equals the unique events."""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner

from connectors.avro_codec import UsageEvent
from connectors.kafka_admin import group_lag
from connectors.producer import send_events
from meterflow.commands import cli
from meterflow.commands.corrections import read_late_events
from meterflow.local import flink_jobs
from meterflow.windowing import window_bounds
from sinks.ledger import apply_schemas, fetch_deliveries, map_customer
from tests.e2e.helpers import closing_events, private_job, table_totals, wait_for
from tests.support.fake_stripe import FakeStripe

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TENANT = "tenant-rep"


def _event(event_id: str, customer: str, quantity: int, at: datetime, meter: str = "tokens") -> UsageEvent:
    return UsageEvent(
        event_id=event_id,
        tenant_id=TENANT,
        customer_id=customer,
        meter=meter,
        quantity=Decimal(quantity),
        event_time=at,
        dimensions={},
    )


def test_a_reprocess_bills_only_the_difference_and_never_twice(e2e_stack):
    fake = FakeStripe(latency=0.01).start()
    try:
        run = uuid.uuid4().hex[:6]
        billing = {
            "enabled": True,
            "ledger_table": f"deliveries_rep_{run}",
            "customers_table": f"customers_rep_{run}",
            "carry_table": f"carry_rep_{run}",
            "max_window_age": "2h",
        }
        cfg, path = private_job(
            e2e_stack,
            "rep",
            event_time={
                "window_size": "10s",
                "watermark_delay": "2s",
                "allowed_lateness": "0s",
                "source_idle_timeout": "5s",
                "dedup_horizon": "10s",
            },
            stripe={"api_base": fake.url},
            billing=billing,
            corrections={"table": f"corr_rep_{run}", "events_table": f"corr_rep_{run}_events"},
            flink={"parallelism": 2},
        )
        apply_schemas(cfg)
        for i, customer in enumerate(("c1", "c2")):
            map_customer(cfg, TENANT, customer, f"cus_rep_{i}")
        size = cfg.event_time.window_size
        a_start, _ = window_bounds(datetime.now(UTC) - timedelta(minutes=30), size)
        b_start = a_start + size
        on_time = [
            _event("e1", "c1", 3, a_start + timedelta(seconds=1)),
            _event("e2", "c1", 5, a_start + timedelta(seconds=2)),
            _event("e3", "c2", 7, a_start + timedelta(seconds=3)),
            _event("e4", "c2", 11, b_start),  # on the boundary: window B
            _event("e1", "c1", 3, a_start + timedelta(seconds=1)),  # a copy within the dedup horizon: dropped
            _event(
                "bad", "c1", 100, a_start + timedelta(seconds=4), meter="no-such-meter"
            ),  # a dead letter, never counted
        ]
        unique = {"c1": Decimal(3 + 5 + 2), "c2": Decimal(7 + 11)}  # with the late event below
        runner = CliRunner()

        def cli_run(*args: str) -> tuple[int, str]:
            result = runner.invoke(cli, ["--config", str(path), *args], catch_exceptions=False)
            return result.exit_code, result.stdout

        job_id = flink_jobs.submit(cfg, path)
        billing_id = flink_jobs.submit_billing(cfg, path)
        try:
            send_events(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, on_time)
            wait_for(
                lambda: (
                    group_lag(cfg.kafka.bootstrap_servers, cfg.kafka.consumer_group, cfg.kafka.usage_events_topic) == 0
                ),
                300,
                "the on-time events consumed",
            )
            consumed_at = time.monotonic()
            send_events(
                cfg.kafka.bootstrap_servers,
                cfg.kafka.usage_events_topic,
                closing_events(a_start + timedelta(minutes=3), cfg.kafka.partitions),
                partition_for=lambda i, e: i,
            )
            wait_for(
                lambda: sorted(r.is_final for r in table_totals(cfg).values()) == [True, True, True],
                420,
                "windows A (c1, c2) and B final",
            )
            # Past the dedup horizon (state TTL, processing time): the copy of e2 is counted again, as a late event.
            time.sleep(max(0.0, consumed_at + 15 - time.monotonic()))
            late = [
                _event("late-1", "c1", 2, a_start + timedelta(seconds=5)),
                _event("e2", "c1", 5, a_start + timedelta(seconds=2)),
            ]
            send_events(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, late)
            wait_for(lambda: len(read_late_events(cfg)) == 2, 180, "both late events in the late topic")
            code, out = cli_run("corrections", "apply", "--format", "json")
            assert code == 0 and [Decimal(c["delta"]) for c in json.loads(out)["corrections"]] == [Decimal(7)], out

            def billed() -> dict[str, Decimal]:
                totals: dict[str, Decimal] = defaultdict(Decimal)
                for e in fake.events:
                    totals[e.customer] += e.value
                return dict(totals)

            wait_for(
                lambda: billed() == {"cus_rep_0": Decimal(8 + 7), "cus_rep_1": Decimal(18)},
                180,
                "the windows and the late correction billed (the copy twice)",
            )

            # The recomputation finds the double count, and only it.
            code, out = cli_run(
                "reprocess", "--since", a_start.isoformat(), "--until", (b_start + size).isoformat(), "--format", "json"
            )
            report = json.loads(out)
            assert code == 1, out
            assert report["windows"] == {"recomputed": 3, "metered": 3, "differing": 1}
            [diff] = report["differences"]
            assert (
                diff["customer_id"],
                Decimal(diff["metered"]),
                Decimal(diff["recomputed"]),
                Decimal(diff["difference"]),
            ) == ("c1", Decimal(15), Decimal(10), Decimal(-5))
            assert {c["customer_id"]: Decimal(c["recomputed"]) for c in report["customers"]} == unique

            code, out = cli_run(
                "reprocess",
                "--since",
                a_start.isoformat(),
                "--until",
                (b_start + size).isoformat(),
                "--bill",
                "--format",
                "json",
            )
            [correction] = json.loads(out)["billed"]
            assert code == 0 and (correction["status"], Decimal(correction["delta"])) == ("applied", Decimal(-5)), out
            wait_for(
                lambda: billed() == {"cus_rep_0": unique["c1"], "cus_rep_1": unique["c2"]},
                180,
                "the difference billed by the billing job",
            )

            code, out = cli_run(
                "reprocess",
                "--since",
                a_start.isoformat(),
                "--until",
                (b_start + size).isoformat(),
                "--bill",
                "--format",
                "json",
            )
            again = json.loads(out)
            assert (code, again["windows"]["differing"], again["billed"]) == (0, 0, []), (
                "a second run finds nothing to bill"
            )
        finally:
            flink_jobs.cancel(cfg, billing_id)
            flink_jobs.cancel(cfg, job_id)

        assert billed() == {"cus_rep_0": unique["c1"], "cus_rep_1": unique["c2"]}, (
            "the provider total is the unique events"
        )
        assert all(d.status == "sent" for d in fetch_deliveries(cfg)) and len(fake.events) == len(
            {e.identifier for e in fake.events}
        )
        code, out = cli_run("reconcile", "--grace", "0s", "--format", "json")
        assert code == 0 and json.loads(out)["discrepancies"] == [], out
    finally:
        fake.stop()
