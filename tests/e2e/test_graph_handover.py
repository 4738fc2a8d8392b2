"""Switching a running deployment from the SQL graph to the two-stage graph with a handover
(docs/operations.md, "Switching graphs"), with late, boundary, duplicate and malformed records in
flight.

The SQL job runs the billing-semantics scenario until its first windows are final and the risky
records of the first phase are in; the operator stops it with a savepoint, and records keep coming
while no job runs. The operator then does what the runbook says: ``flink.usage_graph: two_stage``
and a new ``kafka.consumer_group`` in the config, and ``meterflow submit --fresh --handover-from
<the old group>``. The scenario goes on against the new job, and its checks hold over both jobs
together: every window exact and final, each late event and each dead letter once, every record
counted once, late, a duplicate or a dead letter. Beyond them: each window is published to the
closed-windows topic once, by the job that closed it. A second test cancels the new job after its
first checkpoint and resubmits it with a plain ``meterflow submit``, which restores that checkpoint
and passes the handover on.

Without the handover the new job would either start at the old group's offsets and lose the counted
events of the windows left open, or read everything again and publish every dead letter, late event
and closed window twice; with ``--fresh`` alone, a copy of an id counted before counts again.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from meterflow.config import JobConfig, load_config
from meterflow.local import flink_jobs
from tests.e2e.batches import CLOSED_SCHEMA, avro_decoder
from tests.e2e.helpers import CLOSER_TENANT, read_topic, table_totals, wait_for
from tests.e2e.scenario import Scenario
from tests.e2e.test_billing_semantics import Fault, run_scenario
from tests.e2e.test_resubmit import meterflow_command

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FIRST_STAGE = "dedup, classify late or on time, partial windows"


def hand_over_to_two_stage(cfg: JobConfig, path: Path, job_id: str, during: Callable[[], None]) -> Fault:
    """Stop the SQL job with a savepoint, send records meanwhile, then the runbook: the config names
    the two-stage graph and a new group, and ``meterflow submit --fresh --handover-from <old group>``."""
    assert cfg.flink.usage_graph == "sql"
    stopped_at = int(time.time() * 1000)
    flink_jobs.stop_with_savepoint(cfg, job_id)
    during()
    data = yaml.safe_load(path.read_text())
    data["flink"]["usage_graph"] = "two_stage"
    data["kafka"]["consumer_group"] = f"{cfg.kafka.consumer_group}-two-stage"
    switched = path.with_name(f"{path.stem}-two-stage.yaml")
    switched.write_text(yaml.safe_dump(data))
    output = meterflow_command(switched, "submit", "--fresh", "--handover-from", cfg.kafka.consumer_group)
    assert f"handing over from consumer group {cfg.kafka.consumer_group}" in " ".join(output.split()), output
    new_cfg = load_config(switched)
    new_job = flink_jobs.running_jobs(new_cfg, new_cfg.flink.job_name)[0]["jid"]
    assert new_job != job_id
    # The REST API shows the new job runs the stages.
    assert any(FIRST_STAGE in v["name"] for v in flink_jobs.job_details(cfg, new_job)["vertices"])
    return Fault(new_job, stopped_at, "handover")


def hand_over_then_cancel_and_resubmit(cfg: JobConfig, path: Path, job_id: str, during: Callable[[], None]) -> Fault:
    """The handover, then, once the new job completed a checkpoint, ``meterflow stop`` (a cancel) and a
    plain ``meterflow submit``: it restores that checkpoint and passes the handover on, so the records
    the SQL job read are routed nowhere again, whether the new job had read them all by then or not."""
    handed_over = hand_over_to_two_stage(cfg, path, job_id, during)
    switched = path.with_name(f"{path.stem}-two-stage.yaml")
    new_cfg = load_config(switched)
    wait_for(
        lambda: flink_jobs.completed_checkpoints(new_cfg, handed_over.job_id) >= 1, 60, "a checkpoint of the new job"
    )
    assert f"cancelled {handed_over.job_id}" in meterflow_command(switched, "stop")
    output = " ".join(meterflow_command(switched, "submit").split())
    assert f"handing over from consumer group {cfg.kafka.consumer_group}" in output, output
    assert "restoring its newest checkpoint" in output, output
    resubmitted = flink_jobs.running_jobs(new_cfg, new_cfg.flink.job_name)[0]["jid"]
    return Fault(resubmitted, handed_over.struck_at_ms, "restore-after-fault")


def _each_window_closed_once(path: Path, s: Scenario) -> None:
    cfg = load_config(path)
    closed = [
        (c["tenant_id"], c["customer_id"], c["meter"], c["window_start"])
        for c in read_topic(cfg.kafka.bootstrap_servers, cfg.kafka.closed_windows_topic, avro_decoder(CLOSED_SCHEMA))
        if c["tenant_id"] != CLOSER_TENANT
    ]
    repeated = {k: n for k, n in Counter(closed).items() if n > 1}
    assert not repeated, f"windows published more than once: {list(repeated.items())[:5]}"
    assert {(t, c, m, start.replace(tzinfo=None)) for t, c, m, start in closed} == set(table_totals(cfg))


def test_a_handover_from_the_sql_graph_loses_and_repeats_nothing(e2e_stack):
    """SQL graph, stop with a savepoint mid-stream, the two-stage graph with --handover-from: exact, each output once."""
    run_scenario(e2e_stack, "handover", disrupt=hand_over_to_two_stage, audit=_each_window_closed_once)


def test_a_handed_over_job_cancelled_and_resubmitted_still_routes_nothing_twice(e2e_stack):
    """The handover, a cancel of the new job and a plain resubmit: the restore keeps the handover, every check holds."""
    run_scenario(
        e2e_stack, "handover_resubmit", disrupt=hand_over_then_cancel_and_resubmit, audit=_each_window_closed_once
    )
