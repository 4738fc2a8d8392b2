"""A billing-grade test dataset with a known fate for every record, played against the real job.

Window 10 s, watermark delay 2 s, allowed lateness 10 s (tests/e2e/test_billing_semantics.py).
W0 = [T, T+10 s), W1 = [T+10, T+20), ... W5 = [T+50, T+60). A window closes, and its events become
late, when the watermark reaches end - 1 ms + 10 s (``window_fires_at_ms``).

1. **before the fault**: ``base_first`` in [T, T+25 s) with duplicates and half the malformed
   records, then one ``advance_first`` event per partition dated so that the watermark lands
   *exactly* on W1's close (T+29.999 s). When W1's rows are final in Postgres, that watermark is in
   a completed checkpoint.
2. **in flight when the fault strikes** (``risky_before``) and **sent during it**
   (``risky_during``): beyond-lateness events of W0, ``boundary`` events of W1 (late with the
   watermark exactly at end - 1 ms + lateness), within-lateness events of W2 (fired, still open:
   counted), duplicates of counted events, and malformed records. None of them moves the watermark,
   so each one's fate is fixed whatever the replay order.
3. **after recovery**: ``base_second`` in [T+25, T+60) with duplicates, ``advance_second`` at T+65
   (closes W2..W4), then within-lateness events of W5, beyond-lateness events, duplicates, and
   ``closers`` far ahead that close everything.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from connectors.avro_codec import UsageEvent, encode_usage_event
from meterflow.windowing import window_fires_at_ms
from tests.e2e.helpers import CLOSER_TENANT, closing_events

WINDOW = timedelta(seconds=10)
WATERMARK_DELAY = timedelta(seconds=2)
ALLOWED_LATENESS = timedelta(seconds=10)
CLOCK_TENANT = "clock"


def usage_event(event_id: str, tenant: str, customer: str, meter: str, quantity: Decimal, at: datetime) -> UsageEvent:
    return UsageEvent(
        event_id=event_id,
        tenant_id=tenant,
        customer_id=customer,
        meter=meter,
        quantity=quantity,
        event_time=at,
        dimensions={"region": "eu"},
    )


def close_of(start: datetime, window_index: int) -> datetime:
    """The watermark at which window ``window_index`` after ``start`` closes (the shared close rule)."""
    end_ms = int((start + (window_index + 1) * WINDOW).timestamp() * 1000)
    return datetime.fromtimestamp(
        window_fires_at_ms(end_ms, int(ALLOWED_LATENESS / timedelta(milliseconds=1))) / 1000, UTC
    )


@dataclass
class Risky:
    """One batch of records whose fate does not depend on timing: late, boundary, on time, duplicate, bad."""

    beyond_lateness: list[UsageEvent] = field(default_factory=list)
    boundary: list[UsageEvent] = field(default_factory=list)
    within_lateness: list[UsageEvent] = field(default_factory=list)
    duplicates: list[UsageEvent] = field(default_factory=list)
    bad_records: list[bytes] = field(default_factory=list)

    @property
    def events(self) -> list[UsageEvent]:
        return self.beyond_lateness + self.boundary + self.within_lateness + self.duplicates


@dataclass
class Scenario:
    """Events per phase and which ones must end up where."""

    start: datetime
    partitions: int
    base_first: list[UsageEvent] = field(default_factory=list)
    duplicates_first: list[UsageEvent] = field(default_factory=list)
    advance_first: list[UsageEvent] = field(default_factory=list)
    risky_before: Risky = field(default_factory=Risky)
    risky_during: Risky = field(default_factory=Risky)
    base_second: list[UsageEvent] = field(default_factory=list)
    duplicates_second: list[UsageEvent] = field(default_factory=list)
    advance_second: list[UsageEvent] = field(default_factory=list)
    risky_after: Risky = field(default_factory=Risky)
    closers: list[UsageEvent] = field(default_factory=list)

    @property
    def base(self) -> list[UsageEvent]:
        return self.base_first + self.base_second

    @property
    def phases(self) -> list[Risky]:
        return [self.risky_before, self.risky_during, self.risky_after]

    @property
    def late(self) -> list[UsageEvent]:
        """Unique events that must be in the late topic, each once."""
        return [e for r in self.phases for e in r.beyond_lateness + r.boundary]

    @property
    def boundary(self) -> list[UsageEvent]:
        return [e for r in self.phases for e in r.boundary]

    @property
    def bad_records(self) -> list[bytes]:
        return [b for r in self.phases for b in r.bad_records]

    @property
    def unique_counted(self) -> list[UsageEvent]:
        """Unique events that must be counted in exactly one window (the closers' window stays open)."""
        return (
            self.base + self.advance_first + self.advance_second + [e for r in self.phases for e in r.within_lateness]
        )

    @property
    def all_sent(self) -> list[UsageEvent]:
        """Every event sent, duplicates included (malformed records are counted apart)."""
        return (
            self.base_first
            + self.duplicates_first
            + self.advance_first
            + self.risky_before.events
            + self.risky_during.events
            + self.base_second
            + self.duplicates_second
            + self.advance_second
            + self.risky_after.events
            + self.closers
        )


def base_events(
    rng: random.Random,
    seed: int,
    start: datetime,
    first: int,
    count: int,
    span_from: timedelta,
    span: timedelta,
    jitter_ms: int = 1500,
) -> list[UsageEvent]:
    events = []
    for i in range(first, first + count):
        at = start + span_from + timedelta(milliseconds=(int(span / timedelta(milliseconds=1)) * (i - first)) // count)
        jitter = timedelta(milliseconds=rng.randint(-jitter_ms, jitter_ms))
        at = min(max(at + jitter, start + span_from), start + span_from + span - timedelta(milliseconds=1))
        meter = ("api_calls", "tokens")[i % 2]
        qty = Decimal(rng.randint(1, 9)) if meter == "api_calls" else Decimal(rng.randint(1, 10**6)).scaleb(-4)
        events.append(usage_event(f"b-{seed}-{i}", f"t{rng.randrange(4)}", f"c{rng.randrange(25)}", meter, qty, at))
    return events


def malformed_records(sample: UsageEvent, tag: str) -> list[bytes]:
    return [
        f"not avro at all {tag}".encode(),
        encode_usage_event(sample) + b"\xff" + tag.encode(),
        encode_usage_event({**sample, "event_id": f"bad-meter-{tag}", "meter": "gpu_hours"}),
        encode_usage_event({**sample, "event_id": f"bad-neg-{tag}", "quantity": Decimal(-5)}),
        encode_usage_event({**sample, "event_id": "", "customer_id": f"no-id-{tag}"}),
        encode_usage_event(
            {**sample, "event_id": f"bad-future-{tag}", "event_time": datetime.now(UTC) + timedelta(days=2)}
        ),
    ]


def _risky(
    rng: random.Random, s: Scenario, tag: str, counted: list[UsageEvent], count: int, within_window: int
) -> Risky:
    r = Risky()
    w = s.start
    for i in range(count):
        r.beyond_lateness.append(
            usage_event(
                f"bl-{tag}-{i}",
                f"t{i % 4}",
                f"c{i % 25}",
                "tokens",
                Decimal("2.25"),
                w + timedelta(milliseconds=rng.randint(0, 9_999)),
            )
        )
        r.boundary.append(
            usage_event(
                f"bd-{tag}-{i}",
                f"t{i % 4}",
                f"c{i % 25}",
                "api_calls",
                Decimal(3),
                w + WINDOW + timedelta(milliseconds=rng.randint(0, 9_999)),
            )
        )
        at = w + within_window * WINDOW + timedelta(milliseconds=rng.randint(0, 9_999))
        r.within_lateness.append(usage_event(f"wl-{tag}-{i}", f"t{i % 4}", f"c{i % 25}", "tokens", Decimal("0.5"), at))
    r.duplicates = rng.sample(counted, count)
    r.bad_records = malformed_records(s.base_first[0], f"{tag}")
    return r


def build_scenario(count: int, partitions: int, seed: int = 1, risky_count: int = 100) -> Scenario:
    """``count`` base events (+10% duplicates) and ``risky_count`` of each risky kind per phase."""
    rng = random.Random(seed)
    start = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
    s = Scenario(start=start, partitions=partitions)
    first = count * 25 // 60
    s.base_first = base_events(rng, seed, start, 0, first, timedelta(0), timedelta(seconds=25))
    s.base_second = base_events(rng, seed, start, first, count - first, timedelta(seconds=25), timedelta(seconds=35))
    # Duplicates repeat events already sent (a producer retry), so they never run ahead of the stream.
    s.duplicates_first = rng.sample(s.base_first, len(s.base_first) // 10)
    s.duplicates_second = rng.sample(s.base_second, len(s.base_second) // 10)
    # The watermark lands exactly on W1's close: max event time - delay = end(W1) - 1 ms + lateness.
    exactly_w1_close = close_of(start, 1) + WATERMARK_DELAY
    s.advance_first = [
        usage_event(f"adv1-{seed}-{p}", CLOCK_TENANT, f"p{p}", "api_calls", Decimal(1), exactly_w1_close)
        for p in range(partitions)
    ]
    s.advance_second = [
        usage_event(f"adv2-{seed}-{p}", CLOCK_TENANT, f"p{p}", "api_calls", Decimal(1), start + timedelta(seconds=65))
        for p in range(partitions)
    ]
    s.risky_before = _risky(rng, s, f"{seed}-before", s.base_first, risky_count, within_window=2)
    s.risky_during = _risky(rng, s, f"{seed}-during", s.base_first, risky_count, within_window=2)
    s.risky_after = _risky(rng, s, f"{seed}-after", s.base, risky_count, within_window=5)
    s.closers = closing_events(start + timedelta(minutes=5), partitions)
    assert all(c["tenant_id"] == CLOSER_TENANT for c in s.closers)
    return s
