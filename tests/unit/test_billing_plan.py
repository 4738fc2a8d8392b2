"""The billing job's SQL and config: the closed-windows sink and source, the partitioning key, the derived names."""

from __future__ import annotations

from datetime import timedelta

import pytest

from connectors.avro_types import derive_columns, load_schema
from jobs.billing_plan import (
    BILLING_INPUT_COLUMNS,
    billing_input_query,
    billing_key,
    billing_key_expr,
    closed_windows_source_ddl,
    retry_ticks_ddl,
)
from jobs.plan import CLOSED_WINDOW_SCHEMA, CLOSED_WINDOWS_VIEW, closed_windows_insert, closed_windows_sink_ddl
from meterflow.config import JobConfig
from meterflow.errors import ConfigError
from meterflow.local.flink_jobs import job_names
from meterflow.window_row import WINDOW_ROW, names


@pytest.fixture
def cfg() -> JobConfig:
    return JobConfig.model_validate(
        {
            "kafka": {"closed_windows_topic": "closed-x", "consumer_group": "g1"},
            "flink": {"job_name": "mf", "parallelism": 2},
            "billing": {"enabled": True},
        }
    )


def test_closed_window_schema_is_exact():
    """The topic's record: window times as timestamps, the quantity as an exact decimal, never a float."""
    cols = {c.name: c.sql_type for c in derive_columns(load_schema(CLOSED_WINDOW_SCHEMA))}
    assert tuple(cols) == names(WINDOW_ROW)
    assert (
        cols["quantity"] == "DECIMAL(38, 9) NOT NULL"
        and cols["window_start"] == "TIMESTAMP(3) NOT NULL"
        and cols["revision"] == "BIGINT NOT NULL"
    )


def test_closed_windows_sink_is_transactional_avro(cfg):
    """Exactly-once, its own transactional id prefix, columns from the .avsc, fed by the closer's view."""
    ddl = closed_windows_sink_ddl(cfg)
    assert "'topic' = 'closed-x'" in ddl and "'sink.delivery-guarantee' = 'exactly-once'" in ddl
    assert "'sink.transactional-id-prefix' = 'mf-closed-windows'" in ddl and "'format' = 'avro'" in ddl
    assert "`quantity` DECIMAL(38, 9) NOT NULL" in ddl
    insert = closed_windows_insert()
    assert f"FROM `{CLOSED_WINDOWS_VIEW}`" in insert and "CAST(`quantity` AS DECIMAL(38, 9))" in insert
    assert "TO_TIMESTAMP_LTZ(`window_start_ms`, 3)" in insert


def test_billing_source_reads_committed_windows_with_its_own_group(cfg):
    """read_committed (the usage job writes in transactions), group <consumer_group>-billing, offsets from the group."""
    ddl = closed_windows_source_ddl(cfg)
    assert "'topic' = 'closed-x'" in ddl and "'properties.group.id' = 'g1-billing'" in ddl
    assert "'properties.isolation.level' = 'read_committed'" in ddl and "'scan.startup.mode' = 'group-offsets'" in ddl
    query = billing_input_query()
    assert query.count("SELECT `billing_key`") == 2 and "UNION ALL" in query
    assert "CAST(`quantity` AS STRING)" in query, "the quantity crosses into Python as exact text"
    assert BILLING_INPUT_COLUMNS[0] == "billing_key" and BILLING_INPUT_COLUMNS[-1] == "retry_identifier"
    assert "'rows-per-second' = '2'" in retry_ticks_ddl(2)


def test_partitioning_key_is_the_same_in_sql_and_python():
    """A retry (keyed in Python) reaches the subtask that owns its window (keyed in SQL)."""
    assert billing_key("t", "c", "m") == "t\x1fc\x1fm"
    assert billing_key_expr() == "CONCAT(`tenant_id`, CHR(31), `customer_id`, CHR(31), `meter`)"


def test_derived_names_and_defaults(cfg):
    """The billing job's name, group and parallelism follow the usage job's unless set."""
    assert (cfg.billing_job_name, cfg.billing_consumer_group, cfg.billing_parallelism) == (
        "mf-billing",
        "g1-billing",
        2,
    )
    assert job_names(cfg) == ["mf", "mf-billing"]
    assert (cfg.billing_max_in_flight, cfg.billing.provider_dedup_window, cfg.kafka.closed_windows_topic) == (
        64,
        timedelta(hours=24),
        "closed-x",
    )
    other = JobConfig.model_validate({"billing": {"consumer_group": "bill", "parallelism": 3}})
    assert (other.billing_consumer_group, other.billing_parallelism, job_names(other)) == (
        "bill",
        3,
        ["meterflow-usage"],
    )
    assert JobConfig().kafka.closed_windows_topic == "usage-windows-closed"


def test_retry_lease_must_outlast_a_call(write_config):
    """A lease shorter than a call could hand out a delivery that is still in flight."""
    from meterflow.config import load_config

    with pytest.raises(ConfigError, match="retry_lease"):
        load_config(write_config("billing:\n  request_timeout: 30s\n  retry_lease: 20s\n"), environ={})


def test_deliveries_in_flight_default_by_api(write_config):
    """64 on v1 (one call each), 1024 on the v2 stream (they share requests); a set value wins; the
    held-per-key limit is checked against the value in force."""
    from meterflow.config import load_config

    stream = "stripe:\n  meter_events_api: v2_stream\n"
    assert load_config(write_config(""), environ={}).billing_max_in_flight == 64
    assert load_config(write_config(stream), environ={}).billing_max_in_flight == 1024
    assert load_config(write_config(stream + "billing:\n  max_in_flight: 32\n"), environ={}).billing_max_in_flight == 32
    assert (
        load_config(write_config(stream + "billing:\n  max_held_per_key: 200\n"), environ={}).billing.max_held_per_key
        == 200
    )
    with pytest.raises(ConfigError, match="max_held_per_key .200. must be at most billing.max_in_flight .64."):
        load_config(write_config("billing:\n  max_held_per_key: 200\n"), environ={})


def test_a_key_holds_no_more_slots_than_there_are(write_config):
    """billing.max_held_per_key up to billing.max_in_flight; one past it is refused, naming both."""
    from meterflow.config import load_config

    assert (
        load_config(
            write_config("billing:\n  max_in_flight: 8\n  max_held_per_key: 8\n"), environ={}
        ).billing.max_held_per_key
        == 8
    )
    with pytest.raises(ConfigError, match="max_held_per_key .9. must be at most billing.max_in_flight .8."):
        load_config(write_config("billing:\n  max_in_flight: 8\n  max_held_per_key: 9\n"), environ={})


@pytest.mark.parametrize(
    ("max_in_flight", "rows", "batches"),
    [(1, 1, 1), (15, 1, 15), (16, 1, 16), (64, 4, 16), (100, 6, 17), (1024, 64, 16), (4096, 64, 64)],
)
def test_deliveries_cross_into_python_in_batches_that_keep_the_calls_in_flight(max_in_flight, rows, batches):
    """A sixteenth of max_in_flight per batch, at most 64; the operator's capacity in batches covers
    max_in_flight rows and never more than one batch past it."""
    from jobs.billing_plan import MAX_DELIVERY_BATCH_ROWS, delivery_batch_rows, delivery_batches_in_flight

    assert delivery_batch_rows(max_in_flight) == rows <= MAX_DELIVERY_BATCH_ROWS
    assert delivery_batches_in_flight(max_in_flight) == batches
    assert max_in_flight <= batches * rows < max_in_flight + rows
