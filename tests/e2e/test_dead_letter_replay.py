"""End to end: events of a meter the job does not know become dead letters; after the meter is added
(stop with a savepoint, change the config, resubmit), ``meterflow dead-letters replay`` counts them
once, however often it is run."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import fastavro
import pytest
import yaml
from click.testing import CliRunner

from connectors.avro_codec import UsageEvent
from connectors.avro_types import load_schema
from connectors.dead_letters import DeadLetter, decode_dead_letter
from connectors.kafka_reader import read_from
from connectors.producer import send_events
from jobs.plan import LATE_EVENT_SCHEMA
from meterflow.commands import cli
from meterflow.config import JobConfig, load_config
from meterflow.local import flink_jobs
from tests.e2e.helpers import closing_events, expected_totals, private_job, read_topic, table_totals, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

API_CALLS, STORAGE = 12, 8


def _with_meters(path: Path, meters: list[str]) -> JobConfig:
    """The operator's edit: the config file's meter list, then the config as the job will read it."""
    data = yaml.safe_load(path.read_text())
    data["meters"] = [{"name": m} for m in meters]
    path.write_text(yaml.safe_dump(data))
    return load_config(path, environ={})


def _dead_letters(cfg: JobConfig) -> list[DeadLetter]:
    """The committed dead letters, in (partition, offset) order."""
    records = read_from(cfg.kafka.bootstrap_servers, cfg.kafka.dead_letter_topic, {}, timeout=60)
    return sorted((decode_dead_letter(*r) for r in records), key=lambda d: (d.partition, d.offset))


def _totals(cfg: JobConfig) -> dict:
    return {k: (r.quantity, r.event_count) for k, r in table_totals(cfg).items()}


def _replay(path: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--config", str(path), "dead-letters", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return " ".join(result.stderr.split())


def test_replayed_dead_letters_count_once_after_the_meter_is_added(e2e_stack):
    """Storage events rejected as an unknown meter are counted once after two replays; the dead-letter
    topic keeps only the original rejections and nothing is late."""
    cfg, path = private_job(e2e_stack, "dlreplay")
    cfg = _with_meters(path, ["api_calls"])
    size = cfg.event_time.window_size
    # Every event in one window well in the past, so it stays open (the watermark stays below its
    # end) until the closers: the replayed events are on time, not late.
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    size_ms = int(size.total_seconds() * 1000)
    start = datetime.fromtimestamp((now_ms - now_ms % size_ms) / 1000, UTC) - timedelta(minutes=30)
    events = [
        UsageEvent(
            event_id=f"dl-{i}",
            tenant_id="t-dl",
            customer_id=f"c{i % 3}",
            meter="storage" if i % 5 in (1, 3) else "api_calls",
            quantity=Decimal(f"{i + 1}.125") if i % 5 in (1, 3) else Decimal(i % 4 + 1),
            event_time=start + timedelta(milliseconds=300 * i),
            dimensions={},
        )
        for i in range(API_CALLS + STORAGE)
    ]
    storage = [e for e in events if e["meter"] == "storage"]
    assert (
        len(storage) == STORAGE and max(e["event_time"] for e in events) < start + size - cfg.event_time.watermark_delay
    )

    job_id = flink_jobs.submit(cfg, path)
    try:
        send_events(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, events)
        wait_for(lambda: len(_dead_letters(cfg)) == STORAGE, 120, "the storage events' dead letters")
        originals = _dead_letters(cfg)
        assert {d.reason for d in originals} == {"unknown meter: storage"}

        # The fix: stop with a savepoint, add the meter, resubmit from the savepoint.
        savepoint = flink_jobs.stop_with_savepoint(cfg, job_id)
        cfg = _with_meters(path, ["api_calls", "storage"])
        job_id = flink_jobs.submit(cfg, path, savepoint=savepoint)

        listed = CliRunner().invoke(
            cli,
            ["--config", str(path), "dead-letters", "list", "--json", "--kind", "unknown meter"],
            catch_exceptions=False,
        )
        assert listed.exit_code == 0 and json.loads(listed.stdout)["by_kind"] == {"unknown_meter": STORAGE}
        assert f"replayed {STORAGE} dead letters to {cfg.kafka.usage_events_topic} ({STORAGE} keyed" in _replay(
            path, "replay", "--kind", "unknown_meter", "--yes"
        )
        # The same selection again: the job's dedup drops every copy.
        assert f"replayed {STORAGE} dead letters" in _replay(path, "replay", "--kind", "unknown_meter", "--yes")

        send_events(
            cfg.kafka.bootstrap_servers,
            cfg.kafka.usage_events_topic,
            closing_events(start + size, cfg.kafka.partitions),
            partition_for=lambda i, e: i,
        )
        expected = expected_totals(events, size)
        assert {k[2] for k in expected} == {"api_calls", "storage"}
        wait_for(lambda: _totals(cfg) == expected, 180, "api_calls and storage windows equal to the oracle")
        wait_for(lambda: all(r.is_final for r in table_totals(cfg).values()), 120, "the window final")
        # Anything the replays caused is committed with these checkpoints at the latest.
        done = flink_jobs.completed_checkpoints(cfg, job_id)
        wait_for(lambda: flink_jobs.completed_checkpoints(cfg, job_id) >= done + 2, 60, "two more checkpoints")

        assert _totals(cfg) == expected  # each storage event counted once, not twice
        after = _dead_letters(cfg)
        assert [(d.partition, d.offset, d.source_partition, d.source_offset) for d in after] == [
            (d.partition, d.offset, d.source_partition, d.source_offset) for d in originals
        ]
        late_schema = fastavro.parse_schema(load_schema(LATE_EVENT_SCHEMA))
        assert (
            read_topic(
                cfg.kafka.bootstrap_servers,
                cfg.kafka.late_events_topic,
                lambda v: fastavro.schemaless_reader(io.BytesIO(v), late_schema),
            )
            == []
        )
    finally:
        for job in flink_jobs.running_jobs(cfg, cfg.flink.job_name):
            flink_jobs.cancel(cfg, job["jid"])
