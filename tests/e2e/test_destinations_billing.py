"""Billing to three destinations at once, end to end on the real stack.

Customers split over Stripe, Metronome and Chargebee (the project's fakes: tests/support/), a
customer moved from Stripe to Metronome at the start of this month, provider faults on each, and
a TaskManager ``kill -9`` while calls to all three are in flight. Exactly one accepted event per
final window at its customer's destination and none elsewhere; identifiers kept across the
restart; a lower final sent as a negative difference where the destination takes one and owed
where it does not; a Chargebee window older than 12 hours reported, not sent; ``meterflow
reconcile`` clean per destination apart from what is reported.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner

from billing.destination_rules import fit_identifier
from meterflow.commands import cli
from meterflow.local import flink_jobs
from meterflow.local.prometheus import PrometheusServer
from sinks.ledger import apply_schemas, fetch_deliveries
from tests.e2e.helpers import (
    closed_window,
    kill_taskmanagers,
    private_job,
    publish_closed_windows,
    replaced_after,
    replacements_so_far,
    restored_before,
    wait_for,
    wait_restarted,
    write_final_rows,
)
from tests.support.fake_destinations import FakeChargebee, FakeMetronome
from tests.support.fake_stripe import DROP, FakeStripe, reject

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEYS = {"metronome": "m-key-e2e", "chargebee": "cb-key-e2e"}


def _config(e2e_stack, stripe: FakeStripe, metronome: FakeMetronome, chargebee: FakeChargebee, tmp_path):
    run = uuid.uuid4().hex[:6]
    # The destinations' keys in a secrets file of this test's own, beside the stack's secrets.
    shared = (e2e_stack.dir / e2e_stack.base["secrets_file"]).read_text()
    secrets = tmp_path / "secrets.env"
    secrets.write_text(
        shared + "".join(f"METERFLOW_DESTINATION_{name.upper()}_API_KEY={key}\n" for name, key in KEYS.items())
    )
    secrets.chmod(0o600)
    billing = {
        "enabled": True,
        "ledger_table": f"deliveries_dest_{run}",
        "customers_table": f"customers_dest_{run}",
        "carry_table": f"carry_dest_{run}",
        "max_in_flight": 8,
        "request_timeout": "10s",
        "retry_lease": "30s",
        "destinations": {
            "metronome": {"api_base": metronome.url},
            "chargebee": {"api_base": f"{chargebee.url}/api/v2"},
        },
    }
    event_time = {**e2e_stack.base["event_time"], "source_idle_timeout": "30s"}
    cfg, path = private_job(
        e2e_stack,
        "dest",
        stripe={"api_base": stripe.url},
        billing=billing,
        event_time=event_time,
        flink={"parallelism": 2},
        secrets_file=str(secrets),
    )
    apply_schemas(cfg)
    return cfg, path


def _as_sent(cfg, destination: str, identifier: str) -> str:
    """The identifier as the destination received it (fitted to its length: billing/destination_rules.py)."""
    if destination == "stripe":
        return identifier
    return fit_identifier(identifier, cfg.billing.destinations[destination].limits.identifier_max_length)


def _cli(path, *args: str):
    return CliRunner().invoke(cli, ["--config", str(path), *args], catch_exceptions=False)


def test_customers_split_over_three_destinations_with_faults_and_a_taskmanager_kill(e2e_stack, tmp_path):
    # Slow answers until the kill, so calls to every destination are in flight when it strikes.
    stripe = FakeStripe(latency=3.0).start()
    metronome = FakeMetronome(api_key=KEYS["metronome"], latency=5.0).start()
    chargebee = FakeChargebee(api_key=KEYS["chargebee"], latency=5.0).start()
    try:
        cfg, path = _config(e2e_stack, stripe, metronome, chargebee, tmp_path)
        size = cfg.event_time.window_size
        now = datetime.now(UTC)
        month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        start = (now - timedelta(hours=1)).replace(second=0, microsecond=0)
        at = {"stripe": range(0, 5), "metronome": range(5, 10), "chargebee": range(10, 15)}
        destination_of = {f"cust-{c}": name for name, customers in at.items() for c in customers}
        for customer, name in destination_of.items():
            there = {"stripe": "cus_", "metronome": "m-", "chargebee": "sub-"}[name] + customer
            assert (
                _cli(path, "billing", "customers", "set", "t0", customer, there, "--destination", name).exit_code == 0
            )
        # Moved at the start of this month: earlier windows stay at Stripe, later ones go to Metronome.
        assert _cli(path, "billing", "customers", "set", "t0", "mover", "cus_mover").exit_code == 0
        moved = _cli(
            path, "billing", "customers", "set", "t0", "mover", "m-mover", "--destination", "metronome",
            "--from", f"{month:%Y-%m-%d}",
        )  # fmt: skip
        assert moved.exit_code == 0, moved.output

        windows = [
            closed_window("t0", customer, "tokens", start + i * size, size, f"{c}.{i}5", 2)
            for c, customer in enumerate(destination_of)
            for i in range(3)
        ]
        boundary = [
            closed_window("t0", "mover", "tokens", month - size, size, "4", 1),
            closed_window("t0", "mover", "tokens", month, size, "6", 1),
        ]
        too_old = closed_window(
            "t0", "cust-10", "tokens", now.replace(second=0, microsecond=0) - timedelta(hours=13), size, "9", 1
        )
        # Finals that change after they were billed: lower at Metronome (a negative difference) and
        # at Chargebee (owed: it takes none); one window published twice as it was (a duplicate).
        lowered = {
            "metronome": closed_window("t0", "cust-5", "tokens", start, size, "4.05", 3),
            "chargebee": closed_window("t0", "cust-10", "tokens", start, size, "5.05", 3),
        }
        first = [*windows, *boundary, too_old]
        write_final_rows(cfg, [*first, *lowered.values()])

        job_id = flink_jobs.submit_billing(cfg, path)
        try:
            wait_for(lambda: flink_jobs.completed_checkpoints(cfg, job_id) >= 1, 60, "a first checkpoint")
            publish_closed_windows(cfg, first)
            wait_for(
                lambda: stripe.in_flight >= 2 and metronome.in_flight >= 1 and chargebee.in_flight >= 1,
                120,
                "calls in flight at all three destinations",
            )
            in_flight = {
                "stripe": stripe.unanswered(),
                "metronome": metronome.in_flight,
                "chargebee": chargebee.in_flight,
            }
            before = replacements_so_far(cfg)
            killed_at = kill_taskmanagers(cfg)
            for fake in (stripe, metronome, chargebee):
                fake.latency = 0.05
            # Faults at each destination for the restarted job's first calls (every one is retried),
            # once the killed worker's calls have had their answers (the fakes take them whole).
            wait_for(
                lambda: stripe.in_flight + metronome.in_flight + chargebee.in_flight == 0,
                30,
                "the calls of the killed worker answered",
            )
            stripe.inject(reject(500), DROP)
            metronome.inject(reject(503))
            chargebee.inject(reject(429, retry_after=1))
            replaced_after(cfg, before, killed_at)
            wait_restarted(cfg, job_id, killed_at)
            publish_closed_windows(cfg, [windows[0], *lowered.values()])  # a duplicate, and two lower finals

            def settled() -> bool:
                rows = fetch_deliveries(cfg)
                return len(rows) >= len(first) + 2 and all(d.status in ("sent", "dead") for d in rows)

            wait_for(settled, 240, "every delivery sent or reported")
            # The outcomes per destination reach Prometheus under their destination's label.
            prom = PrometheusServer(cfg)
            per_destination = (
                'count by (destination) ({__name__="flink_taskmanager_job_task_operator_meterflow_destination_billing_sent",'
                # The reporter's label has the job's name with - as _.
                f' job_name="{cfg.billing_job_name.replace("-", "_")}"}})'
            )
            wait_for(
                lambda: {r["metric"].get("destination") for r in prom.query(per_destination)} == set(KEYS) | {"stripe"},
                60,
                "the billing outcomes of each destination in Prometheus",
            )
            stats = flink_jobs.checkpoint_stats(cfg, job_id)
            wait_for(lambda: flink_jobs.restarts(cfg, job_id) >= 1, 30, "numRestarts to count the restart")
        finally:
            flink_jobs.cancel(cfg, job_id)
        restored_before(stats, killed_at)

        rows = {d.identifier: d for d in fetch_deliveries(cfg)}
        own = {(d.customer_id, d.window_start.replace(tzinfo=UTC)): d for d in rows.values() if d.kind == "window"}
        accepted = {
            "stripe": Counter(e.identifier for e in stripe.events),
            "metronome": Counter(e.identifier for e in metronome.events),
            # Chargebee's key is (timestamp, subscription, deduplication_id): counted here by the last.
            "chargebee": Counter(e.identifier.rsplit("\x00", 1)[-1] for e in chargebee.events),
        }
        print(
            f"in flight at the kill: {in_flight}; fakes: {stripe.outcomes()} {metronome.outcomes()} {chargebee.outcomes()}"
        )

        # Exactly one accepted event per window at its customer's destination, and none elsewhere.
        for w in [*windows, *boundary]:
            d = own[(w["customer_id"], w["window_start"])]
            expected = destination_of.get(w["customer_id"]) or ("stripe" if w["window_start"] < month else "metronome")
            assert (d.provider, d.status) == (expected, "sent"), d
            for name, counts in accepted.items():
                assert counts[_as_sent(cfg, name, d.identifier)] == (1 if name == expected else 0), (name, d.identifier)
        # The calls in flight at the kill were sent again under the same identifiers, and counted once.
        assert any(stripe.attempts_for(i) >= 2 for i in in_flight["stripe"])
        assert metronome.duplicates >= 1 and chargebee.duplicates >= 1, (
            "requests the killed worker never read were repeated"
        )

        # Each destination's fault was answered to a call of the restarted job, and retried.
        assert stripe.outcomes().get("rejected-500") == 1 and stripe.outcomes().get("dropped") == 1
        assert metronome.outcomes().get("rejected-503") == 1 and chargebee.outcomes().get("rejected-429") == 1

        # A lower final: a negative difference at Metronome; owed, not sent, at Chargebee.
        corrections = {d.provider: d for d in rows.values() if d.kind == "correction"}
        assert corrections["metronome"].status == "sent" and corrections["metronome"].quantity == Decimal("-1.00")
        assert [e.value for e in metronome.events if e.identifier == corrections["metronome"].identifier] == [
            Decimal(-1)
        ]
        owed = corrections["chargebee"]
        assert owed.status == "dead" and owed.last_error.startswith("owed: chargebee takes no correction")
        assert accepted["chargebee"][_as_sent(cfg, "chargebee", owed.identifier)] == 0

        # Older than Chargebee's 12 hours: reported with the reason, never sent.
        old = own[("cust-10", too_old["window_start"])]
        assert old.status == "dead" and "more than 12h ago" in old.last_error
        assert chargebee.sent_in_requests(_as_sent(cfg, "chargebee", old.identifier)) == 0

        # Reconcile: per destination, and only what was reported differs.
        report = json.loads(_cli(path, "reconcile", "--format", "json", "--grace", "0s").stdout)
        issues = {(i["destination"], i["customer_id"], i["kind"]) for i in report["discrepancies"]}
        assert issues == {("chargebee", "cust-10", "billed differently"), ("chargebee", "cust-10", "not billed")}
        periods = {(p["destination"], p["customer_id"]) for p in report["periods"]}
        assert ("stripe", "mover") in periods and ("metronome", "mover") in periods
        assert all(
            p["destination"] == destination_of[p["customer_id"]]
            for p in report["periods"]
            if p["customer_id"] != "mover"
        )
        # billing status, per destination: what finance and support read.
        status = json.loads(_cli(path, "billing", "status", "--format", "json").stdout)
        dead = {(r["provider"], r["kind"]) for r in status["summary"] if r["status"] == "dead"}
        assert dead == {("chargebee", "window"), ("chargebee", "correction")}
    finally:
        for fake in (stripe, metronome, chargebee):
            fake.stop()
