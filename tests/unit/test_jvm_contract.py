"""The JVM code stays in step with the Python side: the format's row with avro/usage_event.avsc (the
single source of truth), the closer's and the window sink's columns with the sinks' schemas."""

from __future__ import annotations

import re

from connectors.avro_types import derive_columns, load_schema
from jobs.source_plan import (
    FORMAT_DIMENSIONS_KEY,
    FORMAT_REJECT,
    METERS_OPTION,
    USAGE_FORMAT,
    usage_source_ddl,
    usage_value_columns,
)
from meterflow.config import load_config
from tests.conftest import REPO_ROOT

JAVA = REPO_ROOT / "jvm" / "src" / "main" / "java" / "dev" / "meterflow"
OPERATORS = JAVA / "operators"
FORMAT = JAVA / "format"


def _java_string(path, constant: str) -> str:
    parts = re.search(rf"{constant}\s*=\s*(.*?);", path.read_text(), re.S).group(1)
    return "".join(re.findall(r'"([^"]*)"', parts))


def test_format_row_is_the_schema_nullable():
    """The format decodes into every schema field, in order, with its derived type made nullable."""
    expected = [f"`{c.name}` {c.sql_type.replace(' NOT NULL', '')}" for c in derive_columns(load_schema())]
    assert _java_string(FORMAT / "UsageEventDecoder.java", "ROW_TYPE") == "ROW<" + ", ".join(expected) + ">"
    assert [c.ddl() for c in usage_value_columns()] == expected
    fields = re.findall(
        r'"(\w+)"', re.search(r"FIELDS = \{(.*?)\};", (FORMAT / "UsageEventDecoder.java").read_text(), re.S).group(1)
    )
    assert fields == [c.name for c in usage_value_columns()]


def test_source_table_uses_the_format_by_its_registered_name_and_metadata(write_config):
    """The source DDL names the factory's identifier, declares its physical columns and both metadata keys."""
    assert _java_string(FORMAT / "MeterflowAvroFormatFactory.java", "IDENTIFIER") == USAGE_FORMAT
    services = (
        (
            REPO_ROOT
            / "jvm"
            / "src"
            / "main"
            / "resources"
            / "META-INF"
            / "services"
            / "org.apache.flink.table.factories.Factory"
        )
        .read_text()
        .split()
    )
    assert "dev.meterflow.format.MeterflowAvroFormatFactory" in services
    ddl = usage_source_ddl(load_config(write_config(""), environ={}))
    assert f"'format' = '{USAGE_FORMAT}'" in ddl
    for column in usage_value_columns():
        assert f"  {column.ddl()},\n" in ddl
    decoding = FORMAT / "MeterflowAvroDecodingFormat.java"
    reject, key, raw = (_java_string(decoding, name) for name in ("REJECT", "DIMENSIONS_KEY", "RAW"))
    assert f"`{FORMAT_REJECT}` STRING METADATA FROM 'value.{reject}' VIRTUAL" in ddl
    assert f"`{FORMAT_DIMENSIONS_KEY}` STRING NOT NULL METADATA FROM 'value.{key}' VIRTUAL" in ddl
    assert f"`payload` BYTES METADATA FROM 'value.{raw}' VIRTUAL" in ddl
    meters = re.search(
        r'METERS = ConfigOptions.key\("([^"]+)"\)', (FORMAT / "MeterflowAvroFormatFactory.java").read_text()
    )
    assert f"{USAGE_FORMAT}.{meters.group(1)}" == METERS_OPTION


def test_format_is_checked_against_the_bundled_schema():
    """The jar packages avro/ as a resource; the format's tests read the schema from there instead of a copy."""
    pom = (REPO_ROOT / "jvm" / "pom.xml").read_text()
    assert "<directory>${project.basedir}/../avro</directory>" in pom
    test = REPO_ROOT / "jvm" / "src" / "test" / "java" / "dev" / "meterflow" / "format" / "UsageEventDecoderTest.java"
    assert '"/avro/usage_event.avsc"' in test.read_text()


def test_window_closer_emits_the_closed_window_columns():
    """The Java closer's output names and types are the ones the final sink and billing read."""
    from jobs.closed_windows import CLOSED_WINDOW_COLUMNS

    source = (OPERATORS / "WindowCloser.java").read_text()
    names = re.findall(r'"(\w+)"', re.search(r"NAMES\s*=\s*\{(.*?)\};", source, re.S).group(1))
    types = re.findall(r"Types\.(\w+)", re.search(r"ROW_NAMED\(NAMES,(.*?)\);", source, re.S).group(1))
    java_for = {"VARCHAR": "STRING", "BIGINT": "LONG"}
    assert names == [c[0] for c in CLOSED_WINDOW_COLUMNS]
    assert types == [java_for[str(c[2]).split("(")[0].split(" ")[0]] for c in CLOSED_WINDOW_COLUMNS]


def test_window_sink_binds_the_usage_write_columns_in_order():
    """jvm/ UsageWindowSink binds exactly the columns of usage_upsert_sql, in the same order."""
    from sinks.postgres_schema import USAGE_WRITE_COLUMNS, usage_upsert_sql

    source = (OPERATORS / "UsageWindowSink.java").read_text()
    body = re.search(
        r"private static void bind\(PreparedStatement ps, WindowRow w\)(.*?)\n        }", source, re.S
    ).group(1)
    bound = re.findall(r"ps\.set\w+\((\d+), (?:utc\()?(?:new BigDecimal\()?w\.(\w+)", body)
    snake = [re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), field).replace("_ms", "") for _, field in bound]
    assert [int(i) for i, _ in bound] == list(range(1, len(USAGE_WRITE_COLUMNS) + 1))
    assert snake == list(USAGE_WRITE_COLUMNS)
    assert usage_upsert_sql().count("?") == len(USAGE_WRITE_COLUMNS)


def test_close_rule_is_the_same_in_java_and_python():
    """The JVM close rule (classifier, closer) is meterflow.windowing.window_fires_at_ms."""
    from meterflow.windowing import window_fires_at_ms

    source = (OPERATORS / "WindowClose.java").read_text()
    assert "return windowEndMs - 1 + allowedLatenessMs;" in source
    assert window_fires_at_ms(10_000, 10_000) == 10_000 - 1 + 10_000
    closer = (OPERATORS / "WindowCloser.java").read_text()
    assert "WindowClose.closeTime(endMs, allowedLatenessMs)" in closer


def test_the_stages_aggregate_every_aggregation_the_config_offers():
    """The two stages' partial (jvm/ dev.meterflow.stages.WindowPartial) merges each aggregation a
    meter may declare, under the same names."""
    from typing import get_args

    from meterflow.config import Aggregation

    source = (JAVA / "stages" / "WindowPartial.java").read_text()
    declared = re.search(r"enum Aggregation \{([^}]*)\}", source).group(1)
    assert [name.strip() for name in declared.split(",")] == list(get_args(Aggregation))
    assert re.search(r"SCALE = (\d+);", source).group(1) == "9", "the job's DECIMAL(38, 9)"


def _java_list(path, constant: str) -> list[str]:
    return re.findall(r'"([^"]*)"', re.search(rf"{constant}\s*=\s*List\.of\((.*?)\);", path.read_text(), re.S).group(1))


def test_the_stages_read_and_write_the_columns_the_sql_side_names():
    """jvm/ StageRows reads the stage input query's columns and writes the late insert's, by the same names."""
    from jobs.plan import LATE_EVENT_COLUMNS
    from jobs.stages_plan import STAGE_INPUT_COLUMNS

    stage_rows = JAVA / "stages" / "StageRows.java"
    assert sorted(_java_list(stage_rows, "EVENT_COLUMNS")) == sorted(STAGE_INPUT_COLUMNS)
    assert _java_list(stage_rows, "LATE_COLUMNS") == list(LATE_EVENT_COLUMNS)
    merger = (JAVA / "stages" / "WindowMerger.java").read_text()
    assert (
        "WindowClose.closeTime(endMs, allowedLatenessMs)" in merger
        or "WindowClose.closeTime(key.windowEndMs, allowedLatenessMs)" in merger
    )


def test_none_held_is_the_closers_no_watermark_and_nothing_closed():
    """The stages' handover start names "none held" as the JVM does: Long.MIN_VALUE for both."""
    from jobs.stages_plan import NONE_HELD

    source = (OPERATORS / "WindowClose.java").read_text()
    for constant in ("NO_WATERMARK", "NOTHING_CLOSED"):
        assert re.search(rf"long {constant} = Long\.MIN_VALUE;", source), constant
    assert NONE_HELD == -(2**63)
