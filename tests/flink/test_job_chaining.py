"""Which operators of the usage job share a task: the chains its throughput depends on.

Every boundary between chains serialises each record, hands it to another thread and
deserialises it; a keyed exchange is needed where the key changes, nowhere else. The graph is
the job's own (``declare_pipeline``), cut into tasks by Flink's own JobGraph generator.
"""

from __future__ import annotations

import pytest

from jobs.plan import CLASSIFIED_COLUMNS, CLASSIFIED_VIEW, GUARDED_VIEW
from meterflow.config import load_config
from tests.flink.usage_graph import declared_usage_job, usage_stream_graph

pytestmark = [pytest.mark.flink, pytest.mark.slow]


def _config(write_config, parallelism: int = 1):
    return load_config(
        write_config(f"kafka:\n  bootstrap_servers: 127.0.0.1:9\nflink:\n  parallelism: {parallelism}\n"),
        environ={"METERFLOW_POSTGRES_PASSWORD": "unused-at-planning"},
    )


def _vertices(write_config, parallelism: int) -> list:
    return list(usage_stream_graph(_config(write_config, parallelism)).getJobGraph().getVerticesAsArray())


def _tasks(write_config, parallelism: int) -> list[str]:
    return [vertex.getName() for vertex in _vertices(write_config, parallelism)]


@pytest.mark.parametrize("parallelism", [1, 2])
def test_dedup_classifier_and_kafka_outputs_run_in_one_task(write_config, parallelism):
    """The dedup, the lateness classifier, the late-events sink and the dead-letter sink are one chain.

    Rejected records travel with the counted ones through the dedup, so nothing joins the stream
    after it and the classifier has a single input it chains to. The filter that picks the window
    guard's input (counted on-time events) runs there too, so only those rows cross to the guard.
    """
    tasks = _tasks(write_config, parallelism)
    (classify,) = [t for t in tasks if "classify late or on time" in t]
    assert "Deduplicate" in classify, tasks
    assert "late_events_sink" in classify and "dead_letter_sink" in classify, classify
    assert "counted on-time events" in classify, classify


def test_the_job_has_one_task_per_key(write_config):
    """Five tasks: the source, the dedup keyed by event, the window guard keyed by (tenant, customer,
    meter, window), the window keyed by its group (which adds the dimensions key), the closer keyed by window.

    The guard cannot share a task with the window aggregate: the aggregate's key holds the
    dimensions key, the guard's must not (it counts the keys per window). Each sink, its committer
    included, runs in the task of the operator that feeds it: the guard's dead letters have a sink
    of their own there.
    """
    tasks = _tasks(write_config, 1)
    assert len(tasks) == 5, tasks
    assert sum(t.startswith("Source: KafkaSource") for t in tasks) == 1, tasks
    assert sum(t.startswith("Deduplicate") for t in tasks) == 1, tasks
    assert sum(t.startswith("guard window limits") and "dead_letter_guard_sink" in t for t in tasks) == 1, tasks
    assert sum(t.startswith("GroupWindowAggregate") and "write window updates" in t for t in tasks) == 1, tasks
    assert sum(t.startswith("close windows") and "closed_windows_sink" in t for t in tasks) == 1, tasks


def test_the_window_aggregate_reads_the_guard(write_config):
    """The window aggregate's only input is the guard's task, which reads the classifier's by a keyed exchange."""
    vertices = {v.getName(): v for v in _vertices(write_config, 1)}

    def producers(name: str) -> list[tuple[str, str]]:
        return [(edge.getSource().getProducer().getName(), edge.getShipStrategyName()) for edge in vertices[name].getInputs()]

    (window,) = [n for n in vertices if n.startswith("GroupWindowAggregate")]
    (guard,) = [n for n in vertices if n.startswith("guard window limits")]
    (classify,) = [n for n in vertices if "classify late or on time" in n]
    assert producers(window) == [(guard, "HASH")]
    assert producers(guard) == [(classify, "HASH")]


def test_the_guard_has_stable_uids(write_config):
    """The guard and the filter in front of it keep their state mapping across resubmits (savepoints)."""
    graph = usage_stream_graph(_config(write_config))
    uids = {node.getTransformationUID(): node.getOperatorName() for node in graph.getStreamNodes().toArray()}
    assert uids["guard-window-limits"] == "guard window limits"
    assert uids["guard-window-limits-input"] == "counted on-time events"


def test_the_classified_view_is_the_routed_columns_then_the_decision(write_config):
    """The classifier's internal rows come back as a table of the routed columns, its decision, and the rowtime."""
    _, t_env = declared_usage_job(_config(write_config))
    schema = t_env.from_path(CLASSIFIED_VIEW).get_resolved_schema()
    assert tuple(schema.get_column_names()) == (*CLASSIFIED_COLUMNS, "rowtime")
    types = dict(zip(schema.get_column_names(), (str(t) for t in schema.get_column_data_types()), strict=True))
    assert types["watermark"] == types["window_end"] and types["lateness_ms"] == "BIGINT" and types["is_late"] == "BOOLEAN", types
    # One time attribute: the rowtime carried in the records; event_time stays a plain timestamp.
    assert schema._j_resolved_schema.toString().count("*ROWTIME*") == 1 and types["event_time"] == types["window_end"], types
    assert schema.get_column_data_types()[schema.get_column_names().index("watermark")].precision == 3


def test_the_guarded_view_has_the_classified_columns(write_config):
    """The guard passes rows unchanged: its view has the classified view's columns, types and one rowtime."""
    _, t_env = declared_usage_job(_config(write_config))
    classified = t_env.from_path(CLASSIFIED_VIEW).get_resolved_schema()
    guarded = t_env.from_path(GUARDED_VIEW).get_resolved_schema()
    assert guarded.get_column_names() == classified.get_column_names()
    assert [str(t) for t in guarded.get_column_data_types()] == [str(t) for t in classified.get_column_data_types()]
    assert guarded._j_resolved_schema.toString().count("*ROWTIME*") == 1
