"""Fixtures for graph tests in a PyFlink local environment (no external services)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.flink


@pytest.fixture(scope="session")
def table_env():
    """A streaming table environment at parallelism 2, UTC, shared by the graph tests."""
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.table import StreamTableEnvironment

    from meterflow.local.flink import table_jobs_jars

    conf = Configuration()
    conf.set_string("parallelism.default", "2")
    # The job's JVM code (functions, the meterflow-avro format), the Avro format of the sinks and the
    # Kafka connector, to plan the job's own source (all from scripts/setup.sh).
    jars = table_jobs_jars()
    conf.set_string("pipeline.jars", ";".join(p.as_uri() for p in jars))
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    t_env = StreamTableEnvironment.create(env)
    t_env.get_config().set("table.local-time-zone", "UTC")
    return t_env
