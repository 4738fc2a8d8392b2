"""Closed windows: the row layout of the stream the window closer emits.

The closer itself runs in the JVM (udf/src/main/java/dev/meterflow/udf/WindowCloser.java): keyed
by window, it keeps the latest value of the window aggregate's changelog and emits it once, when
the watermark passes window end - 1 ms + allowed lateness, the instant Flink's window operator
purges the window, so the emitted value is final. The closed-window stream feeds the final
Postgres write (``is_final``) and billing.
"""

from __future__ import annotations

from pyflink.common import Types
from pyflink.table import DataTypes

# (name, DataStream type, Table type): quantity as an exact decimal string, times as epoch ms,
# because the Python bridge has neither an exact DECIMAL(38, 9) nor a LocalDateTime type.
# Must match WindowCloser.outputType() in the Java closer.
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
