"""Handing the counting over from the SQL graph to the two-stage graph (pure): where the new graph
starts reading, what it treats as read already, and the watermark it starts from.

The two graphs keep different state, so the new one cannot restore the old one's savepoint. It
rebuilds what matters of it from the usage-events topic instead, in a job of its own consumer group:

- **Windows the old graph closed stay closed.** The new graph's first stage holds, from its start,
  the watermark and the closed-through boundary the old graph's savepoint holds, and at least the
  close time of the last window it made final, so an event of a closed window is late in both
  graphs, against the same watermark.
- **Windows it left open are counted again, whole.** Reading starts early enough to hold every event
  of a window that was still open: its rows are recomputed from all their events and made final
  once, by the new graph; the usage table keeps the higher revision meanwhile (the revision is the
  event count).
- **The dedup ids are rebuilt.** Every record from the start is read: its id is marked seen, so a
  copy sent after the handover is a duplicate, as it was for the old graph.
- **What the old graph routed is routed once.** A record below the offsets the old graph's savepoint
  holds for its source (jvm/ ``SavepointOffsets``) was read by the old graph: its dead letter, or its late event, went out then, and goes
  nowhere now; only counting it in a window left open remains.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from meterflow.config import JobConfig
from meterflow.errors import ConfigError
from meterflow.retained_state import unsafe_changes
from meterflow.window_row import epoch_ms

# Beside the new job's retained state (flink.checkpoint_dir/<job name>/): every submit of that job passes it on.
HANDOVER_FILE = "handover.json"


@dataclass(frozen=True)
class Handover:
    """The new graph's start: epoch ms throughout; offsets per partition of the usage-events topic."""

    from_group: str
    # The usage-events topic the offsets are of.
    topic: str
    # The held watermark the first stage starts from: the old graph's, at least the last final window's close time (None: neither).
    watermark_ms: int | None
    # The Kafka record timestamp (the broker's append time) reading starts at.
    replay_from_ms: int
    # Per partition, the first offset the old graph had not read.
    read_below: dict[int, int]
    # The old graph's closed-through boundary: windows ending at or before it are closed (None: none held).
    closed_through_ms: int | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "from_group": self.from_group,
                "topic": self.topic,
                "watermark_ms": self.watermark_ms,
                "replay_from_ms": self.replay_from_ms,
                "read_below": {str(p): o for p, o in sorted(self.read_below.items())},
                "closed_through_ms": self.closed_through_ms,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Handover:
        data = json.loads(text)
        return cls(
            data["from_group"],
            data["topic"],
            data["watermark_ms"],
            data["replay_from_ms"],
            {int(p): int(o) for p, o in data["read_below"].items()},
            data.get("closed_through_ms"),
        )

    @classmethod
    def load(cls, path: Path) -> Handover:
        """The handover a job's state started with, from its file (:func:`write_handover`)."""
        return cls.from_json(path.read_text())


@dataclass(frozen=True)
class StoppedAt:
    """Where the old graph's savepoint left off (jvm/ ``SavepointOffsets``)."""

    offsets: dict[int, int]  # per partition its source read, the next offset
    held_watermark_ms: int | None = None
    closed_through_ms: int | None = None

    @classmethod
    def parse(cls, text: str) -> StoppedAt:
        """From SavepointOffsets' output: "partition P OFFSET" lines, then "held-watermark MS" and "closed-through MS" if held."""
        offsets: dict[int, int] = {}
        held: dict[str, int] = {}
        for line in text.splitlines():
            match line.split():
                case ["partition", partition, offset]:
                    offsets[int(partition)] = int(offset)
                case [("held-watermark" | "closed-through") as name, value]:
                    held[name] = int(value)
                case []:
                    pass
                case _:
                    msg = f"unexpected line from the savepoint reader: {line!r}"
                    raise ValueError(msg)
        return cls(offsets, held.get("held-watermark"), held.get("closed-through"))


def read_below(committed: Mapping[int, int], stopped: StoppedAt) -> dict[int, int]:
    """Per partition, the first offset the old graph had not read: the savepoint's, exactly where it
    stopped; the group's committed offset only where its readers had not read since they started there
    (Flink commits the group's offsets after a checkpoint, and may not for the savepoint it stops with)."""
    return {**committed, **stopped.offsets}


def handover_refusal(
    job_name: str,
    restore: str | None,
    newest_savepoint: Path | None,
    recorded: Mapping[str, object] | None,
    settings: Mapping[str, object],
) -> str | None:
    """Why a job cannot start as a handover from the state it left (None: it can): it must start from
    empty state, from a savepoint of the SQL graph (a checkpoint's outputs may not all be committed)
    made with this config's window size, window aggregate and meter dimensions."""
    if restore:
        return f"--handover-from starts from empty state, and this submit would restore {restore}: add --fresh"
    if newest_savepoint is None:
        return (
            f"{job_name} left no savepoint to hand over from: stop the SQL job with `meterflow stop --savepoint <id>` first"
            " (after a submit with --handover-from that failed, the handover is kept: run `meterflow submit` again)"
        )
    if recorded is None:
        return None
    if recorded.get("usage_graph", "sql") != "sql":
        return f"{newest_savepoint} is the two-stage graph's: a handover starts it from the SQL graph's savepoint"
    changed = [c for c in unsafe_changes(dict(recorded), dict(settings)) if not c.startswith("flink.usage_graph")]
    if changed:
        return f"the SQL job's state was made with other settings ({'; '.join(changed)}): hand over with the settings it ran with"
    return None


def plan_handover(
    cfg: JobConfig,
    from_group: str,
    below: Mapping[int, int],
    last_final_end: datetime | None,
    stopped: StoppedAt | None = None,
) -> Handover:
    """The handover from the job of consumer group ``from_group``, which read every record below
    ``below`` (offsets per partition), held what ``stopped`` says, and made final every window
    ending at or before ``last_final_end``; or why not (:class:`ConfigError` naming the fix).

    Reading starts ``dedup_horizon`` before the earliest copy the old graph could still have
    dropped as a duplicate in a window it left open: such a copy is appended at most
    ``event_time.max_event_ahead`` before its window, which starts at or after the last final window's
    end, less one window. So every id the old graph held for those windows is marked again.
    """
    et = cfg.event_time
    if cfg.flink.usage_graph != "two_stage":
        msg = "a handover starts the two-stage graph from the SQL graph: set flink.usage_graph: two_stage"
        raise ConfigError(msg)
    if from_group == cfg.kafka.consumer_group:
        msg = f"kafka.consumer_group is still {from_group}, the group handed over from: give the new job a new group"
        raise ConfigError(msg)
    if not below:
        msg = f"neither the job's state nor consumer group {from_group} holds an offset on {cfg.kafka.usage_events_topic}: nothing to hand over from (a new start needs no handover)"
        raise ConfigError(msg)
    stopped = stopped or StoppedAt({})
    held = [w for w in (stopped.held_watermark_ms,) if w is not None]
    replay_from = 0
    if last_final_end is not None:
        end_ms = epoch_ms(last_final_end)
        held.append(end_ms - 1 + _ms(et.allowed_lateness))
        replay_from = max(0, end_ms - _ms(et.window_size) - _ms(et.max_event_ahead) - _ms(et.dedup_horizon))
    return Handover(
        from_group,
        cfg.kafka.usage_events_topic,
        max(held) if held else None,
        replay_from,
        dict(below),
        stopped.closed_through_ms,
    )


def _ms(d: timedelta) -> int:
    return d // timedelta(milliseconds=1)


def read_handover(job_dir: Path | None) -> Handover | None:
    """The handover beside a job's retained state, if its start was a handover."""
    if job_dir is None:
        return None
    path = job_dir / HANDOVER_FILE
    return Handover.load(path) if path.is_file() else None


def write_handover(job_dir: Path, handover: Handover) -> Path:
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / HANDOVER_FILE
    path.write_text(handover.to_json() + "\n")
    return path
