"""Corrections from late events: per-aggregation deltas, at-most-once per event, the approval policy,
the provider's cut-off, operator transitions, the SQL and the config."""

from __future__ import annotations

import math
import socket
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from prometheus_client import CollectorRegistry

from meterflow.commands.corrections_metrics import FollowerMetrics, retention_seconds
from meterflow.config import JobConfig, load_config
from meterflow.corrections import (
    LateEvent,
    WindowId,
    WindowState,
    check_transition,
    corrected_totals,
    correction_id,
    decide_status,
    dimensions_key,
    late_event_from_record,
    owes_a_meter_event,
    plan_corrections,
    waiting,
    window_delta,
)
from meterflow.errors import ConfigError, CorrectionError
from meterflow.metrics_catalog import CORRECTIONS_METRICS
from sinks.corrections_schema import (
    corrections_ddl,
    insert_event_sql,
    known_events_sql,
    list_corrections_sql,
    recorded_deltas_sql,
)
from tests.conftest import REPO_ROOT

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
START = datetime(2026, 3, 1, 11, 0)
W = WindowId("t1", "c1", "tokens", "{}", START, START + timedelta(minutes=1))


def _cfg(**corrections) -> JobConfig:
    return JobConfig.model_validate(
        {
            "meters": [
                {"name": "tokens", "aggregation": "SUM"},
                {"name": "calls", "aggregation": "COUNT"},
                {"name": "peak", "aggregation": "MAX"},
                {"name": "seats", "aggregation": "LATEST"},
                {"name": "users", "aggregation": "UNIQUE_COUNT", "unique_dimension": "user_id"},
                {"name": "gpu", "group_by": ["region", "model"]},
            ],
            "corrections": corrections,
        }
    )


def _ev(event_id: str, quantity: str, window: WindowId = W, second: int = 10) -> LateEvent:
    return LateEvent(event_id, window, Decimal(quantity), window.window_start + timedelta(seconds=second), 5000)


def _w(meter: str, start: datetime = START) -> WindowId:
    return WindowId("t1", "c1", meter, "{}", start, start + timedelta(minutes=1))


def test_sum_and_count_deltas_are_exact():
    """SUM adds the quantities exactly; COUNT adds one per event."""
    events = [_ev("a", "0.1"), _ev("b", "0.2")]
    assert window_delta("SUM", WindowState(Decimal(5)), events).delta == Decimal("0.3")
    assert window_delta("COUNT", WindowState(Decimal(5)), events).delta == Decimal(2)


@pytest.mark.parametrize(
    ("state", "quantities", "expected"),
    [
        (WindowState(Decimal(10)), ["7", "12.5"], Decimal("2.5")),
        (WindowState(Decimal(10)), ["7"], Decimal(0)),
        (WindowState(Decimal(10), recorded_delta=Decimal(5)), ["12"], Decimal(0)),
        (WindowState(Decimal(10), recorded_delta=Decimal(5)), ["16"], Decimal(1)),
        (WindowState(), ["3", "4"], Decimal(4)),
    ],
)
def test_max_delta_is_the_rise_over_the_current_value(state, quantities, expected):
    """MAX: max(0, new - current), current = row + recorded deltas; no row: the new maximum."""
    assert window_delta("MAX", state, [_ev(str(i), q) for i, q in enumerate(quantities)]).delta == expected


def test_latest_against_a_counted_window_is_not_corrected():
    """LATEST: a counted window's latest event time is not stored, so the late event is reported."""
    out = window_delta("LATEST", WindowState(Decimal(3)), [_ev("a", "9")])
    assert (
        out.counted == ()
        and [e.event_id for e, _ in out.not_corrected] == ["a"]
        and "LATEST" in out.not_corrected[0][1]
    )


def test_latest_in_an_empty_window_takes_the_newest_late_event():
    """LATEST without a row: the newest late event's quantity; an older one later changes nothing."""
    first = window_delta("LATEST", WindowState(), [_ev("a", "4", second=5), _ev("b", "9", second=30)])
    assert first.delta == Decimal(9) and len(first.counted) == 2
    state = WindowState(recorded_delta=Decimal(9), latest=(START + timedelta(seconds=30), "b"))
    assert window_delta("LATEST", state, [_ev("c", "1", second=20)]).delta == Decimal(0)
    assert window_delta("LATEST", state, [_ev("d", "2", second=40)]).delta == Decimal(-7)


def test_unique_count_is_reported_not_corrected():
    """UNIQUE_COUNT keeps no set of values: nothing is counted."""
    out = window_delta("UNIQUE_COUNT", WindowState(Decimal(3)), [_ev("a", "1")])
    assert out.counted == () and out.delta == 0 and "UNIQUE_COUNT" in out.not_corrected[0][1]


def test_plan_groups_per_window_and_never_corrects_an_event_twice():
    """One correction per window; events already recorded and duplicates in the batch are skipped."""
    other = _w("tokens", START + timedelta(minutes=1))
    events = [_ev("a", "1.5"), _ev("b", "2"), _ev("a", "1.5"), _ev("c", "7", other), _ev("old", "100")]
    plan = plan_corrections(events, {("t1", "old")}, {W: WindowState(Decimal(10))}, _cfg(), NOW)
    by_window = {c.window: c for c in plan.corrections}
    assert by_window[W].delta == Decimal("3.5") and by_window[W].events == 2 and by_window[W].status == "applied"
    assert by_window[other].delta == Decimal(7)
    assert plan.skipped_known == 2
    assert sorted(r.event_id for r in plan.events) == ["a", "b", "c"]
    assert all(r.correction_id == by_window[r.window].correction_id for r in plan.events)


def test_plan_is_deterministic():
    """The same batch yields the same correction ids, whatever the order of its events."""
    events = [_ev("a", "1"), _ev("b", "2")]
    one = plan_corrections(events, set(), {}, _cfg(), NOW)
    two = plan_corrections(list(reversed(events)), set(), {}, _cfg(), NOW)
    assert one.corrections == two.corrections
    assert one.corrections[0].correction_id == correction_id(W, ["b", "a"])
    assert correction_id(W, ["a"]) != correction_id(W, ["a", "b"])


def test_window_not_final_yet_is_deferred():
    """A window whose row is not final: its late events wait for a later run, nothing is recorded."""
    plan = plan_corrections([_ev("a", "1")], set(), {W: WindowState(Decimal(1), row_final=False)}, _cfg(), NOW)
    assert plan.corrections == () and plan.events == () and [e.event_id for e in plan.deferred] == ["a"]


def test_uncorrectable_events_are_recorded_with_their_reason():
    """UNIQUE_COUNT events: no correction, each event recorded not_corrected (so it is reported once)."""
    w = _w("users")
    plan = plan_corrections([_ev("u1", "1", w)], set(), {w: WindowState(Decimal(4))}, _cfg(), NOW)
    assert plan.corrections == ()
    assert [(r.event_id, r.outcome, r.correction_id) for r in plan.events] == [("u1", "not_corrected", None)]
    assert plan.summary["not_corrected_events"] == 1


def test_policy_threshold_default_and_per_tenant():
    """Above the tenant's threshold (or the default) a correction is held; at or below it is applied."""
    cfg = _cfg(approval_threshold="10", tenant_approval_thresholds={"t2": "1"})
    w2 = WindowId("t2", "c1", "tokens", "{}", START, START + timedelta(minutes=1))
    plan = plan_corrections(
        [_ev("a", "10"), _ev("b", "2", w2), _ev("c", "-11", _w("tokens", START + timedelta(minutes=2)))],
        set(),
        {},
        cfg,
        NOW,
    )
    status = {(c.window.tenant_id, c.window.window_start): c.status for c in plan.corrections}
    assert status == {
        ("t1", START): "applied",
        ("t2", START): "pending",
        ("t1", START + timedelta(minutes=2)): "pending",
    }


def test_no_threshold_applies_everything():
    """Without a threshold every correction is applied automatically."""
    assert (
        decide_status(Decimal("1e12"), W, _cfg().corrections, NOW, timedelta(days=35), timedelta(minutes=5))[0]
        == "applied"
    )


def test_a_zero_delta_is_recorded_and_owes_no_meter_event():
    """Late MAX events below the window's maximum: the correction is applied with delta 0, its events
    are recorded as corrected, and nothing is owed to the provider; any other counted delta is."""
    cfg = _cfg(approval_threshold="0")
    peak = _w("peak", START)
    plan = plan_corrections(
        [_ev("a", "3", peak), _ev("b", "5", peak)],
        set(),
        {peak: WindowState(row_quantity=Decimal(8), row_final=True)},
        cfg,
        NOW,
    )
    [c] = plan.corrections
    assert (c.delta, c.status, c.reason, c.events) == (
        Decimal(0),
        "applied",
        "late events; delta 0: nothing to bill",
        2,
    )
    assert not owes_a_meter_event(c.status, c.delta)
    assert owes_a_meter_event("applied", Decimal("0.1")) and owes_a_meter_event("approved", Decimal(-1))
    assert not owes_a_meter_event("pending", Decimal(1)) and not owes_a_meter_event("reported", Decimal(1))


def test_window_older_than_the_provider_accepts_is_reported():
    """A window ending before now - billing.max_window_age is reported, never applied or held."""
    old = _w("tokens", datetime(2026, 1, 1))
    cfg = _cfg(approval_threshold="0")
    plan = plan_corrections([_ev("a", "5", old)], set(), {}, cfg, NOW)
    [c] = plan.corrections
    assert c.status == "reported" and "not billable" in c.reason and c.delta == 5
    held = plan_corrections([_ev("b", "2.50")], set(), {}, cfg, NOW).corrections[0]
    assert (held.status, held.reason) == ("pending", "late events; |delta| 2.5 above the approval threshold 0")


def test_transitions():
    """Only pending can be approved; pending or applied can be rejected; nothing else."""
    assert check_transition("approve", "pending", "x") == "approved"
    assert check_transition("reject", "applied", "x") == "rejected"
    for action, status in (
        ("approve", "applied"),
        ("approve", "rejected"),
        ("reject", "reported"),
        ("reject", "approved"),
    ):
        with pytest.raises(CorrectionError, match=f"cannot {action}"):
            check_transition(action, status, "x")  # type: ignore[arg-type]  # an action the CLI never passes, on purpose


def test_corrected_totals_include_windows_with_only_corrections():
    """Window quantity plus counted deltas; a window without a row shows its deltas."""
    other = _w("tokens", START + timedelta(minutes=5))
    assert corrected_totals([(W, Decimal("1.5"))], {W: Decimal("0.25"), other: Decimal(2)}) == {
        W: Decimal("1.75"),
        other: Decimal(2),
    }


def test_record_to_event_uses_the_jobs_dimensions_key():
    """A late-topic record becomes a typed event keyed like the usage table (sorted, compact JSON)."""
    record = {
        "event_id": "e1",
        "tenant_id": "t1",
        "customer_id": "c1",
        "meter": "gpu",
        "quantity": Decimal("1.000000001"),
        "event_time": datetime(2026, 3, 1, 11, 0, 5, tzinfo=UTC),
        "dimensions": {"region": "eu", "other": "x"},
        "window_start": datetime(2026, 3, 1, 11, 0, tzinfo=UTC),
        "window_end": datetime(2026, 3, 1, 11, 1, tzinfo=UTC),
        "lateness_ms": 70_000,
    }
    e = late_event_from_record(record, _cfg())
    assert e.window.dimensions_key == '{"model":"","region":"eu"}'
    assert e.window.window_start == START and e.event_time.tzinfo is None and e.quantity == Decimal("1.000000001")
    assert dimensions_key({"a": "é"}, ["a"]) == '{"a":"é"}'
    with pytest.raises(CorrectionError, match="not configured"):
        late_event_from_record({**record, "meter": "nope"}, _cfg())


def test_sql_is_generated_for_configured_tables_only():
    """Table names are checked identifiers; the event table's key guards at-most-once."""
    ddl = "\n".join(corrections_ddl("corr_x", "corr_x_events"))
    assert (
        "PRIMARY KEY (tenant_id, event_id)" in ddl
        and "numeric(38, 9)" in ddl
        and "REFERENCES corr_x (correction_id)" in ddl
    )
    assert "ON CONFLICT (tenant_id, event_id) DO NOTHING" in insert_event_sql("corr_x_events")
    assert "'rejected'" not in recorded_deltas_sql("corr_x")
    assert "unnest(%s::text[], %s::text[])" in known_events_sql()
    assert list_corrections_sql(tenant=True, status=True).count("%s") == 2
    with pytest.raises(ValueError, match="identifier"):
        corrections_ddl("x; DROP TABLE y")


def test_config_thresholds_are_exact_and_documented(write_config):
    """Thresholds parse as exact decimals; floats and negatives are refused; the repo's YAML states the defaults."""
    cfg = load_config(
        write_config("corrections:\n  approval_threshold: '0.1'\n  tenant_approval_thresholds: {t1: 5}\n"), environ={}
    )
    assert cfg.corrections.approval_threshold == Decimal("0.1") and cfg.corrections.tenant_approval_thresholds == {
        "t1": Decimal(5)
    }
    with pytest.raises(ConfigError, match="float is not exact"):
        load_config(write_config("corrections:\n  approval_threshold: 0.1\n"), environ={})
    with pytest.raises(ConfigError, match="must not be negative"):
        load_config(write_config("corrections:\n  tenant_approval_thresholds: {t1: '-1'}\n"), environ={})
    repo = load_config(REPO_ROOT / "meterflow.yaml", environ={})
    assert repo.corrections == JobConfig().corrections


def test_follow_repeats_with_pauses_and_stops_on_an_error():
    """--follow: step, pause, step ...; a failing step ends the loop with its error."""
    from meterflow.commands.corrections import repeat

    calls: list[str] = []
    assert repeat(lambda: calls.append("run"), lambda s: calls.append(f"sleep {s}"), 30.0, runs=3) == 3
    assert calls == ["run", "sleep 30.0", "run", "sleep 30.0", "run"]

    def failing() -> None:
        calls.append("boom")
        if calls.count("boom") == 2:
            raise CorrectionError("late event names an unknown meter")

    calls.clear()
    with pytest.raises(CorrectionError, match="unknown meter"):
        repeat(failing, lambda s: calls.append("sleep"), 1.0)
    assert calls == ["boom", "sleep", "boom"]


def test_parse_bound_is_naive_utc():
    """--since/--until: a zone is converted to UTC; a naive time is taken as UTC."""
    from meterflow.commands.corrections import parse_bound

    assert parse_bound("2026-03-01T13:00:00+01:00") == datetime(2026, 3, 1, 12, 0)
    assert parse_bound("2026-03-01T12:00:00") == datetime(2026, 3, 1, 12, 0)
    assert parse_bound(None) is None


def test_a_late_correction_is_billed_as_a_correction_of_its_window_with_its_own_identifier():
    """Deterministic per (window, correction); never the window's own identifier nor a changed
    final's; recognised as a correction by the metrics; at most 100 characters with a long prefix."""
    from decimal import Decimal

    from billing.deliveries import ClosedWindow, late_correction_delivery, window_identifier
    from billing.identifiers import (
        MAX_IDENTIFIER_LENGTH,
        derive_correction_identifier,
        derive_late_correction_identifier,
    )
    from jobs.billing_operator import is_correction

    window = ClosedWindow.from_fields(
        ("t1", "c1", "tokens", "{}", 1_700_000_000_000, 1_700_000_060_000, Decimal("0.75"), 2, 0)
    )
    first = late_correction_delivery(window, "cor-1700000000000-aa", "mf")
    assert first == late_correction_delivery(window, "cor-1700000000000-aa", "mf")
    assert (first.kind, first.window_identifier, first.quantity, first.revision) == (
        "correction",
        window_identifier(window, "mf"),
        Decimal("0.75"),
        0,
    )
    other = late_correction_delivery(window, "cor-1700000000000-bb", "mf")
    parent = window_identifier(window, "mf")
    assert len({first.identifier, other.identifier, parent, derive_correction_identifier(parent, 2)}) == 4
    assert is_correction(first.identifier) and not is_correction(parent)
    long_parent = "p" * 16 + "-1700000000000-" + "a" * 64  # the longest prefix the config allows
    assert len(derive_late_correction_identifier(long_parent, "cor-1")) <= MAX_IDENTIFIER_LENGTH
    assert is_correction(derive_late_correction_identifier(long_parent, "cor-1"))


def test_an_incremental_run_resumes_after_its_batches_but_never_past_a_deferred_event():
    """Partition 0 read to offset 7 resumes at 8; partition 1 holds back at its deferred event 3 in this
    batch and in every later batch of the run, so the event is read again next time."""
    from meterflow.corrections import LateEvent, offsets_to_store

    def at(partition: int, offset: int) -> LateEvent:
        return LateEvent(f"e{partition}-{offset}", W, Decimal(1), START, 1000, (partition, offset))

    first = [at(0, 5), at(0, 7), at(1, 2), at(1, 3), at(1, 4)]
    store, held = offsets_to_store(first, [at(1, 3)], {})
    assert (store, held) == ({0: 8, 1: 3}, {1: 3})
    store, held = offsets_to_store([at(0, 9), at(1, 10)], [], held)
    assert (store, held) == ({0: 10, 1: 3}, {1: 3})
    assert offsets_to_store([LateEvent("x", W, Decimal(1), START, 1000)], [], {}) == ({}, {})


def test_resume_and_follow_refuse_a_range_or_a_dry_run(tmp_path):
    """They read everything new once: a range would skip events for good."""
    from click.testing import CliRunner

    from meterflow.commands import cli

    config = tmp_path / "m.yaml"
    config.write_text("{}\n")
    result = CliRunner().invoke(
        cli, ["--config", str(config), "corrections", "apply", "--follow", "--since", "2026-01-01T00:00:00Z"]
    )
    assert result.exit_code == 2 and "don't combine with --since" in result.output


# -- the corrections follower: what waits, for how long, and the metrics the alerts read --------------------------


def test_waiting_counts_the_deferred_events_and_ages_the_oldest():
    """Events of a window without a final row wait; the oldest's age runs from when the job routed it late."""
    now = NOW.replace(tzinfo=None)
    old, new = (
        replace(_ev("a", "1"), seen_at=now - timedelta(hours=30)),
        replace(_ev("b", "1"), seen_at=now - timedelta(minutes=5)),
    )
    final = _ev("c", "2", _w("calls"))
    plan = plan_corrections(
        [old, new, final],
        set(),
        {W: WindowState(None, row_final=False), _w("calls"): WindowState(Decimal(3), row_final=True)},
        _cfg(),
        NOW,
    )
    left = waiting([plan], now)
    assert (left.events, left.oldest_age_s) == (2, 30 * 3600.0)
    assert (
        waiting(
            [plan_corrections([final], set(), {_w("calls"): WindowState(Decimal(3), row_final=True)}, _cfg(), NOW)], now
        ).oldest_age_s
        == 0.0
    )


def _scrape(registry: CollectorRegistry) -> dict[str, float]:
    return {s.name: s.value for m in registry.collect() for s in m.samples if not s.name.endswith("_created")}


def test_follower_metrics_are_the_catalogs_and_follow_each_run():
    registry = CollectorRegistry()
    metrics = FollowerMetrics(_cfg(), "late", registry)
    assert set(_scrape(registry)) == CORRECTIONS_METRICS, "the names ops/alerts.yml may read"
    assert math.isnan(_scrape(registry)["meterflow_corrections_late_topic_retention_seconds"]), (
        "not known before the topic is read"
    )
    now = NOW.replace(tzinfo=None)
    waiting_event = replace(_ev("a", "1"), seen_at=now - timedelta(minutes=10))
    plan = plan_corrections(
        [waiting_event, _ev("c", "2", _w("calls"))],
        set(),
        {W: WindowState(None, row_final=False), _w("calls"): WindowState(Decimal(3), row_final=True)},
        _cfg(),
        NOW,
    )
    metrics.observe([plan], now)
    got = _scrape(registry)
    assert (
        got["meterflow_corrections_waiting_events"],
        got["meterflow_corrections_waiting_oldest_age_seconds"],
        got["meterflow_corrections_recorded_total"],
    ) == (1, 600.0, 1)
    assert got["meterflow_corrections_last_pass_timestamp_seconds"] > 0


def test_follower_serves_its_metrics_over_http():
    registry = CollectorRegistry()
    metrics = FollowerMetrics(_cfg(), "late", registry)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics.serve(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "meterflow_corrections_waiting_events 0.0" in body


def test_retention_seconds():
    assert retention_seconds("604800000") == 604800.0 and retention_seconds("-1") == math.inf


@pytest.mark.parametrize("meter", ["peak", "seats"])
def test_max_and_latest_without_a_row_wait_for_a_final_row_not_written_yet(meter):
    """Seen late 30 s ago, no row: it waits (the final row may not be committed yet); at the wait's end
    (2 min, exactly) it is corrected as a window with no counted event. A row or a SUM never waits."""
    window, now = _w(meter), NOW.replace(tzinfo=None)

    def plan(seen_ago: timedelta, state: WindowState | None = None, w: WindowId = window):
        event = replace(_ev("a", "7", w), seen_at=now - seen_ago)
        return plan_corrections([event], set(), {w: state} if state else {}, _cfg(), NOW)

    assert [e.event_id for e in plan(timedelta(seconds=30)).deferred] == ["a"]
    assert [e.event_id for e in plan(timedelta(minutes=2) - timedelta(milliseconds=1)).deferred] == ["a"], (
        "one ms before the wait ends"
    )
    done = plan(timedelta(minutes=2))
    assert done.deferred == () and [c.delta for c in done.corrections] == [Decimal(7)]
    with_row = plan(timedelta(seconds=1), WindowState(Decimal(5)))
    assert with_row.deferred == ()
    if meter == "peak":  # LATEST against a counted row is not correctable (test above)
        assert [c.delta for c in with_row.corrections] == [Decimal(2)]
    assert plan(timedelta(seconds=1), w=_w("tokens")).deferred == (), "SUM: the delta is the late events' own"
