"""Pure helpers that write Flink SQL literals and clauses (no Flink import)."""

from __future__ import annotations

from datetime import timedelta


def sql_interval(value: timedelta) -> str:
    """A Flink SQL interval literal for a duration, exact to the millisecond."""
    ms = int(value / timedelta(milliseconds=1))
    if ms % 1000 == 0:
        return f"INTERVAL '{ms // 1000}' SECOND"
    return f"INTERVAL '{ms // 1000}.{ms % 1000:03d}' SECOND(3)"


def sql_string(value: str) -> str:
    """A single-quoted SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_with(options: dict[str, str]) -> str:
    """The WITH clause of a CREATE TABLE."""
    body = ",\n  ".join(f"{sql_string(k)} = {sql_string(v)}" for k, v in options.items())
    return f"WITH (\n  {body}\n)"


def ms(value: timedelta) -> int:
    """Whole milliseconds of a duration."""
    return int(value / timedelta(milliseconds=1))


def sql_epoch_ms(expr: str) -> str:
    """Epoch milliseconds of a TIMESTAMP(3) expression (Flink has no millisecond TIMESTAMPDIFF)."""
    return f"(EXTRACT(EPOCH FROM {expr}) * 1000 + MOD(EXTRACT(MILLISECOND FROM {expr}), 1000))"
