"""The billing job's graph in a PyFlink local environment: keyed in the JVM, one Python step that delivers."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.flink


def test_billing_job_is_keyed_once_and_delivers_asynchronously():
    """Closed windows and retries meet in SQL, are hash-partitioned by (tenant, customer, meter) in the JVM, then delivered."""
    from jobs.billing_job import build_environment, declare_pipeline
    from meterflow.config import JobConfig
    from meterflow.local.flink import FLINK_CONNECTOR_JARS, JVM_JAR_DIR

    cfg = JobConfig.model_validate(
        {"billing": {"enabled": True, "max_in_flight": 8}, "flink": {"parallelism": 2, "job_name": "graph"}}
    )
    jars = ";".join(
        p.as_uri() for p in [*sorted(JVM_JAR_DIR.glob("*.jar")), *sorted(FLINK_CONNECTOR_JARS.glob("*.jar"))]
    )
    env, t_env = build_environment(cfg, {"pipeline.jars": jars})
    declare_pipeline(env, t_env, cfg)
    nodes = json.loads(env.get_execution_plan())["nodes"]
    by_name = {n["contents"]: n for n in nodes}
    deliver = by_name["deliver to the billing provider"]
    batcher = by_name["gather windows into batches"]
    # Partitioned once, then batched in the subtask that owns the keys: a batch crosses into Python whole.
    assert [p["ship_strategy"] for p in batcher["predecessors"]] == ["HASH"] and batcher["parallelism"] == 2
    assert [(p["id"], p["ship_strategy"]) for p in deliver["predecessors"]] == [(batcher["id"], "FORWARD")]
    assert deliver["parallelism"] == 2
    assert "scan the ledger for due retries" in by_name
    assert any(name.startswith("billing outcomes") for name in by_name)
    python_steps = [
        n for n in nodes if n["contents"] in ("deliver to the billing provider", "scan the ledger for due retries")
    ]
    assert len(python_steps) == 2, "no Python key_by step: a window crosses into Python once"
