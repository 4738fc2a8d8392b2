"""The window row, declared once: a usage window's key, span and value.

Every place that spells a window derives from this or is tested against it
(tests/unit/test_window_row.py): the Postgres DDL (sinks/postgres_schema.py), the closed-window
stream the Java closer emits (jobs/closed_windows.py), the closed-window Avro schema
(avro/closed_window.avsc), the billing input row (jobs/billing_plan.py) and the Python rows
(``ClosedWindow`` in billing/deliveries.py).

Times have two forms: ``timestamp`` columns (UTC) in Postgres, Flink SQL and Avro, and epoch
milliseconds where a row crosses the Python bridge, which has no LocalDateTime type (the
``bridge_name``: ``window_start_ms``). Inside Python a window time is a naive UTC ``datetime``, like
the usage table's columns (``meterflow.config_values.naive_utc``); :func:`epoch_ms` and
:func:`from_epoch_ms` convert at the bridge. A quantity is exact everywhere: ``numeric(38, 9)``, Avro's
decimal(38, 9), and a decimal string across the bridge.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

ColumnKind = Literal["text", "timestamp", "decimal", "count"]


@dataclass(frozen=True)
class WindowColumn:
    name: str
    kind: ColumnKind

    @property
    def bridge_name(self) -> str:
        """The column's name where it crosses the Python bridge: times as epoch ms carry ``_ms``."""
        return f"{self.name}_ms" if self.kind == "timestamp" else self.name


# Whose usage and of what: one meter's usage of one customer, per combination of its dimensions.
WINDOW_KEY = (
    WindowColumn("tenant_id", "text"),
    WindowColumn("customer_id", "text"),
    WindowColumn("meter", "text"),
    WindowColumn("dimensions_key", "text"),  # JSON object of the meter's group-by dimensions, keys sorted
)
# When: start inclusive, end exclusive; windows of two sizes that start together are two windows.
WINDOW_SPAN = (WindowColumn("window_start", "timestamp"), WindowColumn("window_end", "timestamp"))
# How much: the meter's aggregate, the events it covers, and the revision (never goes backwards).
WINDOW_VALUE = (
    WindowColumn("quantity", "decimal"),
    WindowColumn("event_count", "count"),
    WindowColumn("revision", "count"),
)
WINDOW_ROW = WINDOW_KEY + WINDOW_SPAN + WINDOW_VALUE

POSTGRES_TYPES: dict[ColumnKind, str] = {
    "text": "text",
    "timestamp": "timestamp(3)",
    "decimal": "numeric(38, 9)",
    "count": "bigint",
}


@dataclass(frozen=True)
class BridgeForm:
    """How a column of a kind crosses the Python bridge: its Flink SQL type there, and the Postgres
    type its values are sent to Postgres as (set-based statements take them as arrays of it)."""

    flink: Literal["STRING", "BIGINT"]
    postgres: str


BRIDGE_FORMS: dict[ColumnKind, BridgeForm] = {
    "text": BridgeForm("STRING", "text"),
    "timestamp": BridgeForm("BIGINT", "bigint"),  # epoch ms: the bridge has no LocalDateTime
    "decimal": BridgeForm("STRING", "numeric"),  # an exact decimal string: the bridge has no DECIMAL(38, 9)
    "count": BridgeForm("BIGINT", "bigint"),
}


_EPOCH = datetime(1970, 1, 1)


def epoch_ms(moment: datetime) -> int:
    """A window time (naive UTC, its one form in Python) as epoch milliseconds, its form on the
    bridge; exact (no float). An aware moment is refused (TypeError): convert it first."""
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def from_epoch_ms(ms: int) -> datetime:
    """Epoch milliseconds from the bridge as a window time (naive UTC)."""
    return _EPOCH + timedelta(milliseconds=ms)


def names(columns: Iterable[WindowColumn]) -> tuple[str, ...]:
    return tuple(c.name for c in columns)


def bridge_names(columns: Iterable[WindowColumn]) -> tuple[str, ...]:
    return tuple(c.bridge_name for c in columns)


def postgres_column_lines(columns: Iterable[WindowColumn]) -> str:
    """``CREATE TABLE`` body lines, one per column, each NOT NULL and ending with a comma."""
    return "\n".join(f"    {c.name:<20} {POSTGRES_TYPES[c.kind]:<14} NOT NULL," for c in columns)
