"""Closed windows: the row layout of the stream the window closer emits.

The closer itself runs in the JVM (jvm/src/main/java/dev/meterflow/operators/WindowCloser.java): keyed
by window, it keeps the latest value of the window aggregate's changelog and emits it once, when
the watermark passes window end - 1 ms + allowed lateness, the instant Flink's window operator
purges the window, so the emitted value is final. The closed-window stream feeds the final
Postgres write (``is_final``) and billing.
"""

from __future__ import annotations

from typing import Any

from pyflink.common import Types
from pyflink.table import DataTypes

from meterflow.window_row import BRIDGE_FORMS, WINDOW_ROW

# The bridge's Flink types (meterflow/window_row.py: BRIDGE_FORMS) as (DataStream type, Table type).
_FLINK_TYPES: dict[str, tuple[Any, Any]] = {
    "STRING": (Types.STRING(), DataTypes.STRING()),
    "BIGINT": (Types.LONG(), DataTypes.BIGINT()),
}
# (name, DataStream type, Table type) of the window row (meterflow/window_row.py) on the bridge.
# Must match WindowCloser.outputType() in the Java closer (tests/unit/test_jvm_contract.py).
CLOSED_WINDOW_COLUMNS = tuple((c.bridge_name, *_FLINK_TYPES[BRIDGE_FORMS[c.kind].flink]) for c in WINDOW_ROW)
