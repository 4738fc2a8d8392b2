"""`meterflow submit` refuses jobs that can never all get a task slot, before it submits any, and says what to change."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from meterflow.commands import cli
from meterflow.config import load_config
from meterflow.errors import JobSubmissionError
from meterflow.local import flink_jobs


def test_the_jobs_need_their_parallelisms_in_slots(write_config):
    cfg = load_config(write_config("flink:\n  parallelism: 2\nbilling:\n  enabled: true\n"), environ={})
    assert sorted(flink_jobs.slot_needs(cfg).values()) == [2, 2]
    cfg = load_config(
        write_config("flink:\n  parallelism: 2\nbilling:\n  enabled: true\n  parallelism: 1\n"), environ={}
    )
    assert sorted(flink_jobs.slot_needs(cfg).values()) == [1, 2]
    cfg = load_config(write_config("flink:\n  parallelism: 3\nbilling:\n  enabled: false\n"), environ={})
    assert list(flink_jobs.slot_needs(cfg).values()) == [3]


@pytest.mark.parametrize(("total", "refused"), [(4, False), (3, True), (2, True), (0, False)])
def test_exactly_enough_slots_fit_and_one_fewer_is_refused(total, refused):
    needs = {
        "the usage job (flink.parallelism)": 2,
        "the billing job (billing.parallelism, default flink.parallelism)": 2,
    }
    problem = flink_jobs.slot_shortfall(needs, total)
    assert (problem is not None) == refused
    if refused:
        assert f"the cluster has {total} task slots and the jobs need 4" in problem
        assert "flink.task_slots" in problem and "lower the parallelism" in problem


def test_submit_refuses_before_submitting_either_job(write_config, monkeypatch):
    """flink.parallelism 2 with billing on a cluster of 2 slots: once a 180 s wait ending in "state RUNNING", now refused at once."""
    path = write_config("flink:\n  parallelism: 2\n  task_slots: 2\nbilling:\n  enabled: true\n")
    submitted = []
    monkeypatch.setattr(flink_jobs, "rest", lambda c, p: {"slots-total": 2, "slots-available": 2})
    monkeypatch.setattr(flink_jobs, "running_jobs", lambda c, name=None: [])
    monkeypatch.setattr(flink_jobs, "check_input_topics", lambda c: None)
    monkeypatch.setattr(flink_jobs, "check_transaction_timeout", lambda c: None)
    monkeypatch.setattr(flink_jobs, "submit", lambda c, p, savepoint=None: submitted.append("usage") or "0" * 32)
    monkeypatch.setattr(
        flink_jobs, "submit_billing", lambda c, p, savepoint=None: submitted.append("billing") or "1" * 32
    )
    result = CliRunner().invoke(cli, ["--config", str(path), "submit"])
    assert isinstance(result.exception, JobSubmissionError), result.output
    assert "the cluster has 2 task slots and the jobs need 4" in str(result.exception)
    assert submitted == []
    monkeypatch.setattr(flink_jobs, "rest", lambda c, p: {"slots-total": 4, "slots-available": 4})
    result = CliRunner().invoke(cli, ["--config", str(path), "submit"])
    assert result.exit_code == 0, result.output
    assert submitted == ["usage", "billing"]


def test_stack_up_refuses_a_taskmanager_too_small_for_the_jobs(write_config):
    """The local stack is sized for the jobs it runs: flink.task_slots below the two parallelisms is refused before anything starts."""
    from meterflow.errors import StackError
    from meterflow.local.stack import LocalStack

    cfg = load_config(
        write_config("flink:\n  parallelism: 2\n  task_slots: 3\nbilling:\n  enabled: true\n"), environ={}
    )
    with pytest.raises(StackError, match="flink.task_slots gives 3 task slots and the jobs need 4"):
        LocalStack(cfg).up(echo=lambda m: None)
