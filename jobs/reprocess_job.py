"""Recompute a closed period's windows from the usage-events topic: a bounded batch run in this
process (Flink's local executor), not on the cluster, so it takes none of the jobs' task slots.
Wiring only: the SQL is jobs/reprocess_plan.py, the rules meterflow/reprocess.py."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from jobs.reprocess_plan import recompute_statements
from meterflow.config import JobConfig
from meterflow.corrections import WindowId
from meterflow.reprocess import Period, WindowTotal


def recompute(cfg: JobConfig, period: Period, jars: Sequence[Path]) -> list[WindowTotal]:
    """Every window of the period with at least one countable event, recomputed.

    ``jars``: the meterflow-avro format (jvm/), the Avro library it builds on (flink-sql-avro) and the Kafka SQL connector.
    """
    from pyflink.common import Configuration
    from pyflink.table import EnvironmentSettings, TableEnvironment

    conf = Configuration()
    conf.set_string("pipeline.jars", ";".join(p.as_uri() for p in jars))
    conf.set_string("parallelism.default", str(cfg.flink.parallelism))
    t_env = TableEnvironment.create(EnvironmentSettings.new_instance().in_batch_mode().with_configuration(conf).build())
    t_env.get_config().set("table.local-time-zone", "UTC")
    setup, query = recompute_statements(cfg, period)
    for statement in setup:
        t_env.execute_sql(statement)
    totals = []
    with t_env.execute_sql(query).collect() as rows:
        for tenant, customer, meter, dims, start, end, quantity, events in rows:
            totals.append(
                WindowTotal(WindowId(tenant, customer, meter, dims, start, end), Decimal(quantity), int(events))
            )
    return totals
