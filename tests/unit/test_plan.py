"""SQL generation of the job: intervals, source DDL derived from the schema, sink, aggregate."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest

from jobs.plan import (
    CLASSIFIED_COLUMNS,
    DECISION_COLUMNS,
    ROUTED_COLUMNS,
    JdbcTarget,
    classifier_fields,
    classify_query,
    dead_letter_insert,
    dead_letter_sink_ddl,
    dedup_query,
    late_events_insert,
    late_events_sink_ddl,
    quantity_expr,
    routed_query,
    state_backend_options,
    table_options,
    usage_windows_sink_ddl,
    window_changelog_query,
)
from jobs.source_plan import (
    METERS_OPTION,
    VALIDATED_VIEW,
    bounded_event_time,
    dimensions_key_column,
    format_meters,
    usage_source_ddl,
    validate_query,
)
from jobs.sql import sql_interval, sql_string
from meterflow.config import load_config
from meterflow.errors import ConfigError
from sinks.postgres_schema import check_identifier, usage_table_ddl


@pytest.fixture
def cfg(write_config):
    return load_config(
        write_config(
            "event_time:\n  window_size: 5m\n  watermark_delay: 1500ms\n  source_idle_timeout: 30s\nkafka:\n  usage_events_topic: in-topic\n"
        ),
        environ={},
    )


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        (timedelta(seconds=60), "INTERVAL '60' SECOND"),
        (timedelta(milliseconds=1500), "INTERVAL '1.500' SECOND(3)"),
        (timedelta(0), "INTERVAL '0' SECOND"),
        (timedelta(milliseconds=5), "INTERVAL '0.005' SECOND(3)"),
    ],
)
def test_sql_interval(value, literal):
    """Durations become exact interval literals."""
    assert sql_interval(value) == literal


def test_sql_string_escapes_quotes():
    """Quotes inside option values cannot break out of the literal."""
    assert sql_string("a'b") == "'a''b'"


def test_source_decodes_in_the_kafka_source_with_the_format(cfg):
    """The Kafka source decodes values with the meterflow-avro format: the schema's fields, then why a value
    cannot be counted, its group-by key (both by the configured meters) and its raw bytes."""
    ddl = usage_source_ddl(cfg)
    assert "'format' = 'meterflow-avro'" in ddl and "'topic' = 'in-topic'" in ddl
    assert "  `quantity` DECIMAL(38, 9),\n  `event_time` TIMESTAMP(3),\n  `dimensions` MAP<STRING, STRING>,\n" in ddl
    assert "`format_reject` STRING METADATA FROM 'value.reject' VIRTUAL" in ddl
    assert "`format_dimensions_key` STRING NOT NULL METADATA FROM 'value.dimensions-key' VIRTUAL" in ddl
    assert f"{sql_string(METERS_OPTION)} = {sql_string(format_meters(cfg))}" in ddl
    assert "`payload` BYTES METADATA FROM 'value.raw' VIRTUAL" in ddl
    assert "'properties.isolation.level' = 'read_committed'" in ddl
    assert "`kafka_timestamp` TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL" in ddl
    assert "decode_usage_event" not in ddl


def test_watermark_only_from_plausible_event_times(cfg):
    """The watermark follows the decoded time only inside the plausible range around the record timestamp."""
    ddl = usage_source_ddl(cfg)
    assert "WATERMARK FOR `bounded_time` AS `bounded_time` - INTERVAL '1.500' SECOND(3)" in ddl
    bounded = bounded_event_time(cfg)
    assert f"`bounded_time` AS {bounded}," in ddl
    assert bounded.startswith("CASE WHEN `event_time` IS NOT NULL AND `event_time` >= ")
    assert f"TIMESTAMPADD(SECOND, -{35 * 86400}, CAST(`kafka_timestamp` AS TIMESTAMP(3)))" in bounded
    assert "TIMESTAMPADD(SECOND, 300, CAST(`kafka_timestamp` AS TIMESTAMP(3)))" in bounded
    assert bounded.endswith("ELSE TIMESTAMP '1970-01-01 00:00:00.000' END")


def test_validation_rules_follow_the_meter_config(write_config):
    """The format's reason comes first (undecodable values, empty ids, unknown meters, forbidden negatives:
    the meters it checks them by are the config's), then out-of-range times."""
    cfg = load_config(
        write_config(
            "meters:\n  - name: tokens\n    group_by: [region, model]\n  - name: credits\n    allow_negative: true\n"
        ),
        environ={},
    )
    assert json.loads(format_meters(cfg)) == {
        "tokens": {"allow_negative": False, "group_by": ["model", "region"]},
        "credits": {"allow_negative": True, "group_by": []},
    }
    sql = validate_query(cfg)
    assert "CASE WHEN `format_reject` IS NOT NULL THEN `format_reject` WHEN `bounded_time` = " in sql
    assert (
        "WHEN `bounded_time` = TIMESTAMP '1970-01-01 00:00:00.000' THEN CONCAT('event_time out of range: ', CAST(`event_time` AS STRING)"
        in sql
    )
    # Downstream, event_time is the plausible time the watermark follows.
    assert "`bounded_time` AS `event_time`" in sql


def test_dead_letters_keep_raw_bytes_and_are_counted(cfg):
    """Dead letters carry payload and reason, pass through the counting UDF, exactly-once to Kafka."""
    assert "`count_dead_letter`(`reject_reason`, `payload`, 1048576)" in dead_letter_insert(cfg)
    assert "WHERE `reject_reason` IS NOT NULL" in dead_letter_insert(cfg)
    ddl = dead_letter_sink_ddl(cfg)
    assert "`payload` BYTES NOT NULL" in ddl and "`reason` STRING NOT NULL" in ddl
    assert "'sink.delivery-guarantee' = 'exactly-once'" in ddl


def test_aggregate_counts_only_on_time_events_per_key_and_window(cfg):
    """The aggregate sums quantity and counts on-time events per key and window of the configured size."""
    sql = window_changelog_query(cfg)
    assert "FROM `classified_events` WHERE `reject_reason` IS NULL AND NOT `is_late`" in sql
    assert (
        "GROUP BY `tenant_id`, `customer_id`, `meter`, `dimensions_key`, TUMBLE(`rowtime`, INTERVAL '300' SECOND)"
        in sql
    )
    assert "SUM(`quantity`)" in sql and "COUNT(*) AS `event_count`" in sql
    assert "AS STRING) AS `quantity`" in sql  # exact decimal string across the Python bridge


def test_routed_query_reads_the_source_once_for_both_outputs(cfg):
    """Counted events and rejected records in one stream through one dedup: no UNION, so nothing breaks the chain."""
    sql = routed_query(cfg)
    assert "UNION" not in sql
    assert sql.count(f"FROM `{VALIDATED_VIEW}`") == 1
    assert sql.count("ROW_NUMBER()") == 1 and "PARTITION BY `tenant_id`, `event_id` ORDER BY `proc_time` ASC" in sql


def test_a_rejected_record_has_a_dedup_key_of_its_own(cfg):
    """A rejected record's key is its Kafka coordinates and timestamp with no tenant: unique, and never a counted event's key.

    Counted events keep (tenant_id, event_id) and carry no payload or coordinates into the exchange.
    """
    sql = routed_query(cfg)
    assert "CASE WHEN `reject_reason` IS NULL THEN `tenant_id` END AS `tenant_id`" in sql
    assert (
        "ELSE CONCAT(`source_topic`, '/', CAST(`source_partition` AS STRING), '/', CAST(`source_offset` AS STRING), '/', CAST(`kafka_timestamp` AS STRING)) END AS `event_id`"
        in sql
    )
    for column in ("payload", "source_topic", "source_partition", "source_offset"):
        assert f"CASE WHEN NOT `reject_reason` IS NULL THEN `{column}` END AS `{column}`" in sql


def test_a_rejected_record_gets_no_window(cfg):
    """The classifier passes a row without a window end unchanged: rejected records get none."""
    sql = classify_query(cfg, "src")
    for column in ("dimensions_key", "window_start", "window_end"):
        assert re.search(rf"CASE WHEN `reject_reason` IS NULL THEN .* END AS `{column}`", sql), column


def test_dedup_keeps_first_copy_per_tenant_and_event_id():
    """Dedup partitions by (tenant_id, event_id) and keeps row number 1 in arrival order."""
    sql = dedup_query()
    assert "PARTITION BY `tenant_id`, `event_id` ORDER BY `proc_time` ASC" in sql
    assert "`row_num` = 1" in sql


def test_classification_is_left_to_the_jvm_classifier(write_config):
    """SQL computes the window; the late decision is the classifier's, never a live CURRENT_WATERMARK."""
    cfg = load_config(write_config("event_time:\n  window_size: 10s\n  allowed_lateness: 30s\n"), environ={})
    sql = classify_query(cfg, "src")
    assert "CURRENT_WATERMARK" not in sql
    assert "is_late" not in sql  # appended by the classifier
    assert "MOD(" in sql and "+ 10000, 3) AS TIMESTAMP(3)) END AS `window_end`" in sql


def test_classifier_fields_point_at_the_routed_columns(cfg):
    """The positions the Java classifier reads and sets are those of the routed query's columns."""
    head = routed_query(cfg).split("\nFROM ")[0].removeprefix("SELECT ")
    names = [c.strip().split(" AS ")[-1].strip("`") for c in re.split(r",\s+(?![^(]*\))", head)]
    assert tuple(names) == ROUTED_COLUMNS
    assert [ROUTED_COLUMNS[i] for i in classifier_fields()] == ["event_time", "window_end"]


def test_decision_columns_are_the_classifiers():
    """The columns the classified view has after the routed ones are those the Java classifier appends, in its order."""
    from tests.conftest import REPO_ROOT

    java = (REPO_ROOT / "jvm/src/main/java/dev/meterflow/operators/LatenessClassifier.java").read_text()
    declared = re.search(r"DECISION_COLUMNS = List\.of\(([^)]*)\)", java)
    assert declared is not None
    assert tuple(c.strip().strip('"') for c in declared.group(1).split(",")) == DECISION_COLUMNS
    assert (*ROUTED_COLUMNS, *DECISION_COLUMNS) == CLASSIFIED_COLUMNS


def test_lateness_options_only_when_configured(write_config):
    """Allow-lateness and late-fire are set only for a positive allowed lateness; dedup TTL always."""
    none = table_options(load_config(write_config(""), environ={}))
    assert "table.exec.emit.allow-lateness" not in none
    assert none["table.exec.state.ttl"] == f"{7 * 86_400_000} ms"
    some = table_options(
        load_config(write_config("event_time:\n  allowed_lateness: 30s\n  early_fire_interval: 1s\n"), environ={})
    )
    assert some["table.exec.emit.allow-lateness"] == "30000 ms"
    assert some["table.exec.emit.late-fire.enabled"] == "true"
    assert some["table.exec.emit.early-fire.delay"] == "1000 ms"


def test_late_sink_is_exactly_once_avro(cfg):
    """Late events go to Kafka transactionally, as Avro with the late-event schema's columns."""
    ddl = late_events_sink_ddl(cfg)
    assert "'sink.delivery-guarantee' = 'exactly-once'" in ddl
    assert "'sink.transactional-id-prefix' = 'meterflow-usage-late'" in ddl
    assert "`lateness_ms` BIGINT NOT NULL" in ddl and "`watermark` TIMESTAMP(3) NOT NULL" in ddl
    assert "WHERE `reject_reason` IS NULL AND `is_late`" in late_events_insert()


def test_table_options_run_in_utc(cfg):
    """The job computes windows in UTC; Flink's own idleness is off, the usage source has its own."""
    options = table_options(cfg)
    assert options["table.local-time-zone"] == "UTC"
    assert options["table.exec.source.idle-timeout"] == "0 ms"


def test_usage_source_idleness_waits_for_catch_up(cfg):
    """The usage source reads Kafka through the meterflow-kafka connector, with both idleness timeouts from config."""
    ddl = usage_source_ddl(cfg)
    assert "'connector' = 'meterflow-kafka'" in ddl
    assert "'meterflow.idle-timeout' = '30000 ms'" in ddl
    assert "'meterflow.catch-up-timeout' = '60000 ms'" in ddl
    # The append time the connector measures a partition's lag with.
    assert "`kafka_timestamp` TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL" in ddl


def test_sink_ddl_keys_on_window_identity():
    """The benchmark baseline's JDBC sink upserts on the usage table's key: (tenant, customer, meter, dimensions key, window start, window end)."""
    target = JdbcTarget("jdbc:postgresql://h:1/d", "usage_windows", "u", "p")
    ddl = usage_windows_sink_ddl(target)
    assert (
        "PRIMARY KEY (`tenant_id`, `customer_id`, `meter`, `dimensions_key`, `window_start`, `window_end`) NOT ENFORCED"
        in ddl
    )
    from sinks.postgres_schema import USAGE_KEY_COLUMNS

    assert ", ".join(f"`{c}`" for c in USAGE_KEY_COLUMNS) in ddl
    assert "'connector' = 'jdbc'" in ddl and "is_final" not in ddl


METERS = """
meters:
  - name: tokens
    group_by: [region, model]
  - name: api_calls
    aggregation: COUNT
  - name: peak
    aggregation: MAX
  - name: storage
    aggregation: LATEST
  - name: users
    aggregation: UNIQUE_COUNT
    unique_dimension: user
"""


def test_quantity_is_plain_sum_when_every_meter_sums(cfg):
    """The common case stays a plain SUM."""
    assert quantity_expr(cfg) == "SUM(`quantity`)"
    assert dimensions_key_column(cfg) == "'{}'", "the window state's key type (CHAR(2)) stays as it was"


def test_each_meter_gets_its_aggregation(write_config):
    """A CASE on the meter picks each meter's aggregate; group-by dimensions form a sorted JSON key."""
    cfg = load_config(write_config(METERS), environ={})
    q = quantity_expr(cfg)
    assert "WHEN 'tokens' THEN SUM(`quantity`)" in q
    assert "WHEN 'api_calls' THEN CAST(COUNT(*) AS DECIMAL(38, 9))" in q
    assert "WHEN 'peak' THEN MAX(`quantity`)" in q
    assert "WHEN 'storage' THEN CAST(SPLIT_INDEX(MAX(CASE WHEN `meter` = 'storage'" in q
    assert "COUNT(DISTINCT CASE WHEN `meter` = 'users' THEN `dimensions`['user'] END)" in q
    assert dimensions_key_column(cfg) == "`format_dimensions_key`", "built in the source by the format"


@pytest.mark.parametrize(
    ("meter_yaml", "message"),
    [
        ("  - name: u\n    aggregation: UNIQUE_COUNT\n", "unique_dimension is required"),
        ("  - name: u\n    unique_dimension: user\n", "unique_dimension is required"),
        ("  - name: u\n    aggregation: MEDIAN\n", "aggregation"),
        ("  - name: u\n    group_by: [a, a]\n", "distinct dimension names"),
        ('  - name: u\n    group_by: ["a\\n"]\n', "distinct dimension names"),
        ("  - name: u\n  - name: u\n", "each once"),
        ("  - name: 'bad name'\n", "name"),
    ],
)
def test_meter_config_is_checked(write_config, meter_yaml, message):
    """Inconsistent meter definitions are refused with the reason."""
    from meterflow.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(write_config("meters:\n" + meter_yaml), environ={})


def test_usage_table_ddl_has_revision_guard():
    """The table refuses to go back to an older revision."""
    statements = usage_table_ddl("usage_windows")
    assert any("NEW.revision < OLD.revision" in s for s in statements)
    assert any("BEFORE UPDATE ON usage_windows" in s for s in statements)


@pytest.mark.parametrize("bad", ["Usage", "usage; drop table x", "1usage", "a" * 64, ""])
def test_identifiers_are_checked(bad):
    """Table names that are not plain identifiers are refused."""
    with pytest.raises(ValueError, match="identifier"):
        check_identifier(bad)


@pytest.mark.parametrize(
    ("backend", "options"),
    [
        ("hashmap", {"state.backend.type": "hashmap"}),
        (
            "rocksdb",
            {
                "state.backend.type": "rocksdb",
                "execution.checkpointing.incremental": "true",
                "state.backend.rocksdb.use-bloom-filter": "true",
            },
        ),
    ],
)
def test_state_backend_is_a_config_key(write_config, backend, options):
    """flink.state_backend picks the job's state backend; RocksDB checkpoints incrementally and filters lookups of new ids."""
    cfg = load_config(write_config(f"flink:\n  state_backend: {backend}\n"), environ={})
    assert state_backend_options(cfg) == options


def test_unknown_state_backend_is_refused(write_config):
    """Only the two backends the job is built for are accepted."""
    with pytest.raises(ConfigError, match="state_backend"):
        load_config(write_config("flink:\n  state_backend: forst\n"), environ={})


def test_default_state_backend_is_rocksdb(write_config):
    """Without the key the job keeps its state in RocksDB with incremental checkpoints, as meterflow.yaml documents.

    The default 7-day dedup horizon holds more ids than a heap can above a few events per second
    (docs/operations.md, "Sizing the dedup state").
    """
    from tests.conftest import REPO_ROOT

    assert state_backend_options(load_config(write_config(""), environ={}))["state.backend.type"] == "rocksdb"
    assert "  state_backend: rocksdb" in (REPO_ROOT / "meterflow.yaml").read_text()
