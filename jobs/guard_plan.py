"""Pure parameters of the window guard (jvm/ ``WindowGuard``): what it reads of the validated events, and what it caps."""

from __future__ import annotations

from jobs.source_plan import EVENT_FIELDS, VALIDATED_VIEW
from meterflow.config import JobConfig

# The window guard (jvm/ WindowGuard) between the validation and the dedup: it caps the dimension
# combinations and the sum of |quantity| of each (tenant, customer, meter, window), and sets the
# reject_reason of what it refuses. Its input is the validated view without its processing-time
# attribute (a DataStream has none; the guarded view declares it again):
GUARD_INPUT_COLUMNS = (
    *EVENT_FIELDS,
    "payload",
    "source_topic",
    "source_partition",
    "source_offset",
    "kafka_timestamp",
    "dimensions_key",
    "reject_reason",
)
# Its output, the validated columns again, which the routed query reads:
GUARDED_VIEW = "guarded_events"


def unique_dimensions(cfg: JobConfig) -> dict[str, str]:
    """Each UNIQUE_COUNT meter's unique dimension: the window guard caps its distinct values, the stages count them."""
    return {m.name: m.unique_dimension for m in cfg.meters if m.unique_dimension}


def guard_input_query(extra: tuple[str, ...] = ()) -> str:
    """The validated view's columns the window guard reads and passes on (all but ``proc_time``), then ``extra`` ones."""
    return f"SELECT {', '.join(f'`{c}`' for c in (*GUARD_INPUT_COLUMNS, *extra))} FROM `{VALIDATED_VIEW}`"
