"""The usage source's readers are aligned: the planner's watermark strategy reaches Flink's Kafka
source with event_time.max_source_drift, through the catch-up idleness around it (jvm/ CatchUpIdleness)."""

from __future__ import annotations

import pytest

from meterflow.config import load_config
from tests.flink.usage_graph import usage_stream_graph

pytestmark = [pytest.mark.flink, pytest.mark.slow]


def _alignment(write_config, graph: str, drift: str):
    cfg = load_config(
        write_config(
            "kafka:\n  bootstrap_servers: 127.0.0.1:9\n"
            f"flink:\n  parallelism: 2\n  usage_graph: {graph}\nevent_time:\n  max_source_drift: {drift}\n"
        ),
        environ={"METERFLOW_POSTGRES_PASSWORD": "unused-at-planning"},
    )
    found = []
    nodes = usage_stream_graph(cfg).getStreamNodes().toArray()
    for node in nodes:
        factory = node.getOperatorFactory()
        if factory is None or factory.getClass().getSimpleName() != "SourceOperatorFactory":
            continue
        field = factory.getClass().getDeclaredField("watermarkStrategy")
        field.setAccessible(True)
        strategy = field.get(factory)
        params = strategy.getAlignmentParameters()
        found.append(
            (
                strategy.getClass().getSimpleName(),
                params.getWatermarkGroup(),
                params.getMaxAllowedWatermarkDrift(),
                params.getUpdateInterval(),
            )
        )
    return found


@pytest.mark.parametrize("graph", ["sql", "two_stage"])
def test_the_usage_sources_readers_pause_past_the_drift(write_config, graph):
    assert _alignment(write_config, graph, "30s") == [("CatchUpIdleness", "usage-events", 30_000, 1_000)]


def test_a_drift_of_zero_leaves_the_readers_unaligned(write_config):
    [(_, group, drift, _)] = _alignment(write_config, "two_stage", "0s")
    assert (group, drift) == ("", 2**63 - 1)  # Flink's WatermarkAlignmentParams.WATERMARK_ALIGNMENT_DISABLED
