"""The usage job's end-to-end scenarios, unchanged, on the two-stage graph (``flink.usage_graph: two_stage``).

The same test functions as their own modules run here on stacks whose base config selects the
two keyed JVM stages, so every job these scenarios submit counts with them: the billing-semantics
scenarios (duplicates and lateness; a TaskManager ``kill -9``, a Kafka broker restart and a Postgres
crash, each with late, boundary, duplicate and malformed records in flight; a savepoint, and a
resume at parallelism 1 and 4), a JobManager ``kill -9`` with high availability, idle partitions
rejoining, lateness raised and lowered across a savepoint, late events becoming corrections,
hostile records and the largest records, the metrics in Prometheus, and the walking skeleton's
replay. The resubmits, on a stack without high availability, are test_two_stage_resubmit.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meterflow.local.stack import StackConfigs
from tests.e2e.conftest import running_stack
from tests.e2e.test_billing_semantics import (
    test_duplicates_lateness_and_late_topic,
    test_kafka_broker_restarted_mid_stream,
    test_postgres_restarted_mid_stream,
    test_savepoint_and_resume_at_another_parallelism,
    test_stop_with_savepoint_and_resume,
    test_taskmanager_killed_mid_stream,
)
from tests.e2e.test_config_changes import (
    test_lowered_lateness_closes_windows_with_their_counts,
    test_raised_lateness_keeps_closed_windows_closed,
)
from tests.e2e.test_dead_letter_limits import test_the_largest_records_are_dead_letters_whole_and_the_job_never_restarts
from tests.e2e.test_hostile_input import test_no_hostile_record_stops_or_corrupts_metering
from tests.e2e.test_idle_rejoin import test_idle_partitions_rejoin_then_events_within_lateness
from tests.e2e.test_jobmanager_failover import test_jobmanager_killed_mid_stream
from tests.e2e.test_late_event_corrections import test_late_events_become_corrections_exactly_once
from tests.e2e.test_metrics import test_job_metrics_in_prometheus
from tests.e2e.test_walking_skeleton import test_window_totals_in_postgres_and_replay_is_idempotent

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TWO_STAGE = {"usage_graph": "two_stage"}

# The scenarios, collected again in this module, where the fixtures below give them two-stage stacks.
SCENARIOS = (
    test_duplicates_lateness_and_late_topic,
    test_taskmanager_killed_mid_stream,
    test_kafka_broker_restarted_mid_stream,
    test_postgres_restarted_mid_stream,
    test_stop_with_savepoint_and_resume,
    test_savepoint_and_resume_at_another_parallelism,
    test_raised_lateness_keeps_closed_windows_closed,
    test_lowered_lateness_closes_windows_with_their_counts,
    test_the_largest_records_are_dead_letters_whole_and_the_job_never_restarts,
    test_no_hostile_record_stops_or_corrupts_metering,
    test_idle_partitions_rejoin_then_events_within_lateness,
    test_jobmanager_killed_mid_stream,
    test_late_events_become_corrections_exactly_once,
    test_job_metrics_in_prometheus,
    test_window_totals_in_postgres_and_replay_is_idempotent,
)


@pytest.fixture(scope="module")
def e2e_stack(tmp_path_factory, request) -> Iterator[StackConfigs]:
    """The shared stack's setup with the two-stage graph, for this module's scenarios."""
    with running_stack(tmp_path_factory.mktemp("stack-two-stage"), request, flink=TWO_STAGE) as stack:
        yield stack


def test_the_scenarios_run_the_two_stage_graph(e2e_stack):
    """A usage job submitted from a config of this stack runs the stages: its vertices, from the REST API."""
    from meterflow.local import flink_jobs
    from tests.e2e.helpers import private_job

    cfg, path = private_job(e2e_stack, "graph_check")
    assert cfg.flink.usage_graph == "two_stage"
    job_id = flink_jobs.submit(cfg, path)
    try:
        names = [v["name"] for v in flink_jobs.job_details(cfg, job_id)["vertices"]]
    finally:
        flink_jobs.cancel(cfg, job_id)
    assert any(n.startswith("dedup, classify late or on time, partial windows") for n in names), names
    assert any(n.startswith("merge partials, close windows") for n in names), names
    assert not any("Deduplicate" in n or "GroupWindowAggregate" in n for n in names), names
