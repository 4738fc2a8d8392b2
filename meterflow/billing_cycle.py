"""A customer's billing cycle: its periods and days, in the customer's own timezone.

A cycle is a calendar month (``anchor_day`` None) or an anniversary cycle that starts on the same
day of every month (``anchor_day`` 1-31; in a shorter month, on its last day, as providers do). A
period starts at local midnight of its first day and ends at local midnight of the next period's,
so under daylight saving a period or a day can be 23 or 25 hours long. Every offset a timezone has
ever had is a whole number of quarter hours, so periods and days are whole quarter hours in UTC:
what the usage rollups are kept in (sinks/usage_rollup_schema.py).

A window belongs to the period (and the day) its start falls in.

Instants are naive UTC ``datetime`` values, as the usage table stores them.
"""

from __future__ import annotations

import calendar
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

CALENDAR = "calendar"
ANNIVERSARY = "anniversary"


@dataclass(frozen=True)
class BillingCycle:
    """A customer's cycle: ``anchor_day`` None for calendar months, else the day each period starts."""

    anchor_day: int | None = None
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if self.anchor_day is not None and not 1 <= self.anchor_day <= 31:
            msg = f"a billing anchor day is 1-31, got {self.anchor_day}"
            raise ValueError(msg)
        check_timezone(self.timezone)

    @property
    def anchor(self) -> str:
        return CALENDAR if self.anchor_day is None else ANNIVERSARY

    def _zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def _start_day(self, year: int, month: int) -> date:
        day = 1 if self.anchor_day is None else min(self.anchor_day, calendar.monthrange(year, month)[1])
        return date(year, month, day)

    def _utc(self, day: date) -> datetime:
        """Local midnight of ``day`` as naive UTC, resolved as Postgres resolves local times (so the
        carry's SQL twin agrees): midnight twice (a fall back at midnight) is the later one, the
        offset after the transition; midnight skipped (a spring forward at midnight) takes the offset
        before it."""
        first = datetime.combine(day, time(), self._zone())
        later = first.replace(fold=1)
        if first.utcoffset() != later.utcoffset() and _exists(first):
            return to_utc(later)
        return to_utc(first)

    def period_of(self, instant: datetime) -> tuple[datetime, datetime]:
        """The period ``[start, end)`` an instant falls in, as naive UTC."""
        local = instant.replace(tzinfo=UTC).astimezone(self._zone()).date()
        year, month = local.year, local.month
        if local < self._start_day(year, month):
            year, month = _month_before(year, month)
        start = self._start_day(year, month)
        return self._utc(start), self._utc(self._start_day(*_month_after(year, month)))

    def periods(self, since: datetime, until: datetime) -> list[tuple[datetime, datetime]]:
        """The periods that overlap ``[since, until)``, whole, in order."""
        found: list[tuple[datetime, datetime]] = []
        start, end = self.period_of(since)
        while start < until:
            found.append((start, end))
            start, end = self.period_of(end)
        return found

    def day_of(self, instant: datetime) -> tuple[datetime, datetime]:
        """The customer's local day ``[start, end)`` an instant falls in, as naive UTC."""
        local = instant.replace(tzinfo=UTC).astimezone(self._zone()).date()
        return self._utc(local), self._utc(local + timedelta(days=1))

    def label(self, start: datetime, end: datetime, *, day: bool = False) -> str:
        """How a period (or, with ``day``, a day) of this cycle is named in reports: ``2026-11`` for a
        calendar month, ``2026-11-15/2026-12-15`` for an anniversary period, ``2026-11-15`` for a day,
        in local dates, followed by the timezone unless it is UTC."""
        zone = self._zone()
        first, after = (i.replace(tzinfo=UTC).astimezone(zone).date() for i in (start, end))
        if day:
            name = first.isoformat()
        elif self.anchor_day is None:
            name = f"{first:%Y-%m}"
        else:
            name = f"{first.isoformat()}/{after.isoformat()}"
        return name if self.timezone == "UTC" else f"{name} {self.timezone}"

    def days(self, since: datetime, until: datetime) -> list[tuple[datetime, datetime]]:
        """The customer's local days that overlap ``[since, until)``, whole, in order."""
        zone = self._zone()
        first = since.replace(tzinfo=UTC).astimezone(zone).date()
        found: list[tuple[datetime, datetime]] = []
        for day in _dates_from(first):
            start, end = self._utc(day), self._utc(day + timedelta(days=1))
            if start >= until:
                break
            found.append((start, end))
        return found


def _exists(local: datetime) -> bool:
    """Whether a local time occurs (is not skipped by a spring forward)."""
    return local.astimezone(UTC).astimezone(local.tzinfo).replace(tzinfo=None) == local.replace(tzinfo=None)


def _dates_from(day: date) -> Iterator[date]:
    while True:
        yield day
        day += timedelta(days=1)


def _month_before(year: int, month: int) -> tuple[int, int]:
    return (year - 1, 12) if month == 1 else (year, month - 1)


def _month_after(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def to_utc(moment: datetime) -> datetime:
    """An aware instant as naive UTC (a naive one is taken as UTC already)."""
    return moment if moment.tzinfo is None else moment.astimezone(UTC).replace(tzinfo=None)


_known_zones = functools.cache(available_timezones)


def check_timezone(name: str) -> str:
    """An IANA timezone name the machine knows (``Europe/Paris``), or a ValueError saying so."""
    if name not in _known_zones() and name != "UTC":
        msg = f"not an IANA timezone: {name!r} (such as Europe/Paris or America/New_York)"
        raise ValueError(msg)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        msg = f"not an IANA timezone: {name!r}"
        raise ValueError(msg) from e
    return name
