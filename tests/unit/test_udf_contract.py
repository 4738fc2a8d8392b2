"""The JVM decoder's output row stays in step with avro/usage_event.avsc (the single source of truth)."""

from __future__ import annotations

import re

from connectors.avro_types import derive_columns, load_schema
from tests.conftest import REPO_ROOT

DECODER = REPO_ROOT / "udf" / "src" / "main" / "java" / "dev" / "meterflow" / "udf" / "DecodeUsageEvent.java"


def _row_type() -> str:
    source = DECODER.read_text()
    parts = re.search(r"ROW_TYPE\s*=\s*(.*?);", source, re.S).group(1)
    return "".join(re.findall(r'"([^"]*)"', parts))


def test_decoder_row_is_the_schema_nullable_plus_error():
    """Every schema field, in order, with its derived type made nullable; then `error`."""
    expected = [f"`{c.name}` {c.sql_type.replace(' NOT NULL', '')}" for c in derive_columns(load_schema())]
    assert _row_type() == "ROW<" + ", ".join([*expected, "`error` STRING"]) + ">"


def test_decoder_reads_the_schema_from_the_avro_dir():
    """The jar packages avro/ as a resource instead of holding a copy of the schema."""
    pom = (REPO_ROOT / "udf" / "pom.xml").read_text()
    assert "<directory>${project.basedir}/../avro</directory>" in pom
    assert '"/avro/usage_event.avsc"' in DECODER.read_text()


def test_window_closer_emits_the_closed_window_columns():
    """The Java closer's output names and types are the ones the final sink and billing read."""
    from sinks.window_closer import CLOSED_WINDOW_COLUMNS

    source = (DECODER.parent / "WindowCloser.java").read_text()
    names = re.findall(r'"(\w+)"', re.search(r"NAMES\s*=\s*\{(.*?)\};", source, re.S).group(1))
    types = re.findall(r"Types\.(\w+)", re.search(r"ROW_NAMED\(NAMES,(.*?)\);", source, re.S).group(1))
    java_for = {"VARCHAR": "STRING", "BIGINT": "LONG"}
    assert names == [c[0] for c in CLOSED_WINDOW_COLUMNS]
    assert types == [java_for[str(c[2]).split("(")[0].split(" ")[0]] for c in CLOSED_WINDOW_COLUMNS]


def test_window_sink_binds_the_usage_write_columns_in_order():
    """udf/ UsageWindowSink binds exactly the columns of usage_upsert_sql, in the same order."""
    from sinks.postgres_schema import USAGE_WRITE_COLUMNS, usage_upsert_sql

    source = (DECODER.parent / "UsageWindowSink.java").read_text()
    body = re.search(r"private static void bind\(PreparedStatement ps, WindowRow w\)(.*?)\n        }", source, re.S).group(1)
    bound = re.findall(r"ps\.set\w+\((\d+), (?:utc\()?(?:new BigDecimal\()?w\.(\w+)", body)
    snake = [re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), field).replace("_ms", "") for _, field in bound]
    assert [int(i) for i, _ in bound] == list(range(1, len(USAGE_WRITE_COLUMNS) + 1))
    assert snake == list(USAGE_WRITE_COLUMNS)
    assert usage_upsert_sql().count("?") == len(USAGE_WRITE_COLUMNS)


def test_close_rule_is_the_same_in_java_and_python():
    """The JVM close rule (classifier, closer) is jobs.windowing.window_fires_at_ms."""
    from jobs.windowing import window_fires_at_ms

    source = (DECODER.parent / "WindowClose.java").read_text()
    assert "return windowEndMs - 1 + allowedLatenessMs;" in source
    assert window_fires_at_ms(10_000, 10_000) == 10_000 - 1 + 10_000
    closer = (DECODER.parent / "WindowCloser.java").read_text()
    assert "WindowClose.closeTime(endMs, allowedLatenessMs)" in closer
