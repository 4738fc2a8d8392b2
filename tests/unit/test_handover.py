"""The handover from the SQL graph to the two-stage graph: its plan, its file, and what it changes in the job's SQL."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from click.testing import CliRunner

from jobs.plan import GUARD_INPUT_COLUMNS, guard_input_query
from jobs.source_plan import REPLAYED, replayed_expr, usage_source_ddl, usage_source_options, validate_query
from meterflow.commands import cli
from meterflow.commands.job import usage_job_handover
from meterflow.config import load_config
from meterflow.errors import ConfigError, JobSubmissionError
from meterflow.handover import Handover, plan_handover, read_handover, write_handover
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
    assert h.from_group == "old-group"


def test_reading_starts_a_dedup_horizon_before_the_earliest_copy_an_open_window_could_have_dropped(cfg):
    h = plan_handover(cfg, "old-group", {0: 1}, LAST_FINAL_END)
    # The first open window starts at the last final end; an event is appended at most
    # max_event_ahead before its time; a copy dropped then had its first copy within a horizon before.
    earliest_open_copy = LAST_FINAL_END - timedelta(minutes=1) - timedelta(minutes=2)
    assert h.replay_from_ms == epoch_ms(earliest_open_copy - timedelta(days=1))


def test_with_no_final_window_everything_is_read_again_and_no_watermark_is_held(cfg):
    h = plan_handover(cfg, "old-group", {0: 1}, None)
    assert (h.watermark_ms, h.replay_from_ms) == (None, 0)


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
    assert read_handover(tmp_path / "job") == path
    assert Handover.from_json(path.read_text()) == h
    assert read_handover(None) is None


def test_a_first_start_reads_from_the_replay_start_and_marks_what_the_old_group_read(cfg):
    h = Handover("old-group", 1_000, 123_456, {2: 40, 0: 7})
    options = usage_source_options(cfg, h)
    assert (options["scan.startup.mode"], options["scan.startup.timestamp-millis"]) == ("timestamp", "123456")
    assert usage_source_options(cfg)["scan.startup.mode"] == "group-offsets"
    assert "'scan.startup.timestamp-millis' = '123456'" in usage_source_ddl(cfg, h)
    assert replayed_expr(h) == (
        "((`source_partition` = 0 AND `source_offset` < 7) OR (`source_partition` = 2 AND `source_offset` < 40))"
    )
    assert f"{replayed_expr(h)} AS `{REPLAYED}`" in validate_query(cfg, h)
    assert REPLAYED not in validate_query(cfg)
    assert replayed_expr(Handover("old-group", None, 0, {})) == "FALSE"


def test_the_replayed_column_passes_the_window_guard_only_at_a_handover():
    assert guard_input_query().count("`") == 2 * (len(GUARD_INPUT_COLUMNS) + 1)
    assert guard_input_query((REPLAYED,)).endswith(f"`{REPLAYED}` FROM `validated_events`")


def test_a_submit_that_would_restore_state_or_keeps_none_is_no_handover(cfg, tmp_path):
    with pytest.raises(JobSubmissionError, match="add --fresh"):
        usage_job_handover(cfg, "old-group", tmp_path, "/state/chk-3")
    with pytest.raises(JobSubmissionError, match="local or mounted directory"):
        usage_job_handover(cfg, "old-group", None, None)
    with pytest.raises(JobSubmissionError, match="stop the SQL job with `meterflow stop --savepoint` first"):
        usage_job_handover(cfg, "old-group", tmp_path, None, None)
    # A later submit restoring the handed-over job's state passes its handover on; one without state has none.
    path = write_handover(tmp_path, Handover("old-group", None, 0, {0: 1}))
    assert usage_job_handover(cfg, None, tmp_path, "/state/chk-3") == path
    assert usage_job_handover(cfg, None, tmp_path, None) is None


def test_handover_with_force_is_refused(write_config):
    result = CliRunner().invoke(
        cli, ["--config", str(write_config(TWO_STAGE)), "submit", "--force", "--handover-from", "old-group"]
    )
    assert isinstance(result.exception, JobSubmissionError)
    assert "stop the job first, not --force" in str(result.exception)
