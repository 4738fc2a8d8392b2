"""Billing end to end: the billing job on the real stack, reading the closed-windows topic.

* stripe-mock (installed with ``go install``) validates every request against Stripe's API
  specification: unmapped customers are dead letters until replayed, and a window published again
  with another final value is billed as a correction, shown by ``meterflow reconcile``.
* the project's fault-injecting fake: the provider down for a minute while events flow (the usage
  job's rows and late topic are unaffected, billing catches up, exactly one accepted event per
  window), and a TaskManager ``kill -9`` while calls are in flight (they are re-sent with the same
  identifier, and the provider keeps one event each).
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal

import fastavro
import pytest
from click.testing import CliRunner

from billing.identifiers import (
    WindowKey,
    derive_correction_identifier,
    derive_identifier,
)
from billing.whole_values import billing_period_start
from connectors.avro_types import load_schema
from connectors.producer import SyntheticSpec, send_events, synthetic_events
from jobs.plan import DEAD_LETTER_SCHEMA, LATE_EVENT_SCHEMA
from meterflow.commands import cli
from meterflow.local import flink_jobs
from meterflow.window_row import from_epoch_ms
from sinks.ledger import fetch_deliveries, map_customer
from tests.e2e.helpers import (
    closed_window,
    closing_events,
    expected_totals,
    kill_with_calls_in_flight,
    private_job,
    publish_closed_windows,
    read_topic,
    restored_before,
    send_raw,
    table_totals,
    wait_for,
    write_final_rows,
)
from tests.support.fake_stripe import FakeStripe

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LATE = fastavro.parse_schema(load_schema(LATE_EVENT_SCHEMA))
DEAD = fastavro.parse_schema(load_schema(DEAD_LETTER_SCHEMA))


def _config(e2e_stack, name: str, api_base: str, flink: dict | None = None, **billing):
    from sinks.ledger import apply_schemas

    run = uuid.uuid4().hex[:6]
    ledger = {
        "enabled": True,
        "ledger_table": f"deliveries_{name}_{run}",
        "customers_table": f"customers_{name}_{run}",
        "carry_table": f"carry_{name}_{run}",
        **billing,
    }
    # A long idle timeout: a partition whose events arrive a little later never has them overtaken.
    event_time = {**e2e_stack.base["event_time"], "source_idle_timeout": "30s"}
    cfg, path = private_job(
        e2e_stack, name, stripe={"api_base": api_base}, billing=ledger, event_time=event_time, flink=flink or {}
    )
    apply_schemas(cfg)
    return cfg, path


def _cli(path, *args: str):
    return CliRunner().invoke(cli, ["--config", str(path), *args], catch_exceptions=False)


def _identifier(cfg, tenant: str, customer: str, meter: str, start: datetime) -> str:
    start_ms = int(start.replace(tzinfo=UTC).timestamp() * 1000)
    end_ms = start_ms + int(cfg.event_time.window_size.total_seconds() * 1000)
    return derive_identifier(
        WindowKey(tenant, customer, meter, "{}", from_epoch_ms(start_ms), from_epoch_ms(end_ms)),
        cfg.billing.identifier_prefix,
    )


def _ledger(cfg, identifiers) -> dict:
    return {d.identifier: d for d in fetch_deliveries(cfg) if d.identifier in identifiers}


def test_stripe_mock_dead_letters_replay_and_a_correction(e2e_stack):
    """Every request is validated by stripe-mock; unmapped customers are dead until replayed; a re-finalised window adds a correction."""
    cfg, path = _config(e2e_stack, "mock", e2e_stack.base["stripe"]["api_base"])
    size = cfg.event_time.window_size
    start = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
    windows = [
        closed_window(f"tenant-{t}", f"cust-{c}", meter, start + i * size, size, f"{1 + i + c}.25", 3)
        for t in range(2)
        for c in range(3)
        for meter in ("tokens", "api_calls")
        for i in range(3)
    ]
    for tenant in ("tenant-0", "tenant-1"):
        for customer in ("cust-0", "cust-1"):
            map_customer(cfg, tenant, customer, f"cus_{tenant[-1]}{customer[-1]}")
    publish_closed_windows(cfg, windows)
    job_id = flink_jobs.submit_billing(cfg, path)
    ids = {_identifier(cfg, w["tenant_id"], w["customer_id"], w["meter"], w["window_start"]): w for w in windows}
    try:
        wait_for(
            lambda: (
                len(_ledger(cfg, ids)) == len(ids)
                and all(d.status in ("sent", "dead") for d in _ledger(cfg, ids).values())
            ),
            180,
            "a final ledger state for every window",
        )
        deliveries = _ledger(cfg, ids)
        for identifier, w in ids.items():
            d = deliveries[identifier]
            assert d.quantity == w["quantity"] and d.kind == "window" and d.revision == 3
            if w["customer_id"] == "cust-2":
                assert (
                    d.status == "dead" and "no billing customer mapped" in d.last_error and d.first_attempt_at is None
                )
            else:
                assert d.status == "sent" and d.attempts == 1, d.last_error
        # Whole values, the fraction carried (billing/whole_values.py): per customer and meter the
        # values add up to the whole part of the quantities (all in one month).
        billed: dict[tuple, list[Decimal]] = {}
        for identifier, w in ids.items():
            if deliveries[identifier].status == "sent":
                acc = billed.setdefault(
                    (w["tenant_id"], w["customer_id"], w["meter"], billing_period_start(w["window_start"])),
                    [Decimal(0), Decimal(0)],
                )
                acc[0] += Decimal(deliveries[identifier].value)
                acc[1] += w["quantity"]
        assert all(value == quantity.to_integral_value(rounding=ROUND_FLOOR) for value, quantity in billed.values()), (
            billed
        )
        # A reprocessing publishes one window again with another final value: the difference is billed.
        changed = {**windows[0], "quantity": windows[0]["quantity"] + Decimal("2.5"), "event_count": 5, "revision": 5}
        publish_closed_windows(cfg, [changed])
        parent = _identifier(
            cfg, changed["tenant_id"], changed["customer_id"], changed["meter"], changed["window_start"]
        )
        correction = derive_correction_identifier(parent, 5)
        wait_for(
            lambda: (row := _ledger(cfg, {correction}).get(correction)) is not None and row.status == "sent",
            120,
            "the correction accepted",
        )
    finally:
        flink_jobs.cancel(cfg, job_id)
    row = _ledger(cfg, {correction})[correction]
    # 1.25 + 2.25 + 3.25 billed 6; the correction's 2.5 completes 9.25: 3 more.
    assert (row.kind, row.window_identifier, row.quantity, row.value, row.revision) == (
        "correction",
        parent,
        Decimal("2.5"),
        "3",
        5,
    )
    write_final_rows(cfg, [changed if w is windows[0] else w for w in windows])
    result = _cli(path, "reconcile", "--tenant", "tenant-0", "--grace", "0s", "--period", "day")
    assert result.exit_code == 1 and "not billed" in result.output and "no billing customer mapped" in result.output
    assert "corrections (billed as the difference)" in result.output and "2.5" in result.output

    assert _cli(path, "billing", "customers", "set", "tenant-0", "cust-2", "cus_02").exit_code == 0
    assert _cli(path, "billing", "customers", "set", "tenant-1", "cust-2", "cus_12").exit_code == 0
    replay = _cli(path, "billing", "replay")
    assert replay.exit_code == 0, replay.output
    assert all(d.status == "sent" for d in _ledger(cfg, ids).values())
    for tenant in ("tenant-0", "tenant-1"):
        ok = _cli(path, "reconcile", "--tenant", tenant, "--grace", "0s")
        assert ok.exit_code == 0, ok.output


def _produce(cfg, seed: int, count: int, customers: int, minutes: int):
    """Events over the given minutes, ending well in the past, plus closing events: every window closes."""
    start = (datetime.now(UTC) - timedelta(minutes=minutes + 20)).replace(second=0, microsecond=0)
    events = list(
        synthetic_events(
            SyntheticSpec(
                count=count, tenants=2, customers=customers, start=start, span=timedelta(minutes=minutes), seed=seed
            )
        )
    )
    send_events(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, events)
    send_events(
        cfg.kafka.bootstrap_servers,
        cfg.kafka.usage_events_topic,
        closing_events(start + timedelta(minutes=minutes), cfg.kafka.partitions),
        partition_for=lambda i, e: i,
    )
    return start, events


def test_provider_down_for_a_minute_while_events_flow(e2e_stack):
    """503 for a minute: usage rows go final and the late and dead-letter topics commit meanwhile; billing then catches up, one event per window."""
    fake = FakeStripe().start()
    try:
        cfg, path = _config(
            e2e_stack,
            "outage",
            fake.url,
            max_attempts=60,
            initial_backoff="500ms",
            max_backoff="4s",
            request_timeout="3s",
            retry_lease="10s",
        )
        for t in range(2):
            for c in range(3):
                map_customer(cfg, f"tenant-{t}", f"cust-{c}", f"cus_{t}{c}")
        usage_job = flink_jobs.submit(cfg, path)
        billing_job = flink_jobs.submit_billing(cfg, path)
        outage_s = 60
        try:
            fake.fail_for(outage_s, status=503, retry_after=None)
            start, events = _produce(cfg, seed=21, count=3000, customers=3, minutes=2)
            expected = expected_totals(events, cfg.event_time.window_size)
            wait_for(lambda: fake.requests, 120, "the first billing call (the outage starts with it)")
            outage_end = time.time() + outage_s - 1
            checkpoints_before = flink_jobs.completed_checkpoints(cfg, usage_job)
            late = [dict(e, event_id=f"late-{e['event_id']}") for e in events[:20]]  # their windows closed long ago
            send_events(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, late)
            send_raw(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, [b"not avro at all", b"\x00\x01"])

            def metering_done() -> bool:
                rows = table_totals(cfg)
                return {k: (r.quantity, r.event_count) for k, r in rows.items()} == expected and all(
                    r.is_final for r in rows.values()
                )

            wait_for(metering_done, 60, "final usage rows while billing is down")
            wait_for(
                lambda: (
                    len(
                        read_topic(
                            cfg.kafka.bootstrap_servers,
                            cfg.kafka.late_events_topic,
                            lambda v: fastavro.schemaless_reader(io.BytesIO(v), LATE),
                            timeout=10,
                        )
                    )
                    == len(late)
                ),
                30,
                "late events committed",
            )
            wait_for(
                lambda: (
                    len(
                        read_topic(
                            cfg.kafka.bootstrap_servers,
                            cfg.kafka.dead_letter_topic,
                            lambda v: fastavro.schemaless_reader(io.BytesIO(v), DEAD),
                            timeout=10,
                        )
                    )
                    == 2
                ),
                30,
                "dead letters committed",
            )
            wait_for(
                lambda: flink_jobs.completed_checkpoints(cfg, usage_job) >= checkpoints_before + 2,
                30,
                "usage job checkpoints while billing fails",
            )
            assert time.time() < outage_end, "metering finished only after the provider came back"
            during = Counter(d.status for d in fetch_deliveries(cfg))
            assert fake.events == [] and during["sent"] == 0 and during["failed"] + during["pending"] > 0, during
            print(f"during the outage: ledger {dict(during)}, {len(fake.requests)} calls refused")

            ids = {_identifier(cfg, t, c, m, s) for (t, c, m, s) in expected}

            def caught_up() -> bool:
                rows = _ledger(cfg, ids)
                return len(rows) == len(ids) and all(d.status == "sent" for d in rows.values())

            wait_for(caught_up, 180, "billing to catch up after the outage")
            caught_up_at = time.time()
        finally:
            flink_jobs.cancel(cfg, billing_job)
            flink_jobs.cancel(cfg, usage_job)
        print(f"caught up {caught_up_at - outage_end:.0f}s after the outage; fake answers {fake.outcomes()}")
        accepted = Counter(e.identifier for e in fake.events)
        assert set(accepted) == ids and set(accepted.values()) == {1}, "exactly one accepted event per final window"
        # Whole values with the fraction carried (the fake refuses any other, as Stripe does): per
        # customer, meter and month the provider's total is the whole part of the exact total.
        finals = table_totals(cfg)
        billed: dict[tuple, Decimal] = {}
        metered: dict[tuple, Decimal] = {}
        for e in fake.events:
            d = _ledger(cfg, {e.identifier})[e.identifier]
            key = (d.tenant_id, d.customer_id, d.meter, billing_period_start(d.window_start))
            billed[key] = billed.get(key, Decimal(0)) + e.value
            metered[key] = (
                metered.get(key, Decimal(0)) + finals[(d.tenant_id, d.customer_id, d.meter, d.window_start)].quantity
            )
        assert any(q != q.to_integral_value() for q in metered.values()), "the usage has fractions to carry"
        assert billed == {k: q.to_integral_value(rounding=ROUND_FLOOR) for k, q in metered.items()}
        for tenant in ("tenant-0", "tenant-1"):
            ok = _cli(path, "reconcile", "--tenant", tenant, "--grace", "0s")
            assert ok.exit_code == 0, ok.output
    finally:
        fake.stop()


def test_taskmanager_killed_with_calls_in_flight(e2e_stack):
    """kill -9 while calls are in flight: the job restarts from a checkpoint taken before them; they are re-sent with the same identifiers."""
    fake = FakeStripe(latency=3.0).start()
    try:
        cfg, path = _config(
            e2e_stack,
            "tmkill",
            fake.url,
            flink={"parallelism": 2},
            max_in_flight=6,
            request_timeout="10s",
            retry_lease="30s",
        )
        size = cfg.event_time.window_size
        start = (datetime.now(UTC) - timedelta(hours=1)).replace(second=0, microsecond=0)
        windows = [
            closed_window("tenant-0", f"cust-{c}", "tokens", start + i * size, size, f"{c}.{i}5", 2)
            for c in range(20)
            for i in range(3)
        ]
        for c in range(20):
            map_customer(cfg, "tenant-0", f"cust-{c}", f"cus_{c}")
        ids = {_identifier(cfg, w["tenant_id"], w["customer_id"], w["meter"], w["window_start"]): w for w in windows}
        job_id = flink_jobs.submit_billing(cfg, path)
        try:
            # A completed checkpoint before any window: the restore must come from it, not from nothing.
            wait_for(lambda: flink_jobs.completed_checkpoints(cfg, job_id) >= 1, 60, "a first checkpoint")
            publish_closed_windows(cfg, windows)
            in_flight, killed_at = kill_with_calls_in_flight(cfg, job_id, fake, 6, 120)
            wait_for(
                lambda: (
                    all(d.status == "sent" for d in _ledger(cfg, ids).values()) and len(_ledger(cfg, ids)) == len(ids)
                ),
                180,
                "every window sent",
            )
            stats = flink_jobs.checkpoint_stats(cfg, job_id)
            # The REST metrics are a cache the JobManager refreshes (flink-conf: metrics.fetcher): the
            # restart already proven from the job's timestamps shows in numRestarts within that.
            wait_for(lambda: flink_jobs.restarts(cfg, job_id) >= 1, 30, "numRestarts to count the restart")
            restarts = flink_jobs.restarts(cfg, job_id)
        finally:
            flink_jobs.cancel(cfg, job_id)
        restored = restored_before(stats, killed_at)
        print(
            f"in flight at the kill: {len(in_flight)}; restarts {restarts}; restored checkpoint {restored['id']}; fake {fake.outcomes()}"
        )
        assert restarts >= 1
        assert len(in_flight) >= 6
        accepted = Counter(e.identifier for e in fake.events)
        assert set(accepted) == set(ids) and set(accepted.values()) == {1}, "one accepted event per window"
        for identifier in in_flight:
            assert fake.attempts_for(identifier) >= 2, (
                "a call in flight at the kill is sent again with the same identifier"
            )
        assert fake.outcomes().get("replayed", 0) >= 1, (
            "the provider replayed a first answer the killed worker never read"
        )
        # Each call sent again carried the value fixed at its first attempt; per customer the values
        # add up to the whole part of the quantities.
        rows = _ledger(cfg, set(ids))
        assert all(fake.accepted[i].value == Decimal(rows[i].value) for i in ids)
        assert _carried_totals(fake, ids) == _whole_totals(ids.values())
    finally:
        fake.stop()


def _carried_totals(fake: FakeStripe, ids: dict, extra: dict | None = None) -> dict[tuple, Decimal]:
    """What the provider holds per (tenant, customer, meter, month) for these windows (and extra identifiers, each of a window)."""
    totals: dict[tuple, Decimal] = {}
    for identifier, w in [*ids.items(), *(extra or {}).items()]:
        key = (w["tenant_id"], w["customer_id"], w["meter"], billing_period_start(w["window_start"]))
        totals[key] = totals.get(key, Decimal(0)) + fake.accepted[identifier].value
    return totals


def _whole_totals(windows, extra: Iterable[tuple[dict, Decimal]] = ()) -> dict[tuple, Decimal]:
    """The whole part of the exact total per (tenant, customer, meter, month): what carried values add up to."""
    exact: dict[tuple, Decimal] = {}
    for w, quantity in [*((w, w["quantity"]) for w in windows), *extra]:
        key = (w["tenant_id"], w["customer_id"], w["meter"], billing_period_start(w["window_start"]))
        exact[key] = exact.get(key, Decimal(0)) + quantity
    return {k: v.to_integral_value(rounding=ROUND_FLOOR) for k, v in exact.items()}


def test_final_windows_that_never_reached_billing_are_republished_once(e2e_stack):
    """Final in Postgres, missing from the closed-windows topic (an output transaction Kafka aborted), or there only at an
    older revision: reconcile shows them, `billing republish` publishes them again, the provider gets each once or the difference."""
    fake = FakeStripe().start()
    try:
        cfg, path = _config(e2e_stack, "republish", fake.url)
        size = cfg.event_time.window_size
        start = (datetime.now(UTC) - timedelta(hours=3)).replace(second=0, microsecond=0)
        windows = [
            closed_window("tenant-r", f"cust-{c}", "tokens", start + i * size, size, f"{c}.{i}5", 3)
            for c in range(2)
            for i in range(3)
        ]
        map_customer(cfg, "tenant-r", "cust-0", "cus_r0")
        map_customer(cfg, "tenant-r", "cust-1", "cus_r1")
        ids = {_identifier(cfg, w["tenant_id"], w["customer_id"], w["meter"], w["window_start"]): w for w in windows}
        published = windows[:4]  # the last two never reached the topic
        write_final_rows(cfg, windows)
        publish_closed_windows(cfg, published)
        job_id = flink_jobs.submit_billing(cfg, path)
        try:
            first = {i for i, w in ids.items() if w in published}
            wait_for(
                lambda: all(d.status == "sent" for d in _ledger(cfg, first).values()) and len(_ledger(cfg, first)) == 4,
                180,
                "the published windows sent",
            )
            # The usage job closed window 0 again with two more events; that record was lost too.
            changed = {
                **windows[0],
                "quantity": windows[0]["quantity"] + Decimal("1.5"),
                "event_count": 5,
                "revision": 5,
            }
            write_final_rows(cfg, [changed])
            found = _cli(path, "reconcile", "--grace", "0s", "--tenant", "tenant-r", "--format", "json")
            kinds = Counter(d["kind"] for d in json.loads(found.stdout)["discrepancies"])
            assert found.exit_code == 1 and kinds == {"not billed": 2, "billed differently": 1}, found.output
            dry = _cli(path, "billing", "republish", "--grace", "0s", "--tenant", "tenant-r", "--dry-run")
            assert dry.exit_code == 0 and "3 final windows would be published again" in dry.output, dry.output
            assert _cli(path, "billing", "republish", "--grace", "0s", "--tenant", "tenant-r").exit_code == 0
            correction = derive_correction_identifier(
                _identifier(cfg, "tenant-r", "cust-0", "tokens", windows[0]["window_start"]), 5
            )
            every = set(ids) | {correction}
            wait_for(
                lambda: len(_ledger(cfg, every)) == 7 and all(d.status == "sent" for d in _ledger(cfg, every).values()),
                180,
                "the republished windows sent",
            )
            again = _cli(path, "billing", "republish", "--grace", "0s", "--tenant", "tenant-r")
            assert again.exit_code == 0 and "0 final windows published again" in again.output, again.output
            agreed = _cli(path, "reconcile", "--grace", "0s", "--tenant", "tenant-r")
            assert agreed.exit_code == 0, agreed.output
        finally:
            flink_jobs.cancel(cfg, job_id)
        accepted = Counter(e.identifier for e in fake.events)
        assert set(accepted) == every and set(accepted.values()) == {1}, accepted
        # cust-0: 0.05 + 0.15 + 0.25 billed 0; the correction's 1.5 completes 1.95: 1.
        assert fake.accepted[correction].value == Decimal(1)
        assert _carried_totals(fake, ids, {correction: windows[0]}) == _whole_totals(
            windows, [(windows[0], Decimal("1.5"))]
        )
    finally:
        fake.stop()
