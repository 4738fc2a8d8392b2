"""The local stack's TaskManager supervisor: when it starts a replacement, and what it logs."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from meterflow.local.supervisor import Watch, next_step, supervise
from meterflow.local.supervisor_log import REPLACED, replacements


def test_a_replacement_starts_once_the_loss_has_lasted_the_delay():
    watch, start = next_step(Watch(), taskmanager_running=False, jobmanager_answers=True, now=100.0, delay=5)
    assert watch.lost_since == 100.0 and not start
    watch, start = next_step(watch, False, True, now=104.9, delay=5)
    assert watch.lost_since == 100.0 and not start  # one tick short of the delay
    watch, start = next_step(watch, False, True, now=105.0, delay=5)
    assert start and watch.lost_since is None


@pytest.mark.parametrize(("running", "answers"), [(True, True), (False, False), (True, False)])
def test_no_replacement_while_one_runs_or_without_a_jobmanager(running, answers):
    """A TaskManager still starting counts as running; without a JobManager the loss is not the supervisor's."""
    watch, start = next_step(Watch(lost_since=0.0), running, answers, now=1000.0, delay=5)
    assert not start and watch.lost_since is None


def test_a_taskmanager_back_before_the_delay_ends_the_loss():
    watch, _ = next_step(Watch(), False, True, now=0.0, delay=5)
    watch, _ = next_step(watch, True, True, now=3.0, delay=5)  # the operator started one
    watch, start = next_step(watch, False, True, now=6.0, delay=5)
    assert not start and watch.lost_since == 6.0


def test_supervise_starts_one_replacement_per_loss_and_logs_it(monkeypatch):
    monkeypatch.setattr("meterflow.local.supervisor.time.sleep", lambda s: None)
    now = iter(range(100))
    alive = {"tm": False}
    started, lines = [], []
    looks = iter(range(12))

    def start() -> None:
        started.append(1)
        alive["tm"] = True

    supervise(
        lambda: alive["tm"],
        lambda: True,
        start,
        delay=3,
        log=lines.append,
        clock=lambda: float(next(now)),
        keep_going=lambda: next(looks, None) is not None,
    )
    assert started == [1]
    assert lines == [
        "no TaskManager running; starting a replacement in 3s unless one starts",
        f"{REPLACED} (it was gone for at least 3s)",
    ]


def test_replacements_are_read_back_from_the_log(tmp_path):
    log = tmp_path / "supervisor.log"
    assert replacements(log) == []
    log.write_text(
        "2026-12-05T18:00:00+00:00 supervising the TaskManager of http://127.0.0.1:8081\n"
        "2026-12-05T18:36:26+00:00 no TaskManager running; starting a replacement in 5s unless one starts\n"
        f"2026-12-05T18:36:31+00:00 {REPLACED} (it was gone for at least 5s)\n"
    )
    assert replacements(log) == [datetime(2026, 12, 5, 18, 36, 31, tzinfo=UTC)]
