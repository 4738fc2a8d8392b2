"""Idle partitions rejoining behind the watermark, then events within the allowed lateness, on the real stack.

Window 10 s, watermark delay 2 s, allowed lateness 10 s, source idle timeout 5 s, parallelism 2, 3
partitions, the billing job beside the usage job. W0 = [T, T+10 s), W1 = [T+10, T+20), ...

1. **all partitions**: base events in [T, T+25 s) with duplicates and bad records, then one clock
   event per partition: watermark T+22 s. W0 is final, W1 has fired and is open, W2 has not fired.
2. **silence**: no partition gets anything for three idle timeouts. Every partition was read up to
   its head, so each is idle.
3. **partition 0 alone**: events of W1 and W2 (on time), then a clock event moving partition 0 (and
   so, the others idle, the job) to T+40 s: W1 and W2 close with partition 0's events.
4. **partitions 1 and 2 rejoin** behind that watermark: events of W1 and W2 (late), of W3 (fired at
   T+39.999 s, open until T+49.999 s: each re-fires it) and of W4 (on time), duplicates, bad records.
5. **all partitions**: a clock event each, the watermark exactly at W3's close (T+49.999 s); boundary
   events of W3 (late), events of W4 (within its lateness); then the closers.

Whatever the idle partitions and re-fires do to the order rows reach the window closer, every
window must be published once with its final value: Postgres's final rows, the closed-windows topic
(``read_committed``) and the ledger's window deliveries agree, and no correction is owed.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from billing.deliveries import CustomerMapping
from connectors.avro_codec import UsageEvent
from connectors.producer import send_events
from meterflow.local import flink_jobs
from sinks.ledger import apply_schemas, fetch_deliveries, map_customers
from tests.e2e.batches import (
    CLOSED_SCHEMA,
    DEAD_SCHEMA,
    LATE_SCHEMA,
    Batch,
    avro_decoder,
    clock_events,
    in_windows,
    to_ms,
    totals_of,
)
from tests.e2e.helpers import (
    CLOSER_TENANT,
    closing_events,
    expected_totals,
    private_job,
    read_topic,
    send_raw,
    table_totals,
    wait_for,
    wait_watermark,
)
from tests.e2e.scenario import WINDOW, base_events, malformed_records

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LATENESS_MS = 10_000
IDLE_TIMEOUT_S = 5
RISKY = 40  # events per window and batch


def test_idle_partitions_rejoin_then_events_within_lateness(e2e_stack):
    run = uuid.uuid4().hex[:6]
    billing = {
        "enabled": True,
        "ledger_table": f"deliveries_rejoin_{run}",
        "customers_table": f"customers_rejoin_{run}",
        "carry_table": f"carry_rejoin_{run}",
    }
    cfg, path = private_job(
        e2e_stack,
        "rejoin",
        event_time={
            "window_size": "10s",
            "watermark_delay": "2s",
            "allowed_lateness": "10s",
            "source_idle_timeout": f"{IDLE_TIMEOUT_S}s",
        },
        billing=billing,
    )
    assert cfg.flink.parallelism == 2 and cfg.kafka.partitions == 3
    apply_schemas(cfg)
    rng = random.Random(run)
    start = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
    epoch = datetime.fromtimestamp(0, UTC)
    at = lambda seconds: start + timedelta(seconds=seconds)
    wm_a, wm_b = to_ms(at(22) - epoch), to_ms(at(40) - epoch)
    wm_d = to_ms(at(40) - epoch) - 1 + LATENESS_MS  # W3's close, exactly
    delay = cfg.event_time.watermark_delay
    partitions = cfg.kafka.partitions

    base = base_events(rng, 7, start, 0, 4_000, timedelta(0), timedelta(seconds=25))
    clock_a = clock_events(start, f"clk-a-{run}", at(22) + delay, partitions)
    alone = Batch("partition 0 alone", in_windows(rng, start, f"p0-{run}", [1, 2], RISKY), [(LATENESS_MS, wm_a)])
    clock_b = clock_events(start, f"clk-b-{run}", at(40) + delay, 1)
    rejoin = Batch(
        "partitions 1 and 2 rejoin",
        in_windows(rng, start, f"rj-{run}", [1, 2, 3, 4], RISKY, span=timedelta(seconds=7)),
        [(LATENESS_MS, wm_b)],
        rng.sample(base, RISKY),
        malformed_records(base[0], f"rejoin-{run}"),
    )
    clock_d = clock_events(start, f"clk-d-{run}", datetime.fromtimestamp(wm_d / 1000, UTC) + delay, partitions)
    # Boundary events of W3 (its last millisecond, met by a watermark exactly at its close) and W4's events.
    boundary = [
        {**e, "event_id": f"bd-{run}-{i}", "event_time": at(40) - timedelta(milliseconds=1)}
        for i, e in enumerate(in_windows(rng, start, f"bd-{run}", [3], RISKY))
    ]
    after = Batch(
        "after",
        boundary + in_windows(rng, start, f"af-{run}", [4], RISKY),
        [(LATENESS_MS, wm_d)],
        rng.sample(base, RISKY),
        malformed_records(base[0], f"after-{run}"),
    )
    closers = closing_events(start + timedelta(minutes=5), partitions)
    assert not alone.late() and len(rejoin.late()) == 2 * RISKY and len(after.late()) == RISKY
    map_customers(
        cfg,
        [
            CustomerMapping(e["tenant_id"], e["customer_id"], f"cus_{e['tenant_id']}_{e['customer_id']}")
            for e in base + clock_a + rejoin.events
        ],
    )

    bootstrap, topic = cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic
    late_topic = lambda: read_topic(bootstrap, cfg.kafka.late_events_topic, avro_decoder(LATE_SCHEMA))
    base_dups = rng.sample(base, len(base) // 10)
    base_bad = malformed_records(base[0], f"base-{run}")
    counted: list[UsageEvent] = [*base, *clock_a]

    job_id = flink_jobs.submit(cfg, path)
    billing_id = flink_jobs.submit_billing(cfg, path)
    try:
        send_events(bootstrap, topic, base + base_dups)
        send_raw(bootstrap, topic, base_bad)
        send_events(bootstrap, topic, clock_a, partition_for=lambda i, e: i)
        w0 = {k: v for k, v in expected_totals(base, WINDOW).items() if k[3] == start.replace(tzinfo=None)}
        wait_for(
            lambda: {k: (r.quantity, r.event_count) for k, r in table_totals(cfg).items() if r.is_final} == w0,
            300,
            "W0 final in Postgres",
        )
        # Every partition was read up to its head: after the idle timeout each one is idle.
        time.sleep(3 * IDLE_TIMEOUT_S)

        send_events(bootstrap, topic, alone.events, partition_for=lambda i, e: 0)
        send_events(bootstrap, topic, clock_b, partition_for=lambda i, e: 0)
        counted += alone.counted() + clock_b
        wait_watermark(cfg, job_id, wm_b)
        w1_w2 = expected_totals(counted, WINDOW)
        w1_w2 = {k: v for k, v in w1_w2.items() if k[3] in (at(10).replace(tzinfo=None), at(20).replace(tzinfo=None))}
        wait_for(
            lambda: (
                {k: (r.quantity, r.event_count) for k, r in table_totals(cfg).items() if k in w1_w2 and r.is_final}
                == w1_w2
            ),
            300,
            "W1 and W2 final with partition 0's events",
        )

        send_events(bootstrap, topic, rejoin.events + rejoin.duplicates, partition_for=lambda i, e: 1 + i % 2)
        send_raw(bootstrap, topic, rejoin.bad, partition=1)
        counted += rejoin.counted()
        wait_for(
            lambda: {e["event_id"] for e in rejoin.late()} <= {r["event_id"] for r in late_topic()},
            300,
            "the rejoining partitions' late events",
        )

        send_events(bootstrap, topic, clock_d, partition_for=lambda i, e: i)
        counted += clock_d
        wait_watermark(cfg, job_id, wm_d)
        send_events(bootstrap, topic, after.events + after.duplicates)
        send_raw(bootstrap, topic, after.bad)
        counted += after.counted()
        send_events(bootstrap, topic, closers, partition_for=lambda i, e: i)
        final = expected_totals(counted, WINDOW)
        wait_for(
            lambda: totals_of({k: r for k, r in table_totals(cfg).items() if k[0] != CLOSER_TENANT}) == final,
            300,
            "final totals in Postgres",
        )
        wait_for(
            lambda: all(r.is_final for k, r in table_totals(cfg).items() if k[0] != CLOSER_TENANT),
            120,
            "every window marked final",
        )
        wait_for(
            lambda: len([d for d in fetch_deliveries(cfg) if d.status == "sent"]) >= len(final),
            300,
            "every window billed",
        )
        time.sleep(2 * cfg.flink.checkpoint_interval.total_seconds())  # anything extra would be committed by now
        late = late_topic()
        dead = read_topic(bootstrap, cfg.kafka.dead_letter_topic, avro_decoder(DEAD_SCHEMA))
        closed = [
            c
            for c in read_topic(bootstrap, cfg.kafka.closed_windows_topic, avro_decoder(CLOSED_SCHEMA))
            if c["tenant_id"] != CLOSER_TENANT
        ]
        rows = {k: r for k, r in table_totals(cfg).items() if k[0] != CLOSER_TENANT}
        deliveries = fetch_deliveries(cfg)
        restarted_at = flink_jobs.job_details(cfg, job_id)["timestamps"].get("RESTARTING", 0)
    finally:
        flink_jobs.cancel(cfg, billing_id)
        flink_jobs.cancel(cfg, job_id)

    assert restarted_at == 0
    # Exactly the events the rule calls late are in the late topic, each once, with the watermark they met.
    batches = [alone, rejoin, after]
    expected_late = {e["event_id"]: b.watermark_ms for b in batches for e in b.late()}
    assert sorted(r["event_id"] for r in late) == sorted(expected_late)
    for r in late:
        assert to_ms(r["watermark"] - epoch) >= expected_late[r["event_id"]], r
    assert {to_ms(r["watermark"] - epoch) for r in late if r["event_id"].startswith("bd-")} == {wm_d}
    assert sorted(r["payload"] for r in dead) == sorted(base_bad + rejoin.bad + after.bad)
    # Accounting identity.
    sent = [*base, *base_dups, *clock_a, *clock_b, *clock_d] + [e for b in batches for e in b.events + b.duplicates]
    duplicates = len(sent) - len({e["event_id"] for e in sent})
    n_counted = sum(r.event_count for r in rows.values())
    assert n_counted == len(counted)
    assert n_counted + len(late) + duplicates == len(sent)
    # Exact windows, every row final and complete; the re-fired W3 counted the rejoining partitions' events.
    assert totals_of(rows) == expected_totals(counted, WINDOW)
    assert all(r.is_final and r.revision == r.event_count for r in rows.values())
    # One truth: each window published once, with Postgres's final value, and billed once at it.
    published = {
        (c["tenant_id"], c["customer_id"], c["meter"], c["window_start"].replace(tzinfo=None)): (
            c["quantity"],
            c["event_count"],
        )
        for c in closed
    }
    assert len(published) == len(closed), "a window was published twice"
    assert published == totals_of(rows)
    windows = [d for d in deliveries if d.kind == "window" and d.tenant_id != CLOSER_TENANT]
    key = lambda d: (d.tenant_id, d.customer_id, d.meter, d.window_start.astimezone(UTC).replace(tzinfo=None))
    assert sorted(key(d) for d in windows) == sorted(rows)
    assert {key(d): (d.quantity, d.event_count) for d in windows} == totals_of(rows)
    assert all(d.status == "sent" for d in windows)
    assert [d for d in deliveries if d.kind != "window"] == [], (
        "a correction was owed: the closer published a window twice"
    )
    print(
        f"\nIDLE_REJOIN sent={len(sent)} counted={n_counted} late={len(late)} duplicates={duplicates} dead_letters={len(dead)} windows={len(rows)}"
    )
