"""The resubmit scenarios (tests/e2e/test_resubmit.py), unchanged, on the two-stage graph.

A JobManager ``kill -9`` on a cluster without high availability, a cancel, and a TaskManager gone
past the transaction timeout, each with late, boundary, duplicate and malformed records in flight,
each followed by what the operator does (``meterflow stack up``, ``meterflow submit``), on a stack
of their own whose base config selects ``flink.usage_graph: two_stage``. A module of its own, so
this stack starts after the other two-stage stack is gone.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meterflow.local.stack import StackConfigs
from tests.e2e.conftest import running_stack
from tests.e2e.test_resubmit import (
    NO_HA,
    test_cancelled_and_resubmitted,
    test_jobmanager_killed_without_ha_and_resubmitted,
    test_taskmanager_gone_longer_than_the_transaction_timeout,
)
from tests.e2e.test_two_stage_graph import TWO_STAGE

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCENARIOS = (
    test_jobmanager_killed_without_ha_and_resubmitted,
    test_cancelled_and_resubmitted,
    test_taskmanager_gone_longer_than_the_transaction_timeout,
)


@pytest.fixture(scope="module")
def stack_without_ha(tmp_path_factory, request) -> Iterator[StackConfigs]:
    """The resubmit scenarios' stack without high availability, with the two-stage graph."""
    with running_stack(
        tmp_path_factory.mktemp("stack-two-stage-no-ha"), request, flink=TWO_STAGE, stack=NO_HA
    ) as stack:
        yield stack
