"""Closed windows: a thin Flink adapter that emits each window once, with its final value.

Volume is one element per window update, not per event, so a Python operator is fine here. The
closed-window stream feeds the final Postgres write (``is_final``) and billing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pyflink.common import Row, Types
from pyflink.datastream import KeyedProcessFunction
from pyflink.datastream.state import ValueStateDescriptor
from pyflink.table import DataTypes

from jobs.windowing import window_fires_at_ms

# (name, DataStream type, Table type): quantity as an exact decimal string, times as epoch ms,
# because the Python bridge has neither an exact DECIMAL(38, 9) nor a LocalDateTime type.
CLOSED_WINDOW_COLUMNS = (
    ("tenant_id", Types.STRING(), DataTypes.STRING()),
    ("customer_id", Types.STRING(), DataTypes.STRING()),
    ("meter", Types.STRING(), DataTypes.STRING()),
    ("dimensions_key", Types.STRING(), DataTypes.STRING()),
    ("window_start_ms", Types.LONG(), DataTypes.BIGINT()),
    ("window_end_ms", Types.LONG(), DataTypes.BIGINT()),
    ("quantity", Types.STRING(), DataTypes.STRING()),
    ("event_count", Types.LONG(), DataTypes.BIGINT()),
    ("revision", Types.LONG(), DataTypes.BIGINT()),
)


def closed_window_type() -> Any:
    """DataStream row type of closed windows."""
    return Types.ROW_NAMED([c[0] for c in CLOSED_WINDOW_COLUMNS], [c[1] for c in CLOSED_WINDOW_COLUMNS])


def epoch_ms(value: datetime) -> int:
    """Epoch milliseconds of a naive UTC datetime (how Flink hands TIMESTAMP(3) to Python)."""
    return int(value.replace(tzinfo=UTC).timestamp() * 1000)


class WindowCloser(KeyedProcessFunction):
    """Keyed by window: keep the latest value, emit it once when the window can no longer change.

    The timer is set at window end - 1 ms + allowed lateness, the same instant Flink's window
    operator purges the window, so the emitted value is final. State and timers are checkpointed.
    """

    def __init__(self, allowed_lateness_ms: int) -> None:
        self.allowed_lateness_ms = allowed_lateness_ms
        self.latest = None

    def open(self, runtime_context) -> None:  # noqa: ANN001 - Flink's RuntimeContext
        self.latest = runtime_context.get_state(ValueStateDescriptor("latest-window-value", Types.PICKLED_BYTE_ARRAY()))

    def process_element(self, row, ctx):  # noqa: ANN001, ANN201 - Flink callback signature
        tenant, customer, meter, dims, start, end, quantity, count, revision = (row[i] for i in range(9))
        if self.latest.value() is None:
            ctx.timer_service().register_event_time_timer(window_fires_at_ms(epoch_ms(end), self.allowed_lateness_ms))
        self.latest.update((tenant, customer, meter, dims, epoch_ms(start), epoch_ms(end), quantity, count, revision))

    def on_timer(self, timestamp, ctx):  # noqa: ANN001, ANN201 - Flink callback signature
        value = self.latest.value()
        if value is not None:
            self.latest.clear()
            yield Row(*value)
