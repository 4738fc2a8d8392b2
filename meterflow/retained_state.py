"""Where a job resumes: the newest checkpoint or savepoint a stopped, failed or lost job left behind,
and which config changes such a state cannot take.

Each job keeps its state under ``<flink.checkpoint_dir>/<job name>/``: Flink's checkpoints in
``<job id>/chk-<n>/``, the savepoints ``meterflow stop --savepoint`` takes in ``savepoints/``, and
``job.json``, the settings the state was made with. A checkpoint or savepoint is complete once
its ``_metadata`` file exists; the newest complete one is what a resubmit restores, so a job is
never started from empty state by accident (the dedup ids, open windows and held watermark
would be lost, and the consumer group's offsets would skip what those windows had counted).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from meterflow.config import JobConfig
from meterflow.config_values import format_duration
from meterflow.errors import JobSubmissionError

JOB_SETTINGS_FILE = "job.json"
SAVEPOINTS = "savepoints"
# A retained state set aside by ``meterflow submit --fresh``: kept for a post-mortem, never restored.
FORGOTTEN_MARK = ".forgotten-"


@dataclass(frozen=True)
class RetainedState:
    """A complete checkpoint or savepoint: what ``flink run -s`` takes."""

    path: Path
    kind: Literal["checkpoint", "savepoint"]
    taken_at: datetime

    def describe(self) -> str:
        """One line for the operator: kind, path and when it was taken."""
        return f"{self.kind} {self.path} (taken {self.taken_at.isoformat(timespec='seconds')})"


def checkpoint_root(cfg: JobConfig) -> Path | None:
    """The local directory of ``flink.checkpoint_dir``; None on a remote file system (s3://, hdfs://), which this tool cannot list."""
    d = cfg.flink.checkpoint_dir
    if "://" not in d:
        return cfg.path(d)
    return Path(d.removeprefix("file://")) if d.startswith("file:///") else None


def job_state_dir(cfg: JobConfig, job_name: str) -> Path | None:
    """The local directory of ``cfg.job_state_uri(job_name)``, or None where ``checkpoint_root`` is."""
    root = checkpoint_root(cfg)
    return root / job_name if root is not None else None


def retained_states(job_dir: Path) -> list[RetainedState]:
    """Every complete checkpoint and savepoint under a job's state directory, newest first."""
    found = [RetainedState(m.parent, "checkpoint", _mtime(m)) for m in job_dir.glob("*/chk-*/_metadata")]
    found += [RetainedState(m.parent, "savepoint", _mtime(m)) for m in job_dir.glob(f"{SAVEPOINTS}/*/_metadata")]
    # Equal times (a coarse file system, a copy that did not keep them): the higher checkpoint number.
    return sorted(found, key=lambda s: (s.taken_at, _checkpoint_number(s.path)), reverse=True)


def legacy_checkpoints(checkpoint_dir: Path) -> list[RetainedState]:
    """Complete checkpoints in the layout before per-job directories (``<checkpoint_dir>/<job id>/chk-<n>``), newest first.

    Both jobs wrote there, so which job one belongs to is not known here: a submit that finds no
    state in the new layout but these refuses to start from empty state and lists them.
    """
    found = [
        RetainedState(m.parent, "checkpoint", _mtime(m))
        for m in checkpoint_dir.glob("*/chk-*/_metadata")
        if _JOB_ID.fullmatch(m.parent.parent.name)
    ]
    return sorted(found, key=lambda s: (s.taken_at, _checkpoint_number(s.path)), reverse=True)


def settings_beside(state: str) -> dict[str, Any] | None:
    """The settings recorded with the job whose state directory holds ``state`` (a local checkpoint or savepoint path), or None."""
    path = Path(state.removeprefix("file://")) if state.startswith("file://") or "://" not in state else None
    return read_job_settings(path.parent.parent) if path is not None else None


def newest_retained(job_dir: Path) -> RetainedState | None:
    """The state a resubmit restores: the newest complete checkpoint or savepoint, or None."""
    states = retained_states(job_dir)
    return states[0] if states else None


def forget(job_dir: Path, now: datetime) -> Path:
    """Set a job's retained state aside (renamed, not deleted) so that no later submit restores it."""
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    aside = job_dir.with_name(f"{job_dir.name}{FORGOTTEN_MARK}{stamp}")
    n = 1
    while aside.exists():  # set aside twice within a second
        n += 1
        aside = job_dir.with_name(f"{job_dir.name}{FORGOTTEN_MARK}{stamp}-{n}")
    job_dir.rename(aside)
    return aside


def job_settings(cfg: JobConfig, window_aggregate: str) -> dict[str, Any]:
    """The usage job's settings its state depends on: the graph, the window size, the window aggregate's SQL
    (``window_aggregate``, jobs/plan.py ``quantity_expr``: the accumulators the window state holds)
    and, per meter, what splits its rows (group-by and unique dimensions).

    Meters may be added or removed where the aggregate stays the same (meters that all SUM): the
    dead-letter replay after adding a meter depends on it.
    """
    return {
        "usage_graph": cfg.flink.usage_graph,
        "window_size": format_duration(cfg.event_time.window_size),
        "window_aggregate": window_aggregate,
        "meters": {m.name: {"group_by": list(m.group_by), "unique_dimension": m.unique_dimension} for m in cfg.meters},
    }


def unsafe_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the settings a state was made with and this config, each as a sentence; empty if it may be restored.

    Lateness, watermark delay and early firing may change across a restore (the classifier keeps
    closed windows closed); parallelism may change too (keyed state is redistributed).
    """
    problems = []
    # States recorded before the setting existed were all made by the SQL graph.
    if before.get("usage_graph", "sql") != now.get("usage_graph", "sql"):
        problems.append(
            f"flink.usage_graph was {before.get('usage_graph', 'sql')} and is {now.get('usage_graph', 'sql')}"
            " (the two graphs keep different state)"
        )
    if before.get("window_size") != now["window_size"]:
        problems.append(f"event_time.window_size was {before.get('window_size')} and is {now['window_size']}")
    if before.get("window_aggregate") != now["window_aggregate"]:
        problems.append(
            "the window aggregate changes (a meter's aggregation changed, or meters were added or removed beside meters that do not SUM):"
            f" it was {before.get('window_aggregate')} and is {now['window_aggregate']}"
        )
    old_meters: dict[str, Any] = before.get("meters", {})
    new_meters: dict[str, Any] = now["meters"]
    for name in sorted(old_meters.keys() & new_meters.keys()):
        for key in sorted(old_meters[name].keys() | new_meters[name].keys()):
            if old_meters[name].get(key) != new_meters[name].get(key):
                problems.append(
                    f"meter {name}: {key} was {old_meters[name].get(key)} and is {new_meters[name].get(key)}"
                )
    return problems


@dataclass(frozen=True)
class StartPoint:
    """How ``meterflow submit`` starts a job: from which state (None: empty) and what the operator is told."""

    restore: str | None
    notes: tuple[str, ...]
    forget: bool = False  # set the retained state aside before starting from empty state


FORGETS = (
    "open windows and their counts so far, the dedup ids (a record read again is counted again),"
    " the held watermark (windows closed before count their late events again) and the Kafka offsets"
    " of the state (reading resumes at the consumer group's committed offsets)"
)


def plan_start(
    job_name: str,
    *,
    explicit: str | None,
    fresh: bool,
    state_uri: str,
    listable: bool,
    newest: RetainedState | None,
    recorded: dict[str, Any] | None,
    settings: dict[str, Any] | None,
    legacy: tuple[RetainedState, ...] = (),
) -> StartPoint:
    """Decide where a job starts; JobSubmissionError when it must not start at all.

    ``newest`` is the newest retained state under ``state_uri`` (None: none, or ``listable`` is
    False: a remote file system this tool cannot list); ``recorded`` the settings recorded with it
    and ``settings`` this config's (None for a job whose state does not depend on them).
    """
    if explicit and fresh:
        msg = f"{job_name}: --fresh starts from empty state and a savepoint restores one; give one of them"
        raise JobSubmissionError(msg)
    restore = explicit or (None if fresh else newest and str(newest.path))
    if restore and recorded is not None and settings is not None:
        problems = unsafe_changes(recorded, settings)
        if problems:
            msg = (
                f"{job_name} is not submitted: its state at {restore} was made with other settings ("
                + "; ".join(problems)
                + "). Such a change cannot take over a state: restart from a fresh consumer group after the last"
                " window closed (docs/operations.md, Upgrades), or put the old settings back."
            )
            raise JobSubmissionError(msg)
    if explicit:
        return StartPoint(explicit, (f"{job_name}: restoring {explicit}",))
    if fresh:
        if newest is None:
            return StartPoint(None, (f"{job_name}: starting from empty state",))
        return StartPoint(
            None,
            (
                f"{job_name}: starting from empty state; its newest {newest.describe()} is set aside, not restored. Forgotten: {FORGETS}",
            ),
            forget=True,
        )
    if newest is not None:
        return StartPoint(str(newest.path), (f"{job_name}: restoring its newest {newest.describe()}",))
    if legacy:
        listed = ", ".join(str(state.path) for state in legacy[:4])
        msg = (
            f"{job_name} is not submitted: no state under {state_uri}, but checkpoints of the layout before per-job directories"
            f" exist ({listed}{', ...' if len(legacy) > 4 else ''}): pass the one of this job with --savepoint (usage job) or"
            " --billing-savepoint (billing job), or --fresh to start from empty state"
        )
        raise JobSubmissionError(msg)
    if not listable:
        msg = (
            f"{job_name} is not submitted: its retained checkpoints under {state_uri} cannot be listed from here;"
            " pass the one to restore with --savepoint (or --billing-savepoint), or --fresh to start from empty state"
        )
        raise JobSubmissionError(msg)
    return StartPoint(
        None, (f"{job_name}: no retained checkpoint or savepoint under {state_uri}: starting from empty state",)
    )


def read_job_settings(job_dir: Path) -> dict[str, Any] | None:
    """The settings recorded with a job's state, or None when none were recorded."""
    path = job_dir / JOB_SETTINGS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_job_settings(job_dir: Path, settings: dict[str, Any]) -> None:
    """Record the settings the job's state is made with, beside it."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / JOB_SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


_JOB_ID = re.compile(r"[0-9a-f]{32}")


def _checkpoint_number(path: Path) -> int:
    return int(path.name.removeprefix("chk-")) if path.name.startswith("chk-") and path.name[4:].isdigit() else -1


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)
