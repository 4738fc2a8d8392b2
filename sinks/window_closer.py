"""Closed windows: the row layout of the stream the window closer emits.

The closer itself runs in the JVM (udf/src/main/java/dev/meterflow/udf/WindowCloser.java): keyed
by window, it keeps the latest value of the window aggregate's changelog and emits it once, when
the watermark passes window end - 1 ms + allowed lateness, the instant Flink's window operator
purges the window, so the emitted value is final. The closed-window stream feeds the final
Postgres write (``is_final``) and billing.
"""

from __future__ import annotations

from typing import Any

from pyflink.common import Types
from pyflink.table import DataTypes

from meterflow.window_row import WINDOW_ROW, ColumnKind

# Each kind as it crosses the Python bridge, (DataStream type, Table type): quantity as an exact
# decimal string, times as epoch ms, because the bridge has neither an exact DECIMAL(38, 9) nor a
# LocalDateTime type.
_BRIDGE_TYPES: dict[ColumnKind, tuple[Any, Any]] = {
    "text": (Types.STRING(), DataTypes.STRING()),
    "timestamp": (Types.LONG(), DataTypes.BIGINT()),
    "decimal": (Types.STRING(), DataTypes.STRING()),
    "count": (Types.LONG(), DataTypes.BIGINT()),
}
# (name, DataStream type, Table type) of the window row (meterflow/window_row.py) on the bridge.
# Must match WindowCloser.outputType() in the Java closer (tests/unit/test_udf_contract.py).
CLOSED_WINDOW_COLUMNS = tuple((c.bridge_name, *_BRIDGE_TYPES[c.kind]) for c in WINDOW_ROW)
