"""Rules of ``GET /v1/customers/{id}/usage``: the query it takes, its limits, and when a total is final.

Pure: the app (meterflow/serve/app.py) reads Postgres through meterflow/serve/usage_reader.py and hands the
rows here. A total is the sum of its windows' quantities, the numbers billing delivers; it is
``final`` once every window in it is final and the job has closed every window ending by its end
(the close horizon: the latest final window's end), else ``provisional``. ``corrected_quantity``
adds the corrections that count (applied or approved) of the windows in it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from meterflow.billing_cycle import BillingCycle, to_utc
from meterflow.input_contract import MAX_DIMENSION_KEY_BYTES, MAX_GROUP_BY, MAX_ID_BYTES, control_character
from meterflow.serve.ingest import RequestRefusedError

Granularity = Literal["window", "day", "period"]
GRANULARITIES: tuple[str, ...] = ("window", "day", "period")
# How far one request reaches: days and periods are read from rollups, windows from the usage table.
MAX_PERIODS = 13
MAX_DAYS = 400
MAX_WINDOW_ROWS = 5000
MAX_WINDOW_RANGE = timedelta(days=7)
# Corrections listed in one answer (all of them count in the totals; corrections_count says how many).
MAX_LISTED_CORRECTIONS = 1000
# Instants the API takes (a period is listed from them: years far off are refused, not computed).
EARLIEST, LATEST = datetime(2000, 1, 1), datetime(2200, 1, 1)


@dataclass(frozen=True)
class UsageQuery:
    """A checked request: the spans to total (whole days or periods, or windows over [since, until))."""

    customer_id: str
    granularity: Granularity
    since: datetime
    until: datetime
    meter: str | None
    group_by: tuple[str, ...]
    spans: tuple[tuple[datetime, datetime], ...] = field(default=())

    @property
    def bounds(self) -> tuple[datetime, ...]:
        """The spans' starts and the last one's end: days and periods tile time, so span ``n`` (from 1) is
        ``[bounds[n-1], bounds[n])``, what Postgres's ``width_bucket`` finds by bisection."""
        for (_, end), (start, _) in zip(self.spans, self.spans[1:], strict=False):
            if end != start:
                msg = f"spans must follow one another: {end} then {start}"
                raise ValueError(msg)
        return (*(s for s, _ in self.spans), *(e for _, e in self.spans[-1:]))


def _instant(name: str, text: str) -> datetime:
    try:
        moment = to_utc(datetime.fromisoformat(text))
    except (ValueError, OverflowError) as e:
        raise RequestRefusedError(400, f"{name} is not an ISO-8601 instant: {text[:64]!r}") from e
    if not EARLIEST <= moment < LATEST:
        raise RequestRefusedError(400, f"{name} must lie in [{EARLIEST:%Y}, {LATEST:%Y})")
    return moment


def check_customer(customer_id: str) -> str:
    """A customer id as the input contract takes it, or a RequestRefusedError (400)."""
    return _identifier("customer_id", customer_id)


def _identifier(name: str, value: str) -> str:
    size = len(value.encode("utf-8", "replace"))
    limit = MAX_ID_BYTES.get(name, MAX_DIMENSION_KEY_BYTES)
    if not 0 < size <= limit or control_character(value) is not None:
        raise RequestRefusedError(400, f"{name} must be 1-{limit} bytes of printable text")
    return value


def check_query(
    customer_id: str,
    cycle: BillingCycle,
    now: datetime,
    *,
    meter: str | None = None,
    since: str | None = None,
    until: str | None = None,
    granularity: str = "day",
    group_by: str | None = None,
) -> UsageQuery:
    """The query, or a RequestRefusedError (400) saying what is wrong. Without ``from``, the current period."""
    _identifier("customer_id", customer_id)
    if meter is not None:
        _identifier("meter", meter)
    if granularity not in GRANULARITIES:
        raise RequestRefusedError(400, f"granularity is one of {', '.join(GRANULARITIES)}")
    names = tuple(dict.fromkeys(g.strip() for g in (group_by or "").split(",") if g.strip()))
    if len(names) > MAX_GROUP_BY:
        raise RequestRefusedError(400, f"group_by names at most {MAX_GROUP_BY} dimensions")
    for name in names:
        _identifier("group_by", name)
    if since is None:
        start, default_end = cycle.period_of(to_utc(now))
    else:
        start = _instant("from", since)
        default_end = cycle.period_of(start)[1]
    end = _instant("to", until) if until is not None else default_end
    if end <= start:
        raise RequestRefusedError(400, "to must be later than from")
    spans: tuple[tuple[datetime, datetime], ...] = ()
    if granularity == "period":
        # Refused before the periods are listed: a period is 28 to 31 days.
        if end - start > timedelta(days=31 * MAX_PERIODS):
            raise RequestRefusedError(400, f"at most {MAX_PERIODS} periods a request")
        spans = tuple(cycle.periods(start, end))
        if len(spans) > MAX_PERIODS:
            raise RequestRefusedError(400, f"at most {MAX_PERIODS} periods a request")
    elif granularity == "day":
        if end - start > timedelta(days=MAX_DAYS):
            raise RequestRefusedError(400, f"at most {MAX_DAYS} days a request")
        spans = tuple(cycle.days(start, end))
    elif end - start > MAX_WINDOW_RANGE:
        raise RequestRefusedError(400, f"at most {MAX_WINDOW_RANGE.days} days of windows a request: ask per day")
    if spans:
        start, end = spans[0][0], spans[-1][1]
    return UsageQuery(customer_id, granularity, start, end, meter, names, spans)  # type: ignore[arg-type]


def status_of(windows: int, final_windows: int, end: datetime, horizon: datetime | None) -> str:
    """``final`` when every window of a total is final and the job closed every window ending by its end."""
    closed = horizon is not None and end <= horizon
    return "final" if closed and final_windows == windows else "provisional"


def group_of(dimensions_key: str, group_by: tuple[str, ...]) -> dict[str, str | None]:
    """A window's group as the query names it (None: the window has no such grouped dimension)."""
    dims = json.loads(dimensions_key) if dimensions_key else {}
    return {name: dims.get(name) for name in group_by}


def plain(value: Decimal) -> str:
    """A decimal as the API writes it: exact, no exponent, no trailing zeros."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


@dataclass(frozen=True)
class Total:
    """One span's (or window's) sum for one meter and group, as read."""

    meter: str
    group: Mapping[str, str | None]
    start: datetime
    end: datetime
    quantity: Decimal
    event_count: int
    windows: int
    final_windows: int
    revision: int


@dataclass(frozen=True)
class CountedCorrection:
    correction_id: str
    meter: str
    dimensions_key: str
    window_start: datetime
    window_end: datetime
    delta: Decimal
    status: str
    counted_at: datetime


@dataclass(frozen=True)
class CorrectionSum:
    """The corrections that count of one total (its meter, group and span), summed."""

    meter: str
    group: Mapping[str, str | None]
    start: datetime
    end: datetime
    delta: Decimal
    count: int


def _group_key(meter: str, group: Mapping[str, str | None], start: datetime, end: datetime) -> tuple:
    return (meter, tuple(sorted(group.items(), key=lambda kv: kv[0])), start, end)


def sum_corrections(query: UsageQuery, corrections: Iterable[CountedCorrection]) -> list[CorrectionSum]:
    """Corrections summed per total, as the reader's SQL sums them: in the day or period their window starts
    in (per window: their window), per meter and group. Corrections outside every span are left out."""
    sums: dict[tuple, tuple[Decimal, int]] = {}
    for c in corrections:
        if query.granularity == "window":
            span: tuple[datetime, datetime] | None = (c.window_start, c.window_end)
        else:
            span = next(((s, e) for s, e in query.spans if s <= c.window_start < e), None)
        if span is None:
            continue
        key = _group_key(c.meter, group_of(c.dimensions_key, query.group_by), *span)
        delta, count = sums.get(key, (Decimal(0), 0))
        sums[key] = (delta + c.delta, count + 1)
    return [
        CorrectionSum(meter, dict(group), start, end, delta, count)
        for (meter, group, start, end), (delta, count) in sums.items()
    ]


@dataclass(frozen=True)
class UsageRead:
    """What one request read, in one snapshot: the customer's cycle, the query made of it, its totals, the
    corrections that count summed per total, the first ``MAX_LISTED_CORRECTIONS`` of them (by window), and
    the close horizon."""

    cycle: BillingCycle
    query: UsageQuery
    totals: list[Total]
    correction_sums: list[CorrectionSum]
    corrections: list[CountedCorrection]
    horizon: datetime | None

    @property
    def corrections_count(self) -> int:
        return sum(s.count for s in self.correction_sums)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds") + "Z"


def answer(read: UsageRead, tenant_id: str) -> dict[str, object]:
    """The response body: each total with its status and corrected quantity, and the corrections applied.

    A correction counts in the total of its meter and group whose span its window starts in; where
    that total has no window (a LATEST window corrected from late events only), a total of 0 is
    added for it, so every correction is in some ``corrected_quantity``. At most
    ``MAX_LISTED_CORRECTIONS`` are listed, the earliest windows first; ``corrections_count`` counts all."""
    query, horizon = read.query, read.horizon
    by_total = {_group_key(s.meter, s.group, s.start, s.end): s.delta for s in read.correction_sums}
    listed = list(read.totals)
    have = {_group_key(t.meter, t.group, t.start, t.end) for t in listed}
    for meter, group_items, start, end in by_total.keys() - have:
        listed.append(Total(meter, dict(group_items), start, end, Decimal(0), 0, 0, 0, 0))
    listed.sort(key=lambda t: (t.meter, json.dumps(dict(t.group), sort_keys=True), t.start, t.end))
    rows = []
    for t in listed:
        deltas = by_total.get(_group_key(t.meter, t.group, t.start, t.end), Decimal(0))
        rows.append(
            {
                "meter": t.meter,
                "group": dict(t.group),
                "start": _iso(t.start),
                "end": _iso(t.end),
                "quantity": plain(t.quantity),
                "corrected_quantity": plain(t.quantity + deltas),
                "event_count": t.event_count,
                "status": status_of(t.windows, t.final_windows, t.end, horizon),
                "revision": t.revision,
            }
        )
    cycle = read.cycle
    return {
        "tenant_id": tenant_id,
        "customer_id": query.customer_id,
        "cycle": {"anchor": cycle.anchor, "anchor_day": cycle.anchor_day, "timezone": cycle.timezone},
        "granularity": query.granularity,
        "from": _iso(query.since),
        "to": _iso(query.until),
        "final_through": _iso(horizon) if horizon is not None else None,
        "usage": rows,
        "corrections": [
            {
                "correction_id": c.correction_id,
                "meter": c.meter,
                "dimensions": json.loads(c.dimensions_key) if c.dimensions_key else {},
                "window_start": _iso(c.window_start),
                "window_end": _iso(c.window_end),
                "delta": plain(c.delta),
                "status": c.status,
                "counted_at": c.counted_at.isoformat(),
            }
            for c in read.corrections[:MAX_LISTED_CORRECTIONS]
        ],
        "corrections_count": read.corrections_count,
    }
