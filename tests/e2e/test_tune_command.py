"""`meterflow tune` against the real Kafka of the e2e stack: the scan reads the chosen time range of
the input topic per partition, decodes the Avro events, and recommends what the pure core computes."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner

from connectors.avro_codec import UsageEvent
from connectors.producer import send_events
from meterflow.commands import cli
from meterflow.config_values import format_duration
from meterflow.tune import Sample, evaluate, recommend, replay_needs
from tests.e2e.helpers import private_job, send_raw

pytestmark = [pytest.mark.e2e]


def _event(i: int, partition: int, at: datetime) -> UsageEvent:
    return UsageEvent(
        event_id=f"tune-{partition}-{i}",
        tenant_id="tenant-t",
        customer_id=f"c{partition}",
        meter="api_calls",
        quantity=Decimal(1),
        event_time=at,
        dimensions={},
    )


def test_tune_recommends_from_the_scanned_range(e2e_stack, tmp_path):
    cfg, path = private_job(e2e_stack, "tune")
    topic = cfg.kafka.usage_events_topic
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    e0 = datetime.fromtimestamp((now_ms - 7_200_000) // 10_000 * 10, UTC)  # a window start (10 s windows)

    # Before the range: events that would need an hour; the scan must not see them. The topic stamps
    # records with the broker's append time (LogAppendTime), so the range is made by waiting.
    before = [
        (p, {**_event(i, p, e0 - timedelta(hours=1)), "event_id": f"old-{p}-{i}"}) for p in (0, 1) for i in range(20)
    ]
    send_events(cfg.kafka.bootstrap_servers, topic, [e for _, e in before], partition_for=lambda i, e: before[i][0])
    time.sleep(2.5)
    written_ms = int(datetime.now(UTC).timestamp() * 1000)  # the scanned range starts 1 s before this
    # In the range, partition 0: 1 000 events 100 ms apart, every 37th of them 7 s behind its neighbours;
    # partition 1: 500 in order, and one 30 s behind.
    inside = []
    for i in range(1_000):
        delayed = i % 37 == 36
        inside.append(
            (
                0,
                _event(i, 0, e0 + timedelta(milliseconds=100 * i) - timedelta(seconds=7 if delayed else 0)),
                written_ms + i,
            )
        )
    for i in range(500):
        inside.append((1, _event(i, 1, e0 + timedelta(milliseconds=100 * i)), written_ms + i))
    inside.append((1, _event(500, 1, e0 + timedelta(milliseconds=100 * 499) - timedelta(seconds=30)), written_ms + 500))
    send_events(cfg.kafka.bootstrap_servers, topic, [e for _, e, _ in inside], partition_for=lambda i, e: inside[i][0])
    send_raw(cfg.kafka.bootstrap_servers, topic, [b"not avro"])

    chart = tmp_path / "tune.png"
    since = datetime.fromtimestamp((written_ms - 1_000) / 1000, UTC).isoformat()
    args = [
        "--config",
        str(path),
        "tune",
        "--since",
        since,
        "--target",
        "0.999",
        "--target",
        "1",
        "--format",
        "json",
        "--chart",
        str(chart),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    # What the pure core makes of exactly the in-range events, each partition in offset order.
    samples = [Sample(p, int(e["event_time"].timestamp() * 1000), ts) for p, e, ts in inside]
    needs = replay_needs(samples, 10_000, int(cfg.event_time.max_event_ahead / timedelta(milliseconds=1)))
    expected = [evaluate(needs, "current", timedelta(seconds=2), timedelta(0)), *recommend(needs, [0.999, 1.0])]
    assert report["events"] == len(inside)
    assert report["undecodable"] == 1
    assert report["late_events_written"] == 0  # no job ran on this topic
    assert [(c["label"], c["watermark_delay"], c["allowed_lateness"], c["late_events"]) for c in report["choices"]] == [
        (c.label, format_duration(c.watermark_delay), format_duration(c.allowed_lateness), c.late_events)
        for c in expected
    ]
    # Counting every event takes the 30 s straggler: 30 s behind its partition's newest, so final 30 s or more after the window end.
    everything = report["choices"][-1]
    assert everything["label"] == "100%" and everything["late_events"] == 0
    assert timedelta(seconds=30) <= expected[-1].final_after <= timedelta(seconds=31)
    # The job's current 2 s delay misses a 7 s straggler whose window had ended 3.5 s before its partition's newest event.
    assert report["choices"][0]["late_events"] > 0 and report["choices"][0]["label"] == "current"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
