"""The benchmark's input and its oracle, both pure.

``generate`` yields a deterministic stream of records (unique events, producer-retry duplicates and
events far behind the stream that the job must classify late), each with the partition it is sent
to. ``Oracle`` recomputes, independently of how the stream was made, what every pipeline must
output: the first copy of each (tenant, event id) counts, unless the watermark (per partition
max event time - delay, the minimum over partitions) has already passed its window's end +
allowed lateness. Quantities are integers of 1e-9 units, never floats.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import NamedTuple

from connectors.avro_codec import UsageEvent
from meterflow.windowing import is_window_closed, window_start_ms

NANOS = 10**9
CLOSER_TENANT = "bench-watermark-closer"

WindowKey = tuple[str, str, str, int]
"""(tenant_id, customer_id, meter, window start in epoch ms)"""


class Record(NamedTuple):
    """One Kafka record of the benchmark topic."""

    event_id: str
    tenant_id: str
    customer_id: str
    meter: str
    quantity_nanos: int
    event_time_ms: int
    partition: int


@dataclass(frozen=True)
class DatasetSpec:
    """Shape of the pre-produced data set."""

    events: int = 2_000_000
    tenants: int = 10
    customers: int = 100
    meters: tuple[str, ...] = ("api_calls", "tokens")
    duplicate_ratio: float = 0.05
    late_ratio: float = 0.001
    partitions: int = 3
    start_ms: int = 0
    span_ms: int = 3_600_000
    window_ms: int = 60_000
    jitter_ms: int = 1_000
    late_by_ms: int = 0
    # Late events start once every partition has been read for a while (a watermark exists everywhere).
    late_from_windows: int = 2
    seed: int = 11

    def __post_init__(self) -> None:
        if self.events < 1 or self.tenants < 1 or self.customers < 1 or self.partitions < 1 or not self.meters:
            msg = "events, tenants, customers, partitions and meters must all be positive"
            raise ValueError(msg)
        if not 0 <= self.duplicate_ratio + self.late_ratio < 1:
            msg = "duplicate_ratio + late_ratio must be in [0, 1)"
            raise ValueError(msg)
        if self.start_ms % self.window_ms:
            msg = "start_ms must be aligned to the window size"
            raise ValueError(msg)
        if not self.late_by_ms:
            # Far enough behind that no partition can still hold the watermark before the event's window:
            # a source reads each partition in chunks, so partitions' positions differ by minutes of
            # event time on a small data set.
            object.__setattr__(self, "late_by_ms", max(600_000, self.span_ms // 2))


def message_key(tenant_id: str, customer_id: str) -> str:
    """The Kafka key the project's producer uses: one customer's events stay in one partition."""
    return f"{tenant_id}/{customer_id}"


def partition_of(tenant_id: str, customer_id: str, partitions: int) -> int:
    """Stable partition of a customer (crc32 of the key), so offsets are known before sending."""
    return zlib.crc32(message_key(tenant_id, customer_id).encode()) % partitions


def quantity_nanos(meter: str, rng: random.Random) -> int:
    """A whole number of calls for ``api_calls``, three decimals for any other meter."""
    if meter == "api_calls":
        return rng.randint(1, 5) * NANOS
    return rng.randint(1, 500_000) * 10**6


def generate(spec: DatasetSpec) -> Iterator[Record]:
    """The records in send order: event time advances with the position, out of order by up to ``jitter_ms``.

    A ``duplicate_ratio`` share repeats a recent event (same id and content, like a producer retry);
    a ``late_ratio`` share are new events dated ``late_by_ms`` or more behind the stream, from the
    ``late_from_windows``-th window on (dated before ``start_ms`` early on), so that a prefix of the
    stream holds late events like the whole.
    """
    rng = random.Random(spec.seed)
    recent: list[Record] = []
    late_threshold = spec.duplicate_ratio + spec.late_ratio
    end_ms = spec.start_ms + spec.span_ms - 1
    for j in range(spec.events):
        position_ms = spec.start_ms + (spec.span_ms * j) // spec.events
        draw = rng.random()
        if draw < spec.duplicate_ratio and recent:
            yield recent[rng.randrange(len(recent))]
            continue
        tenant = f"tenant-{rng.randrange(spec.tenants)}"
        customer = f"cust-{rng.randrange(spec.customers)}"
        meter = spec.meters[rng.randrange(len(spec.meters))]
        quantity = quantity_nanos(meter, rng)
        late_at = position_ms - spec.late_by_ms - rng.randrange(spec.window_ms)
        if draw < late_threshold and position_ms >= spec.start_ms + spec.late_from_windows * spec.window_ms:
            yield Record(
                f"e{spec.seed}-{j}",
                tenant,
                customer,
                meter,
                quantity,
                late_at,
                partition_of(tenant, customer, spec.partitions),
            )
            continue
        at = min(max(position_ms + rng.randint(-spec.jitter_ms, spec.jitter_ms), spec.start_ms), end_ms)
        record = Record(
            f"e{spec.seed}-{j}", tenant, customer, meter, quantity, at, partition_of(tenant, customer, spec.partitions)
        )
        recent.append(record)
        if len(recent) > 1000:
            recent.pop(0)
        yield record


def closers(at_ms: int, partitions: int) -> list[Record]:
    """One record per partition dated ``at_ms``: moves every partition's watermark past the data."""
    return [
        Record(f"closer-{at_ms}-{p}", CLOSER_TENANT, f"p{p}", "api_calls", NANOS, at_ms, p) for p in range(partitions)
    ]


def to_usage_event(record: Record) -> UsageEvent:
    """The Avro-level event of a record (exact Decimal quantity, aware UTC time)."""
    return UsageEvent(
        event_id=record.event_id,
        tenant_id=record.tenant_id,
        customer_id=record.customer_id,
        meter=record.meter,
        quantity=Decimal(record.quantity_nanos).scaleb(-9),
        event_time=datetime.fromtimestamp(record.event_time_ms / 1000, UTC),
        dimensions={},
    )


@dataclass
class Totals:
    """Expected output: per window key the quantity (1e-9 units) and event count, plus the fates."""

    windows: dict[WindowKey, tuple[int, int]] = field(default_factory=dict)
    counted: int = 0
    duplicates: int = 0
    late: int = 0
    records: int = 0


class Oracle:
    """Recomputes the expected totals record by record, in send order."""

    def __init__(self, partitions: int, window_ms: int, watermark_delay_ms: int, allowed_lateness_ms: int = 0) -> None:
        self.window_ms = window_ms
        self.delay_ms = watermark_delay_ms
        self.lateness_ms = allowed_lateness_ms
        self.max_time: list[int | None] = [None] * partitions
        self.seen: set[tuple[str, str]] = set()
        self.acc: dict[WindowKey, list[int]] = {}
        self.counted = self.duplicates = self.late = self.records = 0

    def watermark(self) -> int | None:
        """Minimum over partitions of (max event time - delay); None until every partition has data."""
        if any(t is None for t in self.max_time):
            return None
        return min(t for t in self.max_time if t is not None) - self.delay_ms

    def add(self, record: Record) -> str:
        """Account one record; returns its fate: ``counted``, ``duplicate`` or ``late``."""
        self.records += 1
        wm = self.watermark()
        p = record.partition
        current = self.max_time[p]
        if current is None or record.event_time_ms > current:
            self.max_time[p] = record.event_time_ms
        ident = (record.tenant_id, record.event_id)
        if ident in self.seen:
            self.duplicates += 1
            return "duplicate"
        self.seen.add(ident)
        start = window_start_ms(record.event_time_ms, self.window_ms)
        if wm is not None and is_window_closed(start + self.window_ms, wm, self.lateness_ms):
            self.late += 1
            return "late"
        self.counted += 1
        if record.tenant_id == CLOSER_TENANT:
            return "counted"
        slot = self.acc.setdefault((record.tenant_id, record.customer_id, record.meter, start), [0, 0])
        slot[0] += record.quantity_nanos
        slot[1] += 1
        return "counted"

    def totals(self) -> Totals:
        """A snapshot of the expected output so far (closer records are not in ``windows``)."""
        return Totals(
            {k: (v[0], v[1]) for k, v in self.acc.items()}, self.counted, self.duplicates, self.late, self.records
        )


@dataclass(frozen=True)
class Comparison:
    """How a pipeline's window totals differ from the oracle's."""

    expected_windows: int
    actual_windows: int
    missing: int
    unexpected: int
    different: int
    examples: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        """Every window present with exactly the expected quantity and count, and nothing else."""
        return self.missing == 0 and self.unexpected == 0 and self.different == 0


def compare(
    expected: dict[WindowKey, tuple[int, int]], actual: dict[WindowKey, tuple[int, int]], max_examples: int = 5
) -> Comparison:
    """Compare per-window (quantity, count) exactly; keep a few examples of each kind of difference."""
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    different = [k for k in expected if k in actual and actual[k] != expected[k]]
    examples = [f"missing {k} expected {expected[k]}" for k in missing[:max_examples]]
    examples += [f"unexpected {k} = {actual[k]}" for k in unexpected[:max_examples]]
    examples += [f"{k}: expected {expected[k]}, got {actual[k]}" for k in different[:max_examples]]
    return Comparison(len(expected), len(actual), len(missing), len(unexpected), len(different), tuple(examples))


def decimal_to_nanos(value: Decimal) -> int:
    """Exact conversion of a numeric(38, 9) value to 1e-9 units (refuses finer values)."""
    scaled = value.scaleb(9)
    if scaled != scaled.to_integral_value():
        msg = f"{value} has more than 9 decimal places"
        raise ValueError(msg)
    return int(scaled)
