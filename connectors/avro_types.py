"""Avro schema (.avsc) -> Flink SQL types, derived in code so the schema file stays the single source of truth.

Flink's ``avro`` format decodes plain Avro binary with a writer schema it derives from the table's
row type. Binary Avro carries no schema, so the derived schema must match the .avsc exactly:
non-null Avro types map to ``NOT NULL`` Flink types (else Flink expects a union), and
``["null", T]`` maps to a nullable T. Binary floats are refused: billing quantities are exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meterflow.errors import SchemaError

AVRO_DIR = Path(__file__).resolve().parent.parent / "avro"
USAGE_EVENT_SCHEMA = AVRO_DIR / "usage_event.avsc"

_PRIMITIVES = {"string": "STRING", "long": "BIGINT", "int": "INT", "boolean": "BOOLEAN", "bytes": "BYTES"}
_INEXACT = {"float", "double"}


@dataclass(frozen=True)
class Column:
    """One top-level column of the derived Flink table."""

    name: str
    sql_type: str

    def ddl(self) -> str:
        """The column as it appears in CREATE TABLE."""
        return f"`{self.name}` {self.sql_type}"


def load_schema(path: Path = USAGE_EVENT_SCHEMA) -> dict[str, Any]:
    """Read an .avsc file as JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        msg = f"cannot read Avro schema {path}: {e}"
        raise SchemaError(msg) from e


def avro_to_flink_type(avro_type: Any, where: str = "") -> str:
    """Map one Avro type to a Flink SQL type string (NOT NULL unless the Avro type is a null union)."""
    if isinstance(avro_type, list):
        branches = [b for b in avro_type if b != "null"]
        if len(branches) != 1 or len(avro_type) != 2:
            msg = f'{where}: only ["null", T] unions are supported, got {avro_type}'
            raise SchemaError(msg)
        return avro_to_flink_type(branches[0], where).removesuffix(" NOT NULL")
    if isinstance(avro_type, str):
        if avro_type in _INEXACT:
            msg = f"{where}: {avro_type} is a binary float; use a decimal logical type or an integer"
            raise SchemaError(msg)
        if avro_type not in _PRIMITIVES:
            msg = f"{where}: unsupported Avro type {avro_type!r}"
            raise SchemaError(msg)
        return f"{_PRIMITIVES[avro_type]} NOT NULL"
    if not isinstance(avro_type, dict):
        msg = f"{where}: unsupported Avro type {avro_type!r}"
        raise SchemaError(msg)
    base, logical = avro_type.get("type"), avro_type.get("logicalType")
    if logical == "decimal" and base in ("bytes", "fixed"):
        precision, scale = int(avro_type["precision"]), int(avro_type.get("scale", 0))
        if not 1 <= precision <= 38 or not 0 <= scale <= precision:
            msg = f"{where}: decimal({precision},{scale}) is outside Flink's DECIMAL range (precision 1..38)"
            raise SchemaError(msg)
        return f"DECIMAL({precision}, {scale}) NOT NULL"
    if logical == "timestamp-millis" and base == "long":
        return "TIMESTAMP(3) NOT NULL"
    if base == "map":
        return f"MAP<STRING NOT NULL, {avro_to_flink_type(avro_type['values'], where + '.values')}> NOT NULL"
    if base == "array":
        return f"ARRAY<{avro_to_flink_type(avro_type['items'], where + '.items')}> NOT NULL"
    if base == "enum":
        return "STRING NOT NULL"
    if base == "record":
        fields = ", ".join(
            f"`{f['name']}` {avro_to_flink_type(f['type'], where + '.' + f['name'])}" for f in avro_type["fields"]
        )
        return f"ROW<{fields}> NOT NULL"
    if isinstance(base, (str, list)) and logical is None:
        return avro_to_flink_type(base, where)
    msg = f"{where}: unsupported Avro type {avro_type!r}"
    raise SchemaError(msg)


def derive_columns(schema: dict[str, Any]) -> list[Column]:
    """Columns of the Flink table for a top-level Avro record, in field order (binary layout order)."""
    if schema.get("type") != "record":
        msg = f"top-level Avro schema must be a record, got {schema.get('type')!r}"
        raise SchemaError(msg)
    name = schema.get("name", "record")
    return [Column(f["name"], avro_to_flink_type(f["type"], f"{name}.{f['name']}")) for f in schema["fields"]]


def derive_nullable_columns(schema: dict[str, Any]) -> list[Column]:
    """The same columns with every type nullable at every level: the meterflow-avro format's row,
    whose fields are all NULL for a record it cannot decode (jvm/ UsageEventDecoder.ROW_TYPE)."""
    return [Column(c.name, c.sql_type.replace(" NOT NULL", "")) for c in derive_columns(schema)]
