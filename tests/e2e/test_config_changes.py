"""Changing the allowed lateness across stop-with-savepoint and resubmit, on the real stack.

Window 10 s, watermark delay 2 s, allowed lateness 10 s until the stop, then raised to 30 s (one
test) or lowered to 1 s (the other). W0 = [T, T+10 s), W1 = [T+10, T+20), ... The job is stopped
with the watermark exactly at W1's close under 10 s (T+29.999 s): W0 and W1 are final in Postgres
and published, W2 has fired and is still open.

The oracle is the lateness rule itself (``meterflow.windowing.is_late_after``): an event is late iff its
window is closed under the lateness in force, or was closed before the change (its end is at most
the closed-through boundary, T+20 s here). Each batch below is sent with a known watermark and a
known lateness, so every event's fate is fixed:

1. **before the stop** (10 s): ``base_first`` in [T, T+25 s) with duplicates, one clock event per
   partition (watermark T+29.999 s); W2's within-lateness events, counted; then beyond-lateness
   events of W0, boundary events of W1 (watermark exactly at end - 1 ms + lateness), duplicates and
   bad records in flight when the stop is requested: their fate is the same on either side of it.
2. **while stopped**, judged by the resubmitted job (held watermark T+29.999 s, new lateness): W0,
   W1 (open under a 30 s lateness, closed before: late), W2 (open under both), duplicates, bad records.
3. **mid**: ``base_second`` in [T+30, T+55 s), then a clock event per partition (watermark T+55 s);
   events of W1..W5. Raised: W2 and W3, closed under the old lateness, are open. Lowered: W2, W3
   and W4 are closed (W2 and W4 were open under the old lateness when they closed).
4. **after**: a clock event per partition puts the watermark exactly on a close under the new
   lateness (raised: W2 at T+59.999 s; lowered: W5 at T+60.999 s); events of W0, W2, W3, W5, duplicates,
   bad records; then the closers, which close every window.
"""

from __future__ import annotations

import os
import random
import time
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from connectors.avro_codec import UsageEvent
from connectors.producer import send_events
from meterflow.local import flink_jobs
from sinks.postgres import apply_schema
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
from tests.e2e.scenario import WATERMARK_DELAY, WINDOW, base_events, malformed_records

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EVENTS = int(os.environ.get("MF_TEST_E2E_EVENTS", "30000"))
RISKY = 60  # events per window and batch
OLD_LATENESS = timedelta(seconds=10)


def run_lateness_change(e2e_stack, name: str, new_lateness: timedelta, boundary_window: int) -> None:
    """Play the batches; stop with a savepoint; resubmit with ``new_lateness``; check every record's place."""
    cfg, path = private_job(
        e2e_stack,
        name,
        event_time={
            "window_size": "10s",
            "watermark_delay": "2s",
            "allowed_lateness": "10s",
            "source_idle_timeout": "5s",
        },
    )
    assert (cfg.event_time.window_size, cfg.event_time.watermark_delay, cfg.event_time.allowed_lateness) == (
        WINDOW,
        WATERMARK_DELAY,
        OLD_LATENESS,
    )
    assert cfg.flink.parallelism == 2
    apply_schema(cfg.postgres)
    rng = random.Random(name)
    start = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
    seconds = lambda s: start + timedelta(seconds=s)
    partitions = cfg.kafka.partitions
    old, new = to_ms(OLD_LATENESS), to_ms(new_lateness)
    stop_wm = to_ms(seconds(29.999) - datetime.fromtimestamp(0, UTC))  # W1's close under 10 s
    mid_wm = stop_wm + 25_001  # T+55 s
    # The watermark exactly at end - 1 ms + the new lateness of the boundary window.
    after_wm = to_ms(start + (boundary_window + 1) * WINDOW - datetime.fromtimestamp(0, UTC)) - 1 + new

    base_first = base_events(rng, 1, start, 0, EVENTS // 2, timedelta(0), timedelta(seconds=25))
    base_second = base_events(
        rng, 1, start, EVENTS // 2, EVENTS - EVENTS // 2, timedelta(seconds=30), timedelta(seconds=25), jitter_ms=0
    )
    dup_first = rng.sample(base_first, len(base_first) // 10)
    dup_second = rng.sample(base_second, len(base_second) // 10)
    clocks = [
        clock_events(
            start, f"clk-stop-{name}", datetime.fromtimestamp(stop_wm / 1000, UTC) + WATERMARK_DELAY, partitions
        ),
        clock_events(
            start, f"clk-mid-{name}", datetime.fromtimestamp(mid_wm / 1000, UTC) + WATERMARK_DELAY, partitions
        ),
        clock_events(
            start, f"clk-after-{name}", datetime.fromtimestamp(after_wm / 1000, UTC) + WATERMARK_DELAY, partitions
        ),
    ]
    before = [(old, stop_wm)]
    within = Batch("within", in_windows(rng, start, f"wl-{name}", [2], RISKY), before)
    in_flight = Batch(
        "in-flight",
        in_windows(rng, start, f"if-{name}", [0, 1], RISKY),
        before,
        rng.sample(base_first, RISKY),
        malformed_records(base_first[0], f"{name}-if"),
    )
    stopped = Batch(
        "stopped",
        in_windows(rng, start, f"st-{name}", [0, 1, 2], RISKY),
        [*before, (new, stop_wm)],
        rng.sample(base_first, RISKY),
        malformed_records(base_first[0], f"{name}-st"),
    )
    # W5's events of the mid batch stop at T+57 s: none moves the watermark past T+55 s.
    mid_events = in_windows(rng, start, f"md-{name}", [1, 2, 3, 4], RISKY) + in_windows(
        rng, start, f"md5-{name}", [5], RISKY, span=timedelta(seconds=7, milliseconds=1)
    )
    mid = Batch("mid", mid_events, [*before, (new, mid_wm)], rng.sample(base_second, RISKY))
    after = Batch(
        "after",
        in_windows(rng, start, f"af-{name}", [0, 2, 3, 5], RISKY),
        [*before, (new, after_wm)],
        rng.sample(base_second, RISKY),
        malformed_records(base_first[0], f"{name}-af"),
    )
    batches = [within, in_flight, stopped, mid, after]
    closers = closing_events(start + timedelta(minutes=5), partitions)
    assert not within.late() and len(in_flight.late()) == len(in_flight.events), (
        "the in-flight batch has one fate on either side of the stop"
    )

    bootstrap, topic = cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic
    late_topic = lambda: read_topic(bootstrap, cfg.kafka.late_events_topic, avro_decoder(LATE_SCHEMA))
    counted_so_far: list[UsageEvent] = []

    def send(batch: Batch) -> None:
        send_events(bootstrap, topic, batch.events + batch.duplicates)
        send_raw(bootstrap, topic, batch.bad)

    def wait_decided(batches_sent: list[Batch], what: str, fired_by_ms: int) -> None:
        """Every late event of the batches sent is in the late topic; the windows their counted events
        went to, those fired by ``fired_by_ms`` (end - 1 ms), have every event counted so far in Postgres."""
        late = {e["event_id"] for b in batches_sent for e in b.late()}
        wait_for(lambda: late <= {r["event_id"] for r in late_topic()}, 300, f"late events {what}")
        expected = expected_totals(counted_so_far, WINDOW)
        touched = expected_totals([e for b in batches_sent for e in b.counted()], WINDOW)
        keys = [
            k
            for k in touched
            if to_ms(k[3].replace(tzinfo=UTC) + WINDOW - datetime.fromtimestamp(0, UTC)) - 1 <= fired_by_ms
        ]
        wait_for(
            lambda: all(totals_of(table_totals(cfg)).get(k) == expected[k] for k in keys), 300, f"counted events {what}"
        )

    job_id = flink_jobs.submit(cfg, path)
    try:
        send_events(bootstrap, topic, base_first + dup_first)
        send_events(bootstrap, topic, clocks[0], partition_for=lambda i, e: i)
        counted_so_far += base_first + clocks[0]
        w1_start = start.replace(tzinfo=None) + WINDOW
        first = {k: v for k, v in expected_totals(base_first, WINDOW).items() if k[3] <= w1_start}
        wait_for(
            lambda: (
                {
                    k: (r.quantity, r.event_count)
                    for k, r in table_totals(cfg).items()
                    if k[3] <= w1_start and r.is_final
                }
                == first
            ),
            300,
            "W0 and W1 final in Postgres",
        )
        send(within)
        counted_so_far += within.counted()
        wait_decided([within], "of W2 before the stop", stop_wm)
        # In flight: late, boundary, duplicate and bad records, the stop requested as soon as they are acknowledged.
        send(in_flight)
        stopped_at = int(time.time() * 1000)
        savepoint = flink_jobs.stop_with_savepoint(cfg, job_id)
        send(stopped)
        data = yaml.safe_load(path.read_text())
        data["event_time"]["allowed_lateness"] = f"{new // 1000}s"
        changed = path.with_name(f"{path.stem}-lateness{new // 1000}s.yaml")
        changed.write_text(yaml.safe_dump(data))
        job_id = flink_jobs.submit(cfg, changed, savepoint=savepoint)
        # The REST checkpoint statistics are a cache: the restore shows once it is refreshed.
        wait_for(
            lambda: bool((flink_jobs.checkpoint_stats(cfg, job_id).get("latest") or {}).get("restored")),
            30,
            "the restore in the checkpoint statistics",
        )
        restored = (flink_jobs.checkpoint_stats(cfg, job_id).get("latest") or {}).get("restored") or {}
        counted_so_far += stopped.counted()
        wait_decided([in_flight, stopped], "sent around the stop", stop_wm)

        send_events(bootstrap, topic, base_second + dup_second)
        send_events(bootstrap, topic, clocks[1], partition_for=lambda i, e: i)
        counted_so_far += base_second + clocks[1]
        wait_watermark(cfg, job_id, mid_wm)
        send(mid)
        counted_so_far += mid.counted()
        wait_decided([mid], "mid-stream", mid_wm)

        send_events(bootstrap, topic, clocks[2], partition_for=lambda i, e: i)
        counted_so_far += clocks[2]
        wait_watermark(cfg, job_id, after_wm)
        send(after)
        counted_so_far += after.counted()
        send_events(bootstrap, topic, closers, partition_for=lambda i, e: i)
        wait_decided([after], "after the change", after_wm)
        final = expected_totals(counted_so_far, WINDOW)
        wait_for(lambda: totals_of(table_totals(cfg)) == final, 300, "final totals in Postgres")
        wait_for(lambda: all(r.is_final for r in table_totals(cfg).values()), 120, "every window marked final")
        time.sleep(2 * cfg.flink.checkpoint_interval.total_seconds())  # anything extra would be committed by now
        late = late_topic()
        dead = read_topic(bootstrap, cfg.kafka.dead_letter_topic, avro_decoder(DEAD_SCHEMA))
        closed = read_topic(bootstrap, cfg.kafka.closed_windows_topic, avro_decoder(CLOSED_SCHEMA))
        rows = table_totals(cfg)
        restarted_at = flink_jobs.job_details(cfg, job_id)["timestamps"].get("RESTARTING", 0)
    finally:
        flink_jobs.cancel(cfg, job_id)

    # The REST API shows the resubmitted job restored the savepoint taken at the stop, and never restarted.
    assert restored.get("is_savepoint") and restored.get("restore_timestamp", 0) > stopped_at, restored
    assert restarted_at == 0
    # Exactly the events the rule calls late are in the late topic, each once, with the watermark they met.
    expected_late = {e["event_id"]: b.watermark_ms for b in batches for e in b.late()}
    assert sorted(r["event_id"] for r in late) == sorted(expected_late)
    for r in late:
        assert to_ms(r["watermark"] - datetime.fromtimestamp(0, UTC)) == expected_late[r["event_id"]], r
        assert r["window_start"] <= r["event_time"] < r["window_end"]
    bad = [b for batch in batches for b in batch.bad]
    assert sorted(r["payload"] for r in dead) == sorted(bad)
    # Accounting identity: every record sent is counted once, late, a duplicate or a dead letter.
    sent = (
        base_first
        + dup_first
        + base_second
        + dup_second
        + [e for c in clocks for e in c]
        + [e for b in batches for e in b.events + b.duplicates]
    )
    duplicates = len(sent) - len({e["event_id"] for e in sent})
    counted = sum(r.event_count for r in rows.values())
    assert counted == len(counted_so_far)
    assert counted + len(late) + duplicates + len(dead) == len(sent) + len(bad)
    # Exact windows against the oracle, every row final and complete.
    assert totals_of(rows) == expected_totals(counted_so_far, WINDOW)
    assert all(r.is_final and r.revision == r.event_count for r in rows.values())
    # The closed-windows topic published each window once, with its final value (the closers' windows stay open).
    published = {
        (c["tenant_id"], c["customer_id"], c["meter"], c["window_start"].replace(tzinfo=None)): (
            c["quantity"],
            c["event_count"],
        )
        for c in closed
        if c["tenant_id"] != CLOSER_TENANT
    }
    assert len(published) == len([c for c in closed if c["tenant_id"] != CLOSER_TENANT]), "a window was published twice"
    assert published == totals_of(rows)
    print(
        f"\nLATENESS_CHANGE scenario={name} lateness={old}->{new} ms sent={len(sent) + len(bad)} counted={counted} late={len(late)} "
        f"duplicates={duplicates} dead_letters={len(dead)} windows={len(rows)}"
    )


def test_raised_lateness_keeps_closed_windows_closed(e2e_stack):
    """10 s -> 30 s: W0 and W1, closed before the stop, stay closed (their events late); W2 and W3 reopen nothing, they stay open longer."""
    run_lateness_change(e2e_stack, "raise", timedelta(seconds=30), boundary_window=2)


def test_lowered_lateness_closes_windows_with_their_counts(e2e_stack):
    """10 s -> 1 s: windows open at the stop close earlier, with what they counted; later events of them are late."""
    run_lateness_change(e2e_stack, "lower", timedelta(seconds=1), boundary_window=5)
