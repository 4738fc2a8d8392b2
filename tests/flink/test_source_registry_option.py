"""The source with ``kafka.schema_registry_url``: Flink hands the option to the meterflow-avro format under
the name the job writes (``meterflow-avro.schema-registry.url``), and the format checks the URL at planning."""

from __future__ import annotations

import pytest

from jobs.source_plan import SCHEMA_REGISTRY_URL_OPTION, USAGE_SOURCE_TABLE, usage_source_ddl
from meterflow.config import load_config

URL = "http://127.0.0.1:8085/apis/ccompat/v7"


def _plan(table_env, ddl: str) -> str:
    from pyflink.table.explain_detail import ExplainDetail

    # An earlier test of the session may have left a temporary table or view of that name, which would shadow this one.
    table_env.execute_sql(f"DROP TEMPORARY TABLE IF EXISTS `{USAGE_SOURCE_TABLE}`")
    table_env.execute_sql(f"DROP TEMPORARY VIEW IF EXISTS `{USAGE_SOURCE_TABLE}`")
    table_env.execute_sql(f"DROP TABLE IF EXISTS `{USAGE_SOURCE_TABLE}`")
    table_env.execute_sql(ddl)
    try:
        # Translating to the execution plan creates the format's runtime decoder.
        return table_env.sql_query(f"SELECT `event_id`, `format_reject` FROM `{USAGE_SOURCE_TABLE}`").explain(
            ExplainDetail.JSON_EXECUTION_PLAN
        )
    finally:
        table_env.execute_sql(f"DROP TABLE IF EXISTS `{USAGE_SOURCE_TABLE}`")


def test_the_registry_option_reaches_the_format(table_env, write_config):
    cfg = load_config(
        write_config(f"kafka:\n  bootstrap_servers: 127.0.0.1:9\n  schema_registry_url: {URL}\n"), environ={}
    )
    ddl = usage_source_ddl(cfg)
    assert f"'{SCHEMA_REGISTRY_URL_OPTION}' = '{URL}'" in ddl
    assert '"pact" : "Data Source"' in _plan(table_env, ddl)
    # A misspelt option is refused by Flink, so the name above is the one the format reads.
    with pytest.raises(Exception, match="schema-registry.urll"):
        _plan(table_env, ddl.replace(SCHEMA_REGISTRY_URL_OPTION, SCHEMA_REGISTRY_URL_OPTION + "l"))
    with pytest.raises(Exception, match="must be an http\\(s\\) URL with a host, got ftp://registry"):
        _plan(table_env, ddl.replace(URL, "ftp://registry"))
