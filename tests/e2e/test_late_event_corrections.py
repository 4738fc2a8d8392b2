"""Corrections from late events on the real stack: the usage job routes events beyond the allowed
lateness to the late topic; ``corrections apply`` turns them into corrections exactly once, holds
one above the approval threshold, reports one older than the provider accepts; ``usage`` and
``late-audit`` show the result."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner

from connectors.avro_codec import UsageEvent
from connectors.kafka_admin import group_lag
from connectors.producer import send_events
from meterflow.commands import cli
from meterflow.commands.corrections import read_late_events
from meterflow.errors import CorrectionError
from meterflow.local import flink_jobs
from meterflow.windowing import window_bounds
from sinks.postgres import connect
from tests.e2e.helpers import (
    closing_events,
    late_event_record,
    private_job,
    publish_late_events,
    table_totals,
    wait_for,
)

pytestmark = [pytest.mark.e2e]


def _event(event_id: str, customer: str, quantity: str, at: datetime) -> UsageEvent:
    return UsageEvent(
        event_id=event_id,
        tenant_id="t1",
        customer_id=customer,
        meter="tokens",
        quantity=Decimal(quantity),
        event_time=at,
        dimensions={},
    )


def _json_objects(text: str) -> list[dict]:
    decoder, out, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
        while i < len(text) and text[i].isspace():
            i += 1
    return out


def test_late_events_become_corrections_exactly_once(e2e_stack):
    """Late events -> corrections once per event; a re-run and an overlapping range add nothing;
    above the threshold held, approved by an operator; a window older than the provider accepts is
    reported and never counted."""
    run = uuid.uuid4().hex[:6]
    cfg, path = private_job(
        e2e_stack,
        "corr",
        event_time={
            "window_size": "10s",
            "watermark_delay": "2s",
            "allowed_lateness": "0s",
            "source_idle_timeout": "5s",
        },
        billing={"max_window_age": "2h"},
        corrections={"approval_threshold": "1", "table": f"corr_{run}", "events_table": f"corr_{run}_events"},
    )
    size = cfg.event_time.window_size
    now = datetime.now(UTC).replace(microsecond=0)
    a_start, _ = window_bounds(now - timedelta(minutes=30), size)
    c_start = a_start + 3 * size
    on_time = [
        _event("on-1", "c1", "1.5", a_start + timedelta(seconds=1)),
        _event("on-2", "c1", "1.5", a_start + timedelta(seconds=2)),
    ]
    job_id = flink_jobs.submit(cfg, path)
    try:
        send_events(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, on_time)
        # The closers only once the job has read the on-time events (offsets committed with a
        # checkpoint): read in one poll with a closer on an idle partition, they could be late.
        wait_for(
            lambda: group_lag(cfg.kafka.bootstrap_servers, cfg.kafka.consumer_group, cfg.kafka.usage_events_topic) == 0,
            300,
            "the on-time events consumed",
        )
        send_events(
            cfg.kafka.bootstrap_servers,
            cfg.kafka.usage_events_topic,
            closing_events(a_start + timedelta(minutes=3), cfg.kafka.partitions),
            partition_for=lambda i, e: i,
        )
        wait_for(lambda: [r.is_final for r in table_totals(cfg).values()] == [True], 420, "window A final in Postgres")
        late = [
            _event("late-a1", "c1", "0.25", a_start + timedelta(seconds=3)),
            _event("late-a2", "c1", "0.5", a_start + timedelta(seconds=4)),
            _event("late-c", "c3", "2", c_start + timedelta(seconds=1)),
            _event("late-old", "c1", "5", now - timedelta(hours=3)),
            _event("on-1", "c1", "1.5", a_start + timedelta(seconds=1)),  # a duplicate: dropped by the job, never late
        ]
        send_events(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, late)
        wait_for(lambda: len(read_late_events(cfg)) >= 4, 180, "late events committed to the late topic")
    finally:
        flink_jobs.cancel(cfg, job_id)
    assert sorted(r["event_id"] for r in read_late_events(cfg)) == ["late-a1", "late-a2", "late-c", "late-old"]

    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, ["--config", str(path), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    # A dry run computes the corrections and writes nothing.
    dry = json.loads(run("corrections", "apply", "--dry-run", "--format", "json"))
    assert (dry["dry_run"], len(dry["corrections"])) == (True, 3)
    assert json.loads(run("corrections", "list", "--format", "json")) == []

    first = json.loads(run("corrections", "apply", "--format", "json"))
    by_customer = {(c["customer_id"], c["window_start"][:19]): c for c in first["corrections"]}
    a_key = ("c1", a_start.replace(tzinfo=None).isoformat(sep=" "))
    c_key = ("c3", c_start.replace(tzinfo=None).isoformat(sep=" "))
    assert (by_customer[a_key]["delta"], by_customer[a_key]["events"], by_customer[a_key]["status"]) == (
        "0.750000000",
        2,
        "applied",
    )
    assert (by_customer[c_key]["delta"], by_customer[c_key]["status"]) == ("2.000000000", "pending")
    [old] = [c for k, c in by_customer.items() if k not in (a_key, c_key)]
    assert (old["delta"], old["status"]) == ("5.000000000", "reported") and "not billable" in old["reason"]
    assert [c["correction_id"] for c in dry["corrections"]] == [c["correction_id"] for c in first["corrections"]]

    # Re-runs, over the whole topic and over an overlapping range, add nothing.
    listed = json.loads(run("corrections", "list", "--format", "json"))
    again = json.loads(run("corrections", "apply", "--format", "json"))
    overlap = json.loads(
        run(
            "corrections",
            "apply",
            "--since",
            (a_start - timedelta(minutes=1)).isoformat(),
            "--until",
            (c_start + size).isoformat(),
            "--format",
            "json",
        )
    )
    assert (again["corrections"], again["summary"]["known_events"]) == ([], 4)
    assert (overlap["corrections"], overlap["summary"]["known_events"]) == ([], 3)
    assert json.loads(run("corrections", "list", "--format", "json")) == listed
    with connect(cfg.postgres) as conn:
        assert conn.execute(
            f"SELECT count(*), count(DISTINCT (tenant_id, event_id)) FROM {cfg.corrections.events_table}"
        ).fetchone() == (4, 4)

    # Only the applied correction counts in the corrected total until the held one is approved.
    def corrected_a() -> Decimal:
        rows = _json_objects(run("usage", "--format", "json"))
        [row] = [r for r in rows if r["customer_id"] == "c1" and r["tenant_id"] == "t1"]
        assert Decimal(row["quantity"]) == Decimal(3)
        return Decimal(row["corrected_quantity"])

    assert corrected_a() == Decimal("3.75")
    run("corrections", "approve", by_customer[c_key]["correction_id"], "--note", "checked with the customer")
    statuses = {c["correction_id"]: c["status"] for c in json.loads(run("corrections", "list", "--format", "json"))}
    assert statuses == {
        by_customer[a_key]["correction_id"]: "applied",
        by_customer[c_key]["correction_id"]: "approved",
        old["correction_id"]: "reported",
    }
    with pytest.raises(CorrectionError, match="it is reported"):
        runner.invoke(
            cli, ["--config", str(path), "corrections", "reject", old["correction_id"]], catch_exceptions=False
        )
    run("corrections", "reject", by_customer[a_key]["correction_id"])
    assert corrected_a() == Decimal(3)

    # late-audit marks the corrected late events per window.
    audit = {
        (r["customer_id"], r["window_start"]): (r["count"], r["corrected"], r["not_corrected"])
        for r in json.loads(run("late-audit", "--format", "json"))
    }
    assert audit[a_key] == (2, 2, 0) and audit[c_key] == (1, 1, 0)

    # Incremental runs keep their place in the late topic: the first reads it all (every event
    # known), the next nothing new; a late event written afterwards is read and corrected alone.
    resumed = json.loads(run("corrections", "apply", "--resume", "--format", "json"))
    assert (resumed["late_events"], resumed["corrections"], resumed["summary"]["known_events"]) == (4, [], 4)
    assert json.loads(run("corrections", "apply", "--resume", "--format", "json"))["late_events"] == 0
    publish_late_events(cfg, [late_event_record("t1", "late-a3", "c1", "tokens", "0.125", a_start, size)])
    newer = json.loads(run("corrections", "apply", "--resume", "--format", "json"))
    assert newer["late_events"] == 1
    assert [(c["customer_id"], c["delta"], c["status"]) for c in newer["corrections"]] == [
        ("c1", "0.125000000", "applied")
    ]


def test_a_max_late_event_read_before_its_windows_final_row_waits_for_it(e2e_stack):
    """The late topic and the usage table commit in different committers: a MAX window's late event
    can be read before the window's final row exists. Corrections leave it waiting (never billing
    its whole quantity), then measure it against the final row once written: 7 under a final 10
    is a zero delta, recorded and never sent. A window that gets no row within
    corrections.final_row_wait had no counted event: its late maximum counts whole."""
    from tests.e2e.helpers import write_final_rows

    run = uuid.uuid4().hex[:6]
    cfg, path = private_job(
        e2e_stack,
        "corrmax",
        event_time={"window_size": "10s"},
        meters=[{"name": "peak", "aggregation": "MAX"}],
        billing={
            "enabled": True,
            "ledger_table": f"deliveries_max_{run}",
            "customers_table": f"customers_max_{run}",
            "carry_table": f"carry_max_{run}",
            "max_window_age": "2h",
        },
        corrections={"table": f"corr_max_{run}", "events_table": f"corr_max_{run}_events", "final_row_wait": "8s"},
    )
    from sinks.ledger import apply_schemas, fetch_deliveries

    apply_schemas(cfg)
    size = cfg.event_time.window_size
    w1, _ = window_bounds(datetime.now(UTC) - timedelta(minutes=20), size)
    w2 = w1 + size
    publish_late_events(
        cfg,
        [
            late_event_record("t1", "late-w1", "c1", "peak", "7", w1, size),
            late_event_record("t1", "late-w2", "c1", "peak", "4", w2, size),
        ],
    )
    runner = CliRunner()

    def apply() -> dict:
        result = runner.invoke(
            cli, ["--config", str(path), "corrections", "apply", "--format", "json"], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    first = apply()
    assert (first["corrections"], first["summary"]["deferred_events"]) == ([], 2), "both wait for a final row"
    write_final_rows(
        cfg,
        [
            {
                "tenant_id": "t1",
                "customer_id": "c1",
                "meter": "peak",
                "window_start": w1,
                "window_end": w1 + size,
                "quantity": Decimal(10),
                "event_count": 3,
                "revision": 3,
            }
        ],
    )
    second = apply()
    [zero] = second["corrections"]
    assert (zero["window_start"][:19], Decimal(zero["delta"]), zero["status"]) == (
        w1.replace(tzinfo=None).isoformat(sep=" "),
        Decimal(0),
        "applied",
    )
    assert second["summary"]["deferred_events"] == 1, "w2 still waits"
    time.sleep(9)  # past corrections.final_row_wait: w2 had no counted event
    [whole] = apply()["corrections"]
    assert (whole["window_start"][:19], Decimal(whole["delta"])) == (
        w2.replace(tzinfo=None).isoformat(sep=" "),
        Decimal(4),
    )
    owed = [(d.window_start, d.quantity, d.status) for d in fetch_deliveries(cfg)]
    assert owed == [(w2.replace(tzinfo=None), Decimal(4), "pending")], (
        "the zero delta is never owed; w2's maximum is, once"
    )
