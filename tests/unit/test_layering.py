"""House rule: pure modules import no Flink, database, Kafka or HTTP client, so unit tests need none."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO_ROOT

PURE_MODULES = [
    "meterflow/windowing.py",
    "jobs/plan.py",
    "jobs/sql.py",
    "jobs/source_plan.py",
    "connectors/avro_types.py",
    "sinks/postgres_schema.py",
    "billing/identifiers.py",
    "billing/retry.py",
    "billing/deliveries.py",
    "sinks/ledger_schema.py",
    "billing/reconcile.py",
    "jobs/billing_plan.py",
    "billing/delivery.py",
    "meterflow/config.py",
    "meterflow/config_values.py",
    "meterflow/input_contract.py",
    "connectors/dead_letters.py",
    "connectors/topics.py",
    "meterflow/errors.py",
    "meterflow/metrics_conf.py",
    "meterflow/security.py",
    "meterflow/corrections.py",
    "sinks/corrections_schema.py",
    "meterflow/retained_state.py",
    "meterflow/reprocess.py",
    "jobs/reprocess_plan.py",
    "sinks/reprocess_schema.py",
    "meterflow/handover.py",
    "jobs/stages_plan.py",
    "jobs/guard_plan.py",
]
FORBIDDEN = ("pyflink", "psycopg", "kafka", "stripe", "requests", "urllib", "httpx")


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports(module):
    """The module's imports stay clear of I/O clients."""
    tree = ast.parse((REPO_ROOT / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & set(FORBIDDEN), f"{module} imports {imported & set(FORBIDDEN)}"
