"""Billing end to end: the job on the real stack forwards closed windows to Stripe's API.

* stripe-mock (installed with ``go install``) validates every request against Stripe's API
  specification; unmapped customers go to the dead-letter state and are replayed after mapping.
* the project's fault-injecting fake answers 429/5xx, slow and dropped responses, and holds one
  accepted request while the TaskManager is killed: every closed window is accepted exactly once.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from meterflow import flink_jobs
from meterflow.cli import cli
from meterflow.producer import SyntheticSpec, send_events, synthetic_events
from meterflow.stack import FlinkCluster
from sinks.idempotency import WindowKey, derive_identifier, format_meter_value
from sinks.ledger import fetch_deliveries, map_customer
from tests.e2e.helpers import closing_events, expected_totals, table_totals, wait_for
from tests.e2e.test_billing_semantics import _wait_restarted
from tests.support.fake_stripe import DROP, HOLD, PASS, SLOW, FakeStripe, reject

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _billing_config(e2e_stack, name: str, api_base: str, **billing):
    run = uuid.uuid4().hex[:6]
    kafka = {**e2e_stack.base["kafka"], "usage_events_topic": f"in-{name}-{run}", "late_events_topic": f"late-{name}-{run}",
             "dead_letter_topic": f"dead-{name}-{run}", "consumer_group": f"g-{name}-{run}"}  # fmt: skip
    postgres = {**e2e_stack.base["postgres"], "usage_table": f"usage_{name}_{run}"}
    ledger = {"enabled": True, "ledger_table": f"deliveries_{name}_{run}", "customers_table": f"customers_{name}_{run}", **billing}
    # A long idle timeout: a partition whose events arrive a little later never has them overtaken.
    event_time = {**e2e_stack.base["event_time"], "source_idle_timeout": "30s"}
    return e2e_stack.config(f"{name}-{run}", kafka=kafka, postgres=postgres, stripe={"api_base": api_base}, billing=ledger, event_time=event_time)


def _produce(cfg, seed: int, count: int, customers: int, minutes: int):
    """Events over the given minutes, ending well in the past, plus closing events: every window closes."""
    start = (datetime.now(UTC) - timedelta(minutes=minutes + 20)).replace(second=0, microsecond=0)
    events = list(synthetic_events(SyntheticSpec(count=count, tenants=2, customers=customers, start=start, span=timedelta(minutes=minutes), seed=seed)))
    send_events(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, events)
    closers = closing_events(start + timedelta(minutes=minutes), cfg.kafka.partitions)
    send_events(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, closers, partition_for=lambda i, e: i)
    return expected_totals(events, cfg.event_time.window_size)


def _identifier(cfg, key: tuple) -> str:
    tenant, customer, meter, start = key
    return derive_identifier(WindowKey(tenant, customer, meter, "{}", int(start.replace(tzinfo=UTC).timestamp() * 1000)), cfg.billing.identifier_prefix)


def _cli(path, *args: str):
    return CliRunner().invoke(cli, ["--config", str(path), *args], catch_exceptions=False)


def _prepare(cfg):
    from connectors.kafka_admin import ensure_topics
    from sinks.ledger import apply_schemas

    ensure_topics(cfg.kafka.bootstrap_servers, [cfg.kafka.usage_events_topic, cfg.kafka.late_events_topic, cfg.kafka.dead_letter_topic], cfg.kafka.partitions)
    apply_schemas(cfg)


def test_closed_windows_reach_stripe_mock_dead_letters_replay_and_reconcile(e2e_stack):
    """Every closed window of a mapped customer is sent once (validated by stripe-mock); unmapped ones are dead until replayed."""
    cfg, path = _billing_config(e2e_stack, "stripemock", e2e_stack.base["stripe"]["api_base"])
    _prepare(cfg)
    for tenant in ("tenant-0", "tenant-1"):
        for customer in ("cust-0", "cust-1"):
            map_customer(cfg, tenant, customer, f"cus_{tenant[-1]}{customer[-1]}")
    job_id = flink_jobs.submit(cfg, path)
    try:
        expected = _produce(cfg, seed=11, count=3000, customers=3, minutes=2)
        ids = {_identifier(cfg, k): (k, v) for k, v in expected.items()}

        def settled():
            return {d.identifier: d for d in fetch_deliveries(cfg) if d.tenant_id.startswith("tenant-") and d.status in ("sent", "dead")}

        wait_for(lambda: set(settled()) == set(ids), 240, "a final ledger state for every closed window")
        wait_for(lambda: all(r.is_final for r in table_totals(cfg).values()) and len(table_totals(cfg)) == len(expected), 120, "final rows")
    finally:
        flink_jobs.cancel(cfg, job_id)

    deliveries, finals = settled(), table_totals(cfg)
    for identifier, ((tenant, customer, meter, start), _) in ids.items():
        d, quantity = deliveries[identifier], finals[(tenant, customer, meter, start)].quantity
        assert d.quantity == quantity, "the ledger holds the window's final value"
        if customer == "cust-2":
            assert d.status == "dead" and "no billing customer mapped" in d.last_error and d.provider_response_id is None
        else:
            assert d.status == "sent", d.last_error
            assert d.value == format_meter_value(quantity, "decimal") and d.provider_response_id and d.attempts == 1
            assert d.provider_customer_id == f"cus_{tenant[-1]}{customer[-1]}" and d.event_name == meter

    dead = [i for i, d in deliveries.items() if d.status == "dead"]
    assert dead, "the unmapped customer's windows are dead letters"
    result = _cli(path, "reconcile", "--tenant", "tenant-0", "--grace", "0s", "--period", "day")
    assert result.exit_code == 1 and "not billed" in result.output and "no billing customer mapped" in result.output

    status = _cli(path, "billing", "status", "--dead")
    assert status.exit_code == 0 and "dead" in status.output
    assert _cli(path, "billing", "customers", "set", "tenant-0", "cust-2", "cus_02").exit_code == 0
    mapping_csv = path.with_suffix(".customers.csv")
    mapping_csv.write_text("tenant_id,customer_id,provider_customer_id\ntenant-1,cust-2,cus_12\n")
    assert _cli(path, "billing", "customers", "import", str(mapping_csv)).exit_code == 0
    replay = _cli(path, "billing", "replay")
    assert replay.exit_code == 0, replay.output
    after = {d.identifier: d for d in fetch_deliveries(cfg)}
    assert all(after[i].status == "sent" and after[i].attempts == 1 for i in dead)
    for tenant in ("tenant-0", "tenant-1"):
        ok = _cli(path, "reconcile", "--tenant", tenant, "--grace", "0s")
        assert ok.exit_code == 0, ok.output


def test_exactly_one_accepted_event_per_window_through_faults_and_a_taskmanager_kill(e2e_stack):
    """429/5xx, slow and dropped answers, then kill -9 of the TaskManager while a call is in flight."""
    fake = FakeStripe().start()
    try:
        cfg, path = _billing_config(
            e2e_stack, "faults", fake.url, request_timeout="3s", initial_backoff="200ms", max_backoff="2s", max_attempts=30
        )
        _prepare(cfg)
        for tenant in ("tenant-0", "tenant-1"):
            for customer in ("cust-0", "cust-1", "cust-2"):
                map_customer(cfg, tenant, customer, f"cus_{tenant[-1]}{customer[-1]}")
        job_id = flink_jobs.submit(cfg, path)
        try:
            fake.fail_for(4, status=429, retry_after=1)
            # SLOW answers after the client's 3 s timeout: accepted, but the client can't know.
            fake.inject(reject(500), reject(503), SLOW, DROP, *([PASS] * 30), HOLD)
            expected = _produce(cfg, seed=12, count=4000, customers=3, minutes=2)
            ids = {_identifier(cfg, k): (k, v) for k, v in expected.items()}
            assert fake.held.wait(180), "the fault schedule reached the held request"
            held = next(r.identifier for r in fake.requests if r.outcome == "held")
            killed_at = int(time.time() * 1000)
            cluster = FlinkCluster(cfg)
            for pid in cluster.taskmanager_pids():
                os.kill(pid, signal.SIGKILL)
            fake.release()
            cluster.start_taskmanager()
            _wait_restarted(cfg, job_id, killed_at)

            def all_sent() -> bool:
                statuses = {d.identifier: d.status for d in fetch_deliveries(cfg) if d.identifier in ids}
                accepted = sum(1 for i in fake.accepted if i in ids)
                progress.update(accepted=accepted, ledger={s: list(statuses.values()).count(s) for s in set(statuses.values())}, answers=fake.outcomes())
                return accepted == len(ids) and len(statuses) == len(ids) and set(statuses.values()) == {"sent"}

            progress: dict = {}
            try:
                wait_for(all_sent, 300, "every window accepted and sent")
            except AssertionError as e:
                raise AssertionError(f"{e}; of {len(ids)} windows: {progress}") from e
            wait_for(lambda: all(r.is_final for r in table_totals(cfg).values()) and len(table_totals(cfg)) == len(expected), 120, "final rows")
        finally:
            flink_jobs.cancel(cfg, job_id)

        # Exactly one accepted event per window, with the final value; no second event under another key.
        assert set(fake.accepted) >= set(ids)
        finals = table_totals(cfg)
        for identifier, ((tenant, customer, meter, start), _) in ids.items():
            event, quantity = fake.accepted[identifier], finals[(tenant, customer, meter, start)].quantity
            assert event.value == quantity and event.event_name == meter and event.customer == f"cus_{tenant[-1]}{customer[-1]}"
            assert event.timestamp == int(start.replace(tzinfo=UTC).timestamp())
        outcomes = fake.outcomes()
        print(f"fake Stripe answers: {outcomes}")
        assert outcomes.get("duplicate", 0) == 0 and outcomes.get("idempotency-error", 0) == 0 and outcomes.get("invalid", 0) == 0
        assert outcomes.get("rejected-429", 0) >= 1 and outcomes["rejected-500"] == 1 and outcomes["rejected-503"] == 1
        assert outcomes["slow"] == 1 and outcomes["dropped"] == 1 and outcomes["held"] == 1
        # Accepted-but-unanswered calls (slow, dropped, held across the kill) were re-sent and replayed, not re-counted.
        assert outcomes["replayed"] >= 3
        assert fake.attempts_for(held) >= 2
        deliveries = {d.identifier: d for d in fetch_deliveries(cfg) if d.identifier in ids}
        assert all(d.quantity == finals[ids[i][0]].quantity for i, d in deliveries.items())
        assert any(d.attempts > 1 for d in deliveries.values()), "retries are counted in the ledger"
        for tenant in ("tenant-0", "tenant-1"):
            ok = _cli(path, "reconcile", "--tenant", tenant, "--grace", "0s")
            assert ok.exit_code == 0, ok.output
    finally:
        fake.stop()
