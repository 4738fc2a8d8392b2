"""The handover from the SQL graph to the two-stage graph: its plan, its file, and what it changes in the job's SQL."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs.guard_plan import GUARD_INPUT_COLUMNS, guard_input_query
from jobs.plan import REJECTED, rejected_to_route
from jobs.source_plan import REPLAYED, replayed_expr, usage_source_ddl, usage_source_options, validate_query
from jobs.stages_plan import NONE_HELD, handover_start
from meterflow.commands import cli
from meterflow.commands.job import usage_job_handover
from meterflow.config import load_config
from meterflow.errors import ConfigError, JobSubmissionError
from meterflow.handover import Handover, StoppedAt, plan_handover, read_below, read_handover, write_handover
from meterflow.retained_state import RetainedState, StartPoint
from meterflow.window_row import epoch_ms

TWO_STAGE = """
kafka: {consumer_group: new-group}
flink: {usage_graph: two_stage}
event_time: {window_size: 1m, allowed_lateness: 5m, max_event_ahead: 2m, dedup_horizon: 1d}
"""
LAST_FINAL_END = datetime(2026, 12, 7, 10, 0)


@pytest.fixture
def cfg(write_config):
    return load_config(write_config(TWO_STAGE), environ={})


def test_the_new_graph_holds_the_watermark_that_closed_the_last_final_window(cfg):
    h = plan_handover(cfg, "old-group", {0: 10, 2: 7}, LAST_FINAL_END)
    end = epoch_ms(LAST_FINAL_END)
    # The window ending at LAST_FINAL_END closes at end - 1 ms + allowed lateness; the next one later.
    assert h.watermark_ms == end - 1 + 5 * 60_000
    assert h.read_below == {0: 10, 2: 7}
    assert (h.from_group, h.topic) == ("old-group", cfg.kafka.usage_events_topic)


def test_reading_starts_a_dedup_horizon_before_the_earliest_copy_an_open_window_could_have_dropped(cfg):
    h = plan_handover(cfg, "old-group", {0: 1}, LAST_FINAL_END)
    # The first open window starts at the last final end; an event is appended at most
    # max_event_ahead before its time; a copy dropped then had its first copy within a horizon before.
    earliest_open_copy = LAST_FINAL_END - timedelta(minutes=1) - timedelta(minutes=2)
    assert h.replay_from_ms == epoch_ms(earliest_open_copy - timedelta(days=1))


def test_with_no_final_window_everything_is_read_again_and_no_watermark_is_held(cfg):
    h = plan_handover(cfg, "old-group", {0: 1}, None)
    assert (h.watermark_ms, h.replay_from_ms, h.closed_through_ms) == (None, 0, None)


def test_the_watermark_the_old_job_held_wins_over_the_last_final_windows_close(cfg):
    """A window closed with no counted row (only late or refused events) leaves no final row: the savepoint's watermark says it closed."""
    close = epoch_ms(LAST_FINAL_END) - 1 + 5 * 60_000
    above = plan_handover(cfg, "g", {0: 1}, LAST_FINAL_END, StoppedAt({0: 1}, close + 120_000, close + 60_000))
    assert (above.watermark_ms, above.closed_through_ms) == (close + 120_000, close + 60_000)
    below = plan_handover(cfg, "g", {0: 1}, LAST_FINAL_END, StoppedAt({0: 1}, close - 1, None))
    assert (below.watermark_ms, below.closed_through_ms) == (close, None)
    assert plan_handover(cfg, "g", {0: 1}, None, StoppedAt({0: 1}, 5_000)).watermark_ms == 5_000


def test_the_savepoint_readers_output_is_parsed_and_anything_else_refused():
    out = "partition 0 12\npartition 2 40\nheld-watermark 1799999999\nclosed-through 1799990001\n"
    assert StoppedAt.parse(out) == StoppedAt({0: 12, 2: 40}, 1_799_999_999, 1_799_990_001)
    assert StoppedAt.parse("partition 1 3\n") == StoppedAt({1: 3})
    with pytest.raises(ValueError, match="unexpected line"):
        StoppedAt.parse("partition 1\n")


def test_the_savepoints_offsets_win_over_the_groups_committed_ones():
    """The group commits after a checkpoint, maybe not after the savepoint: its offsets only where the savepoint's source never read."""
    assert read_below({0: 5, 1: 8, 2: 3}, StoppedAt({0: 9, 1: 8})) == {0: 9, 1: 8, 2: 3}
    assert read_below({}, StoppedAt({1: 4})) == {1: 4}


@pytest.mark.parametrize(
    ("config", "group", "committed", "says"),
    [
        ("", "old-group", {0: 1}, "set flink.usage_graph: two_stage"),
        (TWO_STAGE, "new-group", {0: 1}, "give the new job a new group"),
        (TWO_STAGE, "old-group", {}, "holds an offset"),
    ],
)
def test_a_handover_that_cannot_work_is_refused_with_the_fix(write_config, config, group, committed, says):
    cfg = load_config(write_config(config), environ={})
    with pytest.raises(ConfigError, match=says):
        plan_handover(cfg, group, committed, LAST_FINAL_END)


def test_the_handover_file_round_trips_beside_the_job_state(tmp_path, cfg):
    h = plan_handover(cfg, "old-group", {1: 5, 0: 9}, LAST_FINAL_END)
    assert read_handover(tmp_path / "job") is None
    path = write_handover(tmp_path / "job", h)
    assert read_handover(tmp_path / "job") == h
    assert Handover.load(path) == h
    assert read_handover(None) is None


def test_a_first_start_reads_from_the_replay_start_and_marks_what_the_old_group_read(cfg):
    h = Handover("old-group", "usage-events", 1_000, 123_456, {2: 40, 0: 7}, 900)
    options = usage_source_options(cfg, h)
    assert (options["scan.startup.mode"], options["scan.startup.timestamp-millis"]) == ("timestamp", "123456")
    assert usage_source_options(cfg)["scan.startup.mode"] == "group-offsets"
    assert "'scan.startup.timestamp-millis' = '123456'" in usage_source_ddl(cfg, h)
    assert replayed_expr(h) == (
        "(`source_topic` = 'usage-events' AND"
        " ((`source_partition` = 0 AND `source_offset` < 7) OR (`source_partition` = 2 AND `source_offset` < 40)))"
    )
    assert f"{replayed_expr(h)} AS `{REPLAYED}`" in validate_query(cfg, h)
    assert REPLAYED not in validate_query(cfg)
    assert replayed_expr(Handover("old-group", "usage-events", None, 0, {})) == "FALSE"


def test_the_first_stage_holds_the_handovers_watermark_and_boundary_or_none():
    assert handover_start(None) == (NONE_HELD, NONE_HELD)
    assert handover_start(Handover("g", "t", 5_000, 0, {0: 1}, 4_001)) == (5_000, 4_001)
    assert handover_start(Handover("g", "t", None, 0, {0: 1})) == (NONE_HELD, NONE_HELD)


def test_records_read_before_the_handover_are_no_dead_letters_again():
    assert rejected_to_route(False) == REJECTED
    assert rejected_to_route(True) == f"{REJECTED} AND NOT `{REPLAYED}`"


def test_the_replayed_column_passes_the_window_guard_only_at_a_handover():
    assert guard_input_query().count("`") == 2 * (len(GUARD_INPUT_COLUMNS) + 1)
    assert guard_input_query((REPLAYED,)).endswith(f"`{REPLAYED}` FROM `validated_events`")


def _savepoint(kind: str) -> RetainedState:
    return RetainedState(Path("/state/savepoints/savepoint-1"), kind, datetime(2026, 12, 7))  # type: ignore[arg-type]


FRESH = StartPoint(None, (), forget=True)
RESTORE = StartPoint("/state/chk-3", ())
FIRST = StartPoint(None, ())


def test_a_handover_is_refused_where_it_cannot_start_from_the_sql_jobs_savepoint(cfg, tmp_path):
    with pytest.raises(JobSubmissionError, match="add --fresh"):
        usage_job_handover(cfg, "old-group", tmp_path, RESTORE)
    with pytest.raises(JobSubmissionError, match="local or mounted directory"):
        usage_job_handover(cfg, "old-group", None, FRESH)
    for newest in (None, _savepoint("checkpoint")):
        with pytest.raises(JobSubmissionError, match=r"stop the SQL job with `meterflow stop --savepoint <id>` first"):
            usage_job_handover(cfg, "old-group", tmp_path, FRESH, newest)
    settings = {"usage_graph": "two_stage", "window_size": "0:01:00", "window_aggregate": "SUM", "meters": {}}
    with pytest.raises(JobSubmissionError, match="is the two-stage graph's"):
        usage_job_handover(cfg, "old-group", tmp_path, FRESH, _savepoint("savepoint"), settings, settings)
    with pytest.raises(JobSubmissionError, match="window_size was 0:05:00"):
        usage_job_handover(
            cfg,
            "old-group",
            tmp_path,
            FRESH,
            _savepoint("savepoint"),
            {**settings, "usage_graph": "sql", "window_size": "0:05:00"},
            settings,
        )


def test_every_start_that_keeps_the_handed_over_jobs_state_passes_its_handover_on(cfg, tmp_path):
    """A restore, and a first start again when the job ended before its first checkpoint; not a --fresh one."""
    assert usage_job_handover(cfg, None, tmp_path, RESTORE) is None
    handover = Handover("old-group", "usage-events", None, 0, {0: 1})
    write_handover(tmp_path, handover)
    assert usage_job_handover(cfg, None, tmp_path, RESTORE) == handover
    assert usage_job_handover(cfg, None, tmp_path, FIRST) == handover
    assert usage_job_handover(cfg, None, tmp_path, FRESH) is None
    assert usage_job_handover(cfg, None, None, FIRST) is None


def test_handover_with_force_is_refused(write_config):
    result = CliRunner().invoke(
        cli, ["--config", str(write_config(TWO_STAGE)), "submit", "--force", "--handover-from", "old-group"]
    )
    assert isinstance(result.exception, JobSubmissionError)
    assert "stop the job first, not --force" in str(result.exception)
