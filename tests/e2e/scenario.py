"""A billing-grade test dataset with a known fate for every event, played against the real job.

Phases (window 10 s, watermark delay 2 s, allowed lateness 10 s, see tests/e2e/conftest.py):

1. ``base``: events in [T, T+60 s), out of order by up to 1.5 s, sent in two halves, each
   followed by exact duplicates of events already sent; then one ``advance`` event per partition at T+65 s, so the watermark
   reaches T+63 s: windows ending by T+50 s are closed for good, [T+50, T+60) has fired but still
   accepts late events.
2. After that window is visible in Postgres: ``within_lateness`` events for [T+50, T+60)
   (counted, the row is updated), ``beyond_lateness`` events for [T, T+10) (late topic), and more
   duplicates of base events (dropped).
3. ``closers`` far in the future on every partition close everything else.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from connectors.avro_codec import UsageEvent, encode_usage_event
from tests.e2e.helpers import CLOSER_TENANT, closing_events


def _event(event_id: str, tenant: str, customer: str, meter: str, quantity: Decimal, at: datetime) -> UsageEvent:
    return UsageEvent(event_id=event_id, tenant_id=tenant, customer_id=customer, meter=meter, quantity=quantity, event_time=at, dimensions={"region": "eu"})


@dataclass
class Scenario:
    """Events per phase and which ones must end up where."""

    start: datetime
    partitions: int
    base: list[UsageEvent] = field(default_factory=list)
    duplicates_phase1: list[UsageEvent] = field(default_factory=list)
    advance: list[UsageEvent] = field(default_factory=list)
    within_lateness: list[UsageEvent] = field(default_factory=list)
    beyond_lateness: list[UsageEvent] = field(default_factory=list)
    duplicates_phase2: list[UsageEvent] = field(default_factory=list)
    closers: list[UsageEvent] = field(default_factory=list)
    bad_records: list[bytes] = field(default_factory=list)

    @property
    def unique_counted(self) -> list[UsageEvent]:
        """Unique events that must be counted in exactly one window (closers' window stays open)."""
        return self.base + self.advance + self.within_lateness

    @property
    def all_sent(self) -> list[UsageEvent]:
        """Every record sent, duplicates included."""
        return self.base + self.duplicates_phase1 + self.advance + self.within_lateness + self.beyond_lateness + self.duplicates_phase2 + self.closers


def build_scenario(count: int, partitions: int, seed: int = 1, late_count: int = 200) -> Scenario:
    """``count`` base events (+10% duplicates) and ``late_count`` events each within and beyond lateness."""
    rng = random.Random(seed)
    start = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
    s = Scenario(start=start, partitions=partitions)
    meters = ("api_calls", "tokens")
    for i in range(count):
        at = start + timedelta(milliseconds=(60_000 * i) // count)
        jitter = timedelta(milliseconds=rng.randint(-1500, 1500))
        at = min(max(at + jitter, start), start + timedelta(milliseconds=59_999))
        meter = meters[i % 2]
        qty = Decimal(rng.randint(1, 9)) if meter == "api_calls" else Decimal(rng.randint(1, 10**6)).scaleb(-4)
        s.base.append(_event(f"b-{seed}-{i}", f"t{rng.randrange(4)}", f"c{rng.randrange(25)}", meter, qty, at))
    # Duplicates repeat events already sent (a producer retry), so they never run ahead of the stream.
    half = count // 2
    s.duplicates_phase1 = rng.sample(s.base[:half], count // 20) + rng.sample(s.base[half:], count // 20)
    s.advance = [_event(f"adv-{seed}-{p}", "clock", f"p{p}", "api_calls", Decimal(1), start + timedelta(seconds=65)) for p in range(partitions)]
    for i in range(late_count):
        s.within_lateness.append(_event(f"wl-{seed}-{i}", f"t{i % 4}", f"c{i % 25}", "tokens", Decimal("0.5"), start + timedelta(seconds=50, milliseconds=rng.randint(0, 9_999))))
        s.beyond_lateness.append(_event(f"bl-{seed}-{i}", f"t{i % 4}", f"c{i % 25}", "tokens", Decimal("2.25"), start + timedelta(milliseconds=rng.randint(0, 9_999))))
    s.duplicates_phase2 = rng.sample(s.base, late_count)
    s.closers = closing_events(start + timedelta(minutes=5), partitions)
    sample = s.base[0]
    s.bad_records = [
        b"not avro at all",
        b"",
        encode_usage_event(sample) + b"\xff",
        encode_usage_event({**sample, "event_id": f"bad-meter-{seed}", "meter": "gpu_hours"}),
        encode_usage_event({**sample, "event_id": f"bad-neg-{seed}", "quantity": Decimal("-5")}),
        encode_usage_event({**sample, "event_id": ""}),
        encode_usage_event({**sample, "event_id": f"bad-future-{seed}", "event_time": datetime.now(UTC) + timedelta(days=2)}),
    ]
    assert all(c["tenant_id"] == CLOSER_TENANT for c in s.closers)
    return s
