"""Pure parameters of the two-stage graph (``flink.usage_graph: two_stage``; jvm/ ``dev.meterflow.stages.TwoStages``).

Validated, counted events leave the SQL part of the graph here; the stages count them, and hand
back provisional and final window rows (for the same sinks as the SQL graph's) and late events.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from jobs.guard_plan import unique_dimensions
from jobs.source_plan import EVENT_FIELDS
from jobs.sql import ms
from meterflow.config import JobConfig
from meterflow.handover import Handover

# The late events the first stage routes, as rows of jvm/ StageRows.lateType(), for the late sink's insert.
STAGE_LATE_VIEW = "stage_late_events"
# The window guard's rejected records, split from the counted events in its task (jvm/ CountedOrRejected), for the dead-letter insert.
STAGE_REJECTED_VIEW = "guard_rejected_records"
# The columns the stages read of a validated event (jvm/ StageRows.EVENT_COLUMNS, found by name).
STAGE_INPUT_COLUMNS = (*EVENT_FIELDS, "dimensions_key")
# Open windows a first-stage subtask holds before it emits every partial: about 200 B each on the heap.
MAX_OPEN_PARTIALS = 100_000
# Java's Long.MIN_VALUE: jvm/ WindowClose.NO_WATERMARK and NOTHING_CLOSED, "none held".
NONE_HELD = -(2**63)
# The least time a closed window's state stays in the second stage for a partial from an input that was behind.
MIN_CLOSED_RETENTION = timedelta(minutes=10)


@dataclass(frozen=True)
class StageParameters:
    """What jvm/ ``TwoStages.apply`` takes besides the input, from the config."""

    window_size_ms: int
    allowed_lateness_ms: int
    dedup_horizon_ms: int
    aggregations: dict[str, str]
    unique_dimensions: dict[str, str]
    max_partials: int
    early_fire_ms: int
    late_arrival_hold_ms: int
    retain_closed_ms: int


def closed_retention(cfg: JobConfig) -> timedelta:
    """How long the second stage keeps a closed window for a partial that comes after its final row.

    Such a partial comes from a first-stage subtask whose input was behind the others: idle, or
    catching up, for at most the source's idle and catch-up timeouts before the watermark moves on
    without it. Twice their sum, never under ``MIN_CLOSED_RETENTION``, plus the hold that gathers
    what follows such a partial (the checkpoint interval). A partial after that for a window closed
    before would make a final holding only the later events (jvm/ ``WindowMerger``).
    """
    et = cfg.event_time
    return max(MIN_CLOSED_RETENTION, 2 * (et.source_idle_timeout + et.source_catch_up_timeout)) + _hold(cfg)


def _hold(cfg: JobConfig) -> timedelta:
    # As the SQL graph's closer holds a window first seen after its close: its rows show no sooner.
    return cfg.flink.checkpoint_interval


def stage_parameters(cfg: JobConfig) -> StageParameters:
    """The stages' rules from the config: the SQL graph's window, lateness and horizon, each meter's aggregation."""
    et = cfg.event_time
    return StageParameters(
        window_size_ms=ms(et.window_size),
        allowed_lateness_ms=ms(et.allowed_lateness),
        dedup_horizon_ms=ms(et.dedup_horizon),
        aggregations={m.name: m.aggregation for m in cfg.meters},
        unique_dimensions=unique_dimensions(cfg),
        max_partials=MAX_OPEN_PARTIALS,
        early_fire_ms=ms(et.early_fire_interval),
        late_arrival_hold_ms=ms(_hold(cfg)),
        retain_closed_ms=ms(closed_retention(cfg)),
    )


def handover_start(handover: Handover | None) -> tuple[int, int]:
    """The watermark and closed-through boundary the first stage holds from its start (``NONE_HELD``: none)."""
    if handover is None:
        return NONE_HELD, NONE_HELD
    return (
        NONE_HELD if handover.watermark_ms is None else handover.watermark_ms,
        NONE_HELD if handover.closed_through_ms is None else handover.closed_through_ms,
    )
