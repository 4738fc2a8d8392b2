"""The values config keys hold, beyond plain numbers and strings: durations, port ranges, exact decimals.

Pure parsing, shared by the config models (meterflow/config.py) and the commands that take the
same values on their command line.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator

_DURATION_RE = re.compile(r"^\s*(\d+)\s*(ms|s|m|min|h|d)\s*$")
_DURATION_UNITS = {"ms": 1, "s": 1_000, "m": 60_000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(value: Any) -> timedelta:
    """Parse ``"500ms"``, ``"10s"``, ``"5m"``, ``"1h"``, ``"7d"`` (or a timedelta) into a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return timedelta(milliseconds=int(match.group(1)) * _DURATION_UNITS[match.group(2)])
    msg = f"invalid duration {value!r}: use a whole number with a unit, e.g. 500ms, 10s, 5m, 1h, 7d"
    raise ValueError(msg)


def format_duration(value: timedelta) -> str:
    """Render a timedelta in the shortest exact unit of :func:`parse_duration`."""
    ms = int(value / timedelta(milliseconds=1))
    for unit in ("d", "h", "m", "s"):
        if ms and ms % _DURATION_UNITS[unit] == 0:
            return f"{ms // _DURATION_UNITS[unit]}{unit}"
    return f"{ms}ms"


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]

_PORT_RANGE_PART = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
MAX_PORT_RANGE = 64


def naive_utc(moment: datetime) -> datetime:
    """A moment as naive UTC, the one time form of windows and bounds in Python (like the usage table's
    columns); an aware moment in any zone is converted first, a naive one is taken as UTC already."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def parse_port_range(spec: str) -> tuple[int, ...]:
    """The ports of a Flink port range (``"9249-9252"``, ``"9249,9260"``, or both mixed), in order, each once.

    Bounded to a few dozen ports: Prometheus scrapes every one of them.
    """
    ports: list[int] = []
    for part in str(spec).split(","):
        match = _PORT_RANGE_PART.match(part)
        if not match:
            msg = f"invalid port range {spec!r}: use e.g. 9249-9252 or 9249,9260"
            raise ValueError(msg)
        low = int(match.group(1))
        high = int(match.group(2) or low)
        if not 1 <= low <= high <= 65535:
            msg = f"invalid port range {spec!r}: ports must be 1-65535, low to high"
            raise ValueError(msg)
        ports.extend(p for p in range(low, high + 1) if p not in ports)
        if len(ports) > MAX_PORT_RANGE:
            msg = f"port range {spec!r} has more than {MAX_PORT_RANGE} ports"
            raise ValueError(msg)
    return tuple(ports)


def _exact_decimal(value: Any) -> Any:
    """Accept a quantity as a string or an integer, never a binary float (0.1 is not exact)."""
    if isinstance(value, float):
        msg = f"{value!r}: write quantities as strings or integers (a float is not exact)"
        raise ValueError(msg)
    return value


ExactDecimal = Annotated[Decimal, BeforeValidator(_exact_decimal)]
