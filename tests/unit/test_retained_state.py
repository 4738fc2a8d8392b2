"""Where a job resumes: `meterflow submit` restores the newest retained checkpoint or savepoint, never starts
from empty state while one exists unless told to (and then says what it forgets), and refuses a state
made with another window size or other meters."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner

from connectors.topics import BROKER_TRANSACTION_MAX_TIMEOUT_MS, transaction_timeout_problem
from meterflow import retained_state as rs
from meterflow.commands import cli
from meterflow.config import load_config
from meterflow.errors import ConfigError, JobSubmissionError
from meterflow.local import flink_jobs


def _complete(path, mtime: float) -> None:
    path.mkdir(parents=True)
    (path / "_metadata").write_bytes(b"x")
    os.utime(path / "_metadata", (mtime, mtime))


def test_the_newest_complete_checkpoint_or_savepoint_is_found(tmp_path):
    job = tmp_path / "meterflow-usage"
    _complete(job / ("a" * 32) / "chk-7", 1000)
    _complete(job / ("b" * 32) / "chk-3", 3000)  # the job after a lost JobManager: newer
    (job / ("b" * 32) / "chk-4").mkdir()  # in progress when the JobManager died: no _metadata
    _complete(job / "savepoints" / "savepoint-aaaaaa-1", 2000)
    states = rs.retained_states(job)
    assert [(s.kind, s.path.name) for s in states] == [
        ("checkpoint", "chk-3"),
        ("savepoint", "savepoint-aaaaaa-1"),
        ("checkpoint", "chk-7"),
    ]
    assert rs.newest_retained(job) == states[0]
    _complete(job / "savepoints" / "savepoint-bbbbbb-2", 4000)
    assert rs.newest_retained(job).kind == "savepoint"
    assert rs.newest_retained(tmp_path / "nothing-here") is None


def test_the_state_directory_is_per_job_name_and_remote_ones_are_not_listed(write_config, tmp_path):
    cfg = load_config(write_config("flink:\n  checkpoint_dir: cp\n"), environ={})
    assert rs.job_state_dir(cfg, "meterflow-usage") == tmp_path / "cp" / "meterflow-usage"
    assert cfg.job_state_uri("meterflow-usage") == (tmp_path / "cp" / "meterflow-usage").as_uri()
    cfg = load_config(write_config("flink:\n  checkpoint_dir: file:///data/cp/\n"), environ={})
    assert rs.job_state_dir(cfg, "j") == rs.Path("/data/cp/j")
    cfg = load_config(write_config("flink:\n  checkpoint_dir: s3://bucket/cp\n"), environ={})
    assert rs.job_state_dir(cfg, "j") is None
    assert cfg.job_state_uri("j") == "s3://bucket/cp/j"


NEWEST = rs.RetainedState(rs.Path("/cp/job/abc/chk-9"), "checkpoint", datetime(2026, 12, 5, 10, 0, tzinfo=UTC))
SETTINGS = {
    "window_size": "1m",
    "window_aggregate": "SUM(`quantity`)",
    "meters": {"tokens": {"group_by": [], "unique_dimension": None}},
}


def _plan(**kw):
    args = {
        "explicit": None,
        "fresh": False,
        "state_uri": "file:///cp/job",
        "listable": True,
        "newest": NEWEST,
        "recorded": SETTINGS,
        "settings": SETTINGS,
    }
    return rs.plan_start("job", **{**args, **kw})


def test_a_retained_state_is_restored_and_fresh_says_what_it_forgets():
    start = _plan()
    assert start.restore == "/cp/job/abc/chk-9" and not start.forget
    assert "restoring its newest checkpoint /cp/job/abc/chk-9 (taken 2026-12-05T10:00:00+00:00)" in start.notes[0]
    fresh = _plan(fresh=True)
    assert fresh.restore is None and fresh.forget
    assert (
        "set aside, not restored" in fresh.notes[0]
        and "dedup ids" in fresh.notes[0]
        and "held watermark" in fresh.notes[0]
    )
    assert _plan(newest=None).restore is None and "no retained checkpoint" in _plan(newest=None).notes[0]
    assert _plan(fresh=True, newest=None).forget is False
    assert _plan(explicit="/sp/1").restore == "/sp/1"
    with pytest.raises(JobSubmissionError, match="give one of them"):
        _plan(explicit="/sp/1", fresh=True)


def test_a_remote_state_directory_needs_an_explicit_start():
    with pytest.raises(JobSubmissionError, match="cannot be listed from here.*--savepoint.*--fresh"):
        _plan(listable=False, newest=None, state_uri="s3://b/cp/job")
    assert _plan(listable=False, newest=None, explicit="s3://b/cp/job/x/chk-1").restore == "s3://b/cp/job/x/chk-1"
    assert _plan(listable=False, newest=None, fresh=True).restore is None


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"window_size": "5m"}, "event_time.window_size was 1m and is 5m"),
        ({"window_aggregate": "CASE `meter` WHEN 'tokens' THEN MAX(`quantity`) END"}, "the window aggregate changes"),
        (
            {"meters": {"tokens": {"group_by": ["region"], "unique_dimension": None}}},
            "meter tokens: group_by was [] and is ['region']",
        ),
        (
            {"meters": {"tokens": {"group_by": [], "unique_dimension": "model"}}},
            "meter tokens: unique_dimension was None and is model",
        ),
        ({"usage_graph": "two_stage"}, "flink.usage_graph was sql and is two_stage"),
    ],
)
def test_a_state_of_another_window_size_aggregate_or_meter_dimensions_is_refused(change, problem):
    with pytest.raises(JobSubmissionError, match="is not submitted") as refused:
        _plan(settings={**SETTINGS, **change})
    assert problem in str(refused.value) and "fresh consumer group" in str(refused.value)
    with pytest.raises(JobSubmissionError):
        _plan(settings={**SETTINGS, **change}, explicit="/sp/1")  # a savepoint of that state too
    assert _plan(settings={**SETTINGS, **change}, fresh=True).restore is None  # starting fresh is allowed


def test_a_fresh_start_with_another_window_size_shares_the_tables_and_the_identifier_prefix():
    """Usage rows and billing identifiers hold the window's end: a 5-minute window of 10:00 is not the
    1-minute window of 10:00, so the new size needs no table or prefix of its own (settings recorded by
    an earlier release still name them, and are not held against it)."""
    five = {**SETTINGS, "window_size": "5m"}
    earlier = {**SETTINGS, "usage_table": "usage_windows", "identifier_prefix": "mf"}
    assert _plan(settings=five, fresh=True).restore is None
    assert _plan(settings=five, recorded=earlier, newest=None).restore is None
    with pytest.raises(JobSubmissionError, match="window_size was 1m and is 5m"):
        _plan(settings=five, recorded=earlier)  # restoring the 1-minute state is still refused


def test_the_job_settings_follow_the_plan(write_config):
    """Window size, the aggregate's SQL and the meters' dimensions; a meter added beside SUM meters keeps the state, one of another aggregation does not."""
    from jobs.plan import quantity_expr

    def settings(text: str) -> dict:
        cfg = load_config(write_config(text), environ={})
        return rs.job_settings(cfg, quantity_expr(cfg))

    base = settings(
        "event_time:\n  window_size: 5m\n  allowed_lateness: 30s\nmeters:\n  - name: tokens\n    group_by: [region]\n"
    )
    assert base == {
        "usage_graph": "sql",
        "window_size": "5m",
        "window_aggregate": "SUM(`quantity`)",
        "meters": {"tokens": {"group_by": ["region"], "unique_dimension": None}},
    }
    relaxed = settings(
        "event_time:\n  window_size: 5m\n  allowed_lateness: 2m\n  watermark_delay: 30s\nmeters:\n  - name: tokens\n    group_by: [region]\n"
    )
    assert rs.unsafe_changes(base, relaxed) == []  # lateness and watermark may change
    added = settings(
        "event_time:\n  window_size: 5m\nmeters:\n  - name: tokens\n    group_by: [region]\n  - name: storage\n"
    )
    assert rs.unsafe_changes(base, added) == []  # the documented dead-letter fix: a SUM meter added through a savepoint
    peak = settings(
        "event_time:\n  window_size: 5m\nmeters:\n  - name: tokens\n    group_by: [region]\n  - name: peak\n    aggregation: MAX\n"
    )
    assert [p.split(":")[0] for p in rs.unsafe_changes(base, peak)] == [
        "the window aggregate changes (a meter's aggregation changed, or meters were added or removed beside meters that do not SUM)"
    ]


def _stub_cluster(monkeypatch, submitted):
    monkeypatch.setattr(flink_jobs, "rest", lambda c, p: {"slots-total": 4, "slots-available": 4})
    monkeypatch.setattr(flink_jobs, "running_jobs", lambda c, name=None: [])
    monkeypatch.setattr(flink_jobs, "check_input_topics", lambda c: None)
    monkeypatch.setattr(flink_jobs, "check_transaction_timeout", lambda c: None)
    monkeypatch.setattr(
        flink_jobs, "submit", lambda c, p, savepoint=None: submitted.append(("usage", savepoint)) or "0" * 32
    )
    monkeypatch.setattr(
        flink_jobs, "submit_billing", lambda c, p, savepoint=None: submitted.append(("billing", savepoint)) or "1" * 32
    )


def test_submit_restores_each_jobs_newest_state_and_fresh_sets_it_aside(write_config, monkeypatch, tmp_path):
    path = write_config("flink:\n  checkpoint_dir: cp\nbilling:\n  enabled: true\n")
    submitted: list = []
    _stub_cluster(monkeypatch, submitted)
    run = CliRunner()
    result = run.invoke(cli, ["--config", str(path), "submit"])
    assert result.exit_code == 0, result.output
    assert submitted == [("usage", None), ("billing", None)]  # nothing retained yet
    usage, billing = tmp_path / "cp" / "meterflow-usage", tmp_path / "cp" / "meterflow-usage-billing"
    assert (usage / rs.JOB_SETTINGS_FILE).exists() and not (billing / rs.JOB_SETTINGS_FILE).exists()
    _complete(usage / ("a" * 32) / "chk-5", 1000)
    _complete(billing / ("b" * 32) / "chk-2", 1000)
    submitted.clear()
    result = run.invoke(cli, ["--config", str(path), "submit"])
    assert result.exit_code == 0, result.output
    assert submitted == [("usage", str(usage / ("a" * 32) / "chk-5")), ("billing", str(billing / ("b" * 32) / "chk-2"))]
    submitted.clear()
    result = run.invoke(cli, ["--config", str(path), "submit", "--fresh"])
    assert result.exit_code == 0, result.output
    assert submitted == [("usage", None), ("billing", None)]
    assert "Forgotten:" in result.output
    assert rs.newest_retained(usage) is None  # set aside: a later submit does not restore it ...
    aside = [p for p in (tmp_path / "cp").iterdir() if rs.FORGOTTEN_MARK in p.name]
    assert len(aside) == 2 and all(rs.newest_retained(p) for p in aside)  # ... and it is kept


def test_submit_refuses_a_window_size_change_over_a_retained_state(write_config, monkeypatch, tmp_path):
    path = write_config("flink:\n  checkpoint_dir: cp\n")
    submitted: list = []
    _stub_cluster(monkeypatch, submitted)
    assert CliRunner().invoke(cli, ["--config", str(path), "submit"]).exit_code == 0
    _complete(tmp_path / "cp" / "meterflow-usage" / ("a" * 32) / "chk-5", 1000)
    path.write_text("flink:\n  checkpoint_dir: cp\nevent_time:\n  window_size: 5m\n")
    submitted.clear()
    result = CliRunner().invoke(cli, ["--config", str(path), "submit"])
    assert isinstance(result.exception, JobSubmissionError) and "event_time.window_size was 1m and is 5m" in str(
        result.exception
    )
    assert submitted == []


def test_the_transaction_timeout_outlives_checkpoints_and_fits_the_brokers(write_config):
    cfg = load_config(write_config(""), environ={})
    assert cfg.kafka.transaction_timeout.total_seconds() == 24 * 3600
    assert transaction_timeout_problem(cfg, BROKER_TRANSACTION_MAX_TIMEOUT_MS) is None
    assert "raise transaction.max.timeout.ms on the brokers" in transaction_timeout_problem(cfg, 900_000)
    exactly = load_config(write_config("kafka:\n  transaction_timeout: 15m\n"), environ={})
    assert transaction_timeout_problem(exactly, 900_000) is None
    one_more = load_config(write_config("kafka:\n  transaction_timeout: 901s\n"), environ={})
    assert transaction_timeout_problem(one_more, 900_000) is not None
    with pytest.raises(ConfigError, match="must exceed flink.checkpoint_timeout"):
        load_config(write_config("kafka:\n  transaction_timeout: 10m\nflink:\n  checkpoint_timeout: 10m\n"), environ={})
    assert load_config(
        write_config("kafka:\n  transaction_timeout: 601s\nflink:\n  checkpoint_timeout: 10m\n"), environ={}
    )


def test_checkpoints_of_the_old_layout_are_not_forgotten_silently(write_config, monkeypatch, tmp_path):
    """Before per-job directories both jobs wrote <checkpoint_dir>/<job id>/chk-<n>: a submit that finds only those refuses and lists them."""
    path = write_config("flink:\n  checkpoint_dir: cp\n")
    submitted: list = []
    _stub_cluster(monkeypatch, submitted)
    old = tmp_path / "cp" / ("c" * 32) / "chk-12"
    _complete(old, 1000)
    result = CliRunner().invoke(cli, ["--config", str(path), "submit"])
    assert (
        isinstance(result.exception, JobSubmissionError)
        and str(old) in str(result.exception)
        and "--savepoint" in str(result.exception)
    )
    assert submitted == []
    result = CliRunner().invoke(cli, ["--config", str(path), "submit", "--savepoint", str(old)])
    assert result.exit_code == 0, result.output
    assert submitted == [("usage", str(old))]


def test_equal_times_pick_the_higher_checkpoint_and_a_path_with_a_space_is_listed_as_flink_writes_it(
    write_config, tmp_path
):
    job = tmp_path / "job"
    _complete(job / ("a" * 32) / "chk-9", 1000)
    _complete(job / ("a" * 32) / "chk-10", 1000)
    assert rs.newest_retained(job).path.name == "chk-10"
    cfg = load_config(write_config("flink:\n  checkpoint_dir: cp with space#1\n"), environ={})
    assert (
        cfg.job_state_uri("j") == f"file://{tmp_path}/cp with space#1/j"
    )  # Flink does not decode %20: the path as it is
    assert rs.job_state_dir(cfg, "j") == tmp_path / "cp with space#1" / "j"


def test_a_submit_refused_for_one_job_submits_neither_and_fresh_with_force_is_refused(
    write_config, monkeypatch, tmp_path
):
    path = write_config("flink:\n  checkpoint_dir: s3://bucket/cp\nbilling:\n  enabled: true\n")
    submitted: list = []
    _stub_cluster(monkeypatch, submitted)
    result = CliRunner().invoke(
        cli, ["--config", str(path), "submit", "--savepoint", "s3://bucket/cp/meterflow-usage/x/chk-1"]
    )
    assert isinstance(result.exception, JobSubmissionError) and "meterflow-usage-billing is not submitted" in str(
        result.exception
    )
    assert submitted == []  # the usage job, whose start was given, waited for the billing job's
    result = CliRunner().invoke(cli, ["--config", str(path), "submit", "--fresh", "--force"])
    assert isinstance(result.exception, JobSubmissionError) and "stop it first" in str(result.exception)


def test_settings_are_recorded_after_the_submit_and_read_beside_an_explicit_savepoint(
    write_config, monkeypatch, tmp_path
):
    path = write_config("flink:\n  checkpoint_dir: cp\n")
    submitted: list = []
    _stub_cluster(monkeypatch, submitted)

    def failing(c, p, savepoint=None):
        raise JobSubmissionError("flink run failed")

    monkeypatch.setattr(flink_jobs, "submit", failing)
    assert CliRunner().invoke(cli, ["--config", str(path), "submit"]).exit_code != 0
    assert not (tmp_path / "cp" / "meterflow-usage" / rs.JOB_SETTINGS_FILE).exists()  # no job ran with these settings
    other = tmp_path / "cp" / "other-job"
    rs.write_job_settings(other, {**SETTINGS, "window_size": "10m"})
    _complete(other / "savepoints" / "savepoint-1", 1000)
    _stub_cluster(monkeypatch, submitted)
    result = CliRunner().invoke(
        cli, ["--config", str(path), "submit", "--savepoint", str(other / "savepoints" / "savepoint-1")]
    )
    assert isinstance(result.exception, JobSubmissionError) and "window_size was 10m and is 1m" in str(result.exception)


def test_forgetting_twice_in_a_second_keeps_both(tmp_path):
    now = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
    for _ in range(2):
        (tmp_path / "job").mkdir()
        rs.forget(tmp_path / "job", now)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "job.forgotten-20261205T100000Z",
        "job.forgotten-20261205T100000Z-2",
    ]
