"""The window row is declared once (meterflow/window_row.py): every other spelling of it derives
from it or is held against it here (the Java closer's: tests/unit/test_jvm_contract.py)."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from datetime import UTC, datetime

import pytest

from billing.deliveries import ClosedWindow
from billing.identifiers import WindowKey
from billing.reconcile import Correction as ReconcileCorrection
from billing.reconcile import Discrepancy
from jobs.billing_plan import BILLING_INPUT_COLUMNS
from jobs.closed_windows import CLOSED_WINDOW_COLUMNS
from jobs.plan import CLOSED_WINDOW_SCHEMA
from meterflow.corrections import WindowId
from meterflow.window_row import (
    BRIDGE_FORMS,
    POSTGRES_TYPES,
    WINDOW_KEY,
    WINDOW_ROW,
    WINDOW_SPAN,
    BridgeForm,
    ColumnKind,
    WindowColumn,
    bridge_names,
    epoch_ms,
    from_epoch_ms,
    names,
)
from sinks.corrections_schema import corrections_ddl
from sinks.ledger import DeliveryRow
from sinks.ledger_schema import WINDOW_CLAIM_KEY, WINDOW_DELIVERY_KEY, billing_tables_ddl
from sinks.postgres import UsageRow
from sinks.postgres_schema import USAGE_KEY_COLUMNS, USAGE_WRITE_COLUMNS, usage_table_ddl

AVRO_TYPES = {
    "text": "string",
    "timestamp": {"type": "long", "logicalType": "timestamp-millis"},
    "decimal": {"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": 9},
    "count": "long",
}


def test_the_closed_window_avro_schema_is_the_window_row():
    fields = json.loads(CLOSED_WINDOW_SCHEMA.read_text())["fields"]
    assert [(f["name"], f["type"]) for f in fields] == [(c.name, AVRO_TYPES[c.kind]) for c in WINDOW_ROW]


def test_the_python_rows_and_the_bridge_carry_the_window_row():
    """Python's row holds the window row's columns, its times naive UTC; the bridge, their bridge form."""
    assert tuple(f.name for f in dataclasses.fields(ClosedWindow)) == names(WINDOW_ROW)
    assert tuple(c[0] for c in CLOSED_WINDOW_COLUMNS) == bridge_names(WINDOW_ROW)
    assert BILLING_INPUT_COLUMNS[1:-1] == bridge_names(WINDOW_ROW)
    assert bridge_names(WINDOW_SPAN) == ("window_start_ms", "window_end_ms")


def _declared(ddl: str) -> dict[str, str]:
    """Column -> its type, from a CREATE TABLE statement."""
    body = ddl[ddl.index("(") + 1 :]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s+(\w+)\s+(\w+(?:\(\d+(?:, \d+)?\))?)", body, re.M)}


def test_every_postgres_table_of_windows_declares_the_window_with_its_types():
    usage = _declared(usage_table_ddl()[0])
    assert {c.name: usage[c.name] for c in WINDOW_ROW} == {c.name: POSTGRES_TYPES[c.kind] for c in WINDOW_ROW}
    assert names(WINDOW_KEY + WINDOW_SPAN) == USAGE_KEY_COLUMNS
    assert USAGE_WRITE_COLUMNS[:-1] == names(WINDOW_ROW)
    window = {c.name: POSTGRES_TYPES[c.kind] for c in WINDOW_KEY + WINDOW_SPAN}
    tables = [billing_tables_ddl()[1], *(s for s in corrections_ddl() if s.lstrip().startswith("CREATE TABLE"))]
    for ddl in tables:
        declared = _declared(ddl)
        assert {name: declared.get(name) for name in window} == window, ddl.splitlines()[0]


def test_the_ledger_finds_a_window_by_its_key_and_span():
    assert ("provider", *names(WINDOW_KEY + WINDOW_SPAN)) == WINDOW_DELIVERY_KEY
    assert ("provider", *bridge_names(WINDOW_KEY + WINDOW_SPAN)) == WINDOW_CLAIM_KEY


def test_a_time_crosses_the_bridge_as_epoch_ms_and_nothing_else_is_renamed():
    assert WindowColumn("window_start", "timestamp").bridge_name == "window_start_ms"
    assert [c.bridge_name for c in WINDOW_ROW if c.kind != "timestamp"] == [
        c.name for c in WINDOW_ROW if c.kind != "timestamp"
    ]


def test_every_kind_of_column_has_its_postgres_type_and_its_form_on_the_bridge():
    """A new kind of column is declared in meterflow/window_row.py with both, or nothing derives."""
    kinds = set(typing.get_args(ColumnKind))
    assert set(POSTGRES_TYPES) == kinds and set(BRIDGE_FORMS) == kinds
    assert {BRIDGE_FORMS[c.kind].flink for c in WINDOW_ROW if c.kind in ("timestamp", "count")} == {"BIGINT"}
    assert BRIDGE_FORMS["decimal"] == BridgeForm("STRING", "numeric"), "a quantity crosses as an exact string"


def test_a_window_time_crosses_the_bridge_exactly_and_only_as_naive_utc():
    """epoch ms <-> naive UTC without floats (a float round trip of 1 ms before a minute can lose it)."""
    start = datetime(2026, 1, 1, 0, 0, 59, 999_000)
    assert epoch_ms(start) == 1_767_225_659_999 and from_epoch_ms(1_767_225_659_999) == start
    assert ClosedWindow.from_fields(
        ("t", "c", "m", "{}", 1_767_225_600_000, 1_767_225_660_000, "1.5", 1, 1)
    ).window_end == (datetime(2026, 1, 1, 0, 1))
    with pytest.raises(TypeError):
        epoch_ms(start.replace(tzinfo=UTC))  # an aware moment is converted first, never taken as it is


@pytest.mark.parametrize(
    "row",
    [ClosedWindow, WindowKey, WindowId, UsageRow, DeliveryRow, ReconcileCorrection, Discrepancy],
    ids=lambda row: row.__name__,
)
def test_every_python_type_that_names_a_window_holds_its_key_and_span_in_order(row):
    """Each spells the window's key and span as the window row declares them (names, order), its
    times naive UTC datetimes."""
    fields = [f.name for f in dataclasses.fields(row)]
    key_and_span = names(WINDOW_KEY + WINDOW_SPAN)
    start = fields.index(key_and_span[0])
    assert tuple(fields[start : start + len(key_and_span)]) == key_and_span
    hints = typing.get_type_hints(row)
    assert {hints[c.name] for c in WINDOW_SPAN} == {datetime}
