"""Which operators of the usage job share a task: the chains its throughput depends on.

Every boundary between chains serialises each record, hands it to another thread and
deserialises it; a keyed exchange is needed where the key changes, nowhere else. The graph is
the job's own (``declare_pipeline``), cut into tasks by Flink's own JobGraph generator.
"""

from __future__ import annotations

import re

import pytest

from jobs.guard_plan import GUARD_INPUT_COLUMNS, GUARDED_VIEW
from jobs.plan import CLASSIFIED_COLUMNS, CLASSIFIED_VIEW
from meterflow.config import load_config
from tests.flink.usage_graph import declared_usage_job, usage_stream_graph

pytestmark = [pytest.mark.flink, pytest.mark.slow]


def _config(write_config, parallelism: int = 1, graph: str = "sql"):
    return load_config(
        write_config(
            f"kafka:\n  bootstrap_servers: 127.0.0.1:9\nflink:\n  parallelism: {parallelism}\n  usage_graph: {graph}\n"
        ),
        environ={"METERFLOW_POSTGRES_PASSWORD": "unused-at-planning"},
    )


def _vertices(write_config, parallelism: int, graph: str = "sql") -> list:
    return list(usage_stream_graph(_config(write_config, parallelism, graph)).getJobGraph().getVerticesAsArray())


def _tasks(write_config, parallelism: int) -> list[str]:
    return [vertex.getName() for vertex in _vertices(write_config, parallelism)]


@pytest.mark.parametrize("parallelism", [1, 2])
def test_dedup_classifier_and_kafka_outputs_run_in_one_task(write_config, parallelism):
    """The dedup, the lateness classifier, the late-events sink and the dead-letter sink are one chain.

    Rejected records travel with the counted ones through the dedup, the window guard's refusals
    among them, so nothing joins the stream after it and the classifier has a single input it chains to.
    """
    tasks = _tasks(write_config, parallelism)
    (classify,) = [t for t in tasks if "classify late or on time" in t]
    assert "Deduplicate" in classify, tasks
    assert "late_events_sink" in classify and "dead_letter_sink" in classify, classify


def test_the_job_has_one_task_per_key(write_config):
    """Five tasks: the source, the window guard keyed by (tenant, customer, meter, window), the dedup
    keyed by event, the window keyed by its group (which adds the dimensions key), the closer keyed by window.

    The guard runs before the dedup, so an event it refuses takes no dedup state (a replay after
    the limit is raised counts it); its refusals are rejected records, which the dedup's task sends
    to the one dead-letter sink. Each sink, its committer included, runs in the task of the operator
    that feeds it.
    """
    tasks = _tasks(write_config, 1)
    assert len(tasks) == 5, tasks
    assert sum(t.startswith("Source: KafkaSource") for t in tasks) == 1, tasks
    assert sum(t.startswith("guard window limits") for t in tasks) == 1, tasks
    assert sum(t.startswith("Deduplicate") for t in tasks) == 1, tasks
    assert sum(t.startswith("GroupWindowAggregate") and "write window updates" in t for t in tasks) == 1, tasks
    assert sum(t.startswith("close windows") and "closed_windows_sink" in t for t in tasks) == 1, tasks
    assert sum("dead_letter_sink" in t for t in tasks) == 1, tasks


def test_the_guard_sits_between_the_source_and_the_dedup(write_config):
    """The guard reads the source by a keyed exchange, the dedup reads the guard, the window aggregate the classifier."""
    vertices = {v.getName(): v for v in _vertices(write_config, 1)}

    def producers(name: str) -> list[tuple[str, str]]:
        return [
            (edge.getSource().getProducer().getName(), edge.getShipStrategyName())
            for edge in vertices[name].getInputs()
        ]

    (source,) = [n for n in vertices if n.startswith("Source: KafkaSource")]
    (guard,) = [n for n in vertices if n.startswith("guard window limits")]
    (classify,) = [n for n in vertices if "classify late or on time" in n]
    (window,) = [n for n in vertices if n.startswith("GroupWindowAggregate")]
    assert producers(guard) == [(source, "HASH")]
    assert producers(classify) == [(guard, "HASH")]
    assert producers(window) == [(classify, "HASH")]


def test_the_guard_has_a_stable_uid(write_config):
    """The guard keeps its state mapping across resubmits (savepoints)."""
    graph = usage_stream_graph(_config(write_config))
    uids = {node.getTransformationUID(): node.getOperatorName() for node in graph.getStreamNodes().toArray()}
    assert uids["guard-window-limits"] == "guard window limits"


def test_the_classified_view_is_the_routed_columns_then_the_decision(write_config):
    """The classifier's internal rows come back as a table of the routed columns, its decision, and the rowtime."""
    _, t_env = declared_usage_job(_config(write_config))
    schema = t_env.from_path(CLASSIFIED_VIEW).get_resolved_schema()
    assert tuple(schema.get_column_names()) == (*CLASSIFIED_COLUMNS, "rowtime")
    types = dict(zip(schema.get_column_names(), (str(t) for t in schema.get_column_data_types()), strict=True))
    assert (
        types["watermark"] == types["window_end"] and types["lateness_ms"] == "BIGINT" and types["is_late"] == "BOOLEAN"
    ), types
    # One time attribute: the rowtime carried in the records; event_time stays a plain timestamp.
    assert (
        schema._j_resolved_schema.toString().count("*ROWTIME*") == 1 and types["event_time"] == types["window_end"]
    ), types
    assert schema.get_column_data_types()[schema.get_column_names().index("watermark")].precision == 3


def test_the_guarded_view_has_the_validated_columns(write_config):
    """The guard passes rows unchanged: its view has the guard's input columns, then the processing-time
    attribute the dedup orders by; event_time is the one rowtime, with the source's watermarks."""
    _, t_env = declared_usage_job(_config(write_config))
    guarded = t_env.from_path(GUARDED_VIEW).get_resolved_schema()
    assert tuple(guarded.get_column_names()) == (*GUARD_INPUT_COLUMNS, "proc_time")
    text = guarded._j_resolved_schema.toString()
    assert text.count("*ROWTIME*") == 1 and "`event_time` TIMESTAMP(3) *ROWTIME*" in text, text
    assert "*PROCTIME*" in text, text


@pytest.mark.parametrize("parallelism", [1, 2])
def test_the_two_stage_graph_has_one_exchange_per_key_and_no_sql_state(write_config, parallelism):
    """Four tasks: the source; the guard with the dead letters (rejects split from the events in Java,
    taking no dedup state); the first
    stage keyed by event id with the late events; the second keyed by window with every window sink.

    No SQL operator keeps state: the dedup, the lateness and the windows are the stages'.
    """
    vertices = {v.getName(): v for v in _vertices(write_config, parallelism, "two_stage")}

    def producers(name: str) -> list[tuple[str, str]]:
        return [(e.getSource().getProducer().getName(), e.getShipStrategyName()) for e in vertices[name].getInputs()]

    assert len(vertices) == 4, list(vertices)
    (source,) = [n for n in vertices if n.startswith("Source: KafkaSource")]
    (guard,) = [n for n in vertices if n.startswith("guard window limits")]
    (first,) = [n for n in vertices if n.startswith("dedup, classify late or on time, partial windows")]
    (second,) = [n for n in vertices if n.startswith("merge partials, close windows")]
    assert producers(guard) == [(source, "HASH")]
    assert producers(first) == [(guard, "HASH")]
    assert producers(second) == [(first, "HASH")]
    assert "dead_letter_sink" in guard and "metered events" in guard, guard
    # The guard hands its events to the stages in Java: no table conversion between them.
    assert guard.startswith("guard window limits -> metered events, rejects aside"), guard
    assert "late_events_sink" in first, first
    assert all(s in second for s in ("write window updates", "write final windows", "closed_windows_sink")), second
    assert not any(s in n for n in vertices for s in ("Deduplicate", "GroupWindowAggregate")), list(vertices)


def test_the_stages_have_stable_uids(write_config):
    """Each stage keeps its state mapping across resubmits (savepoints)."""
    graph = usage_stream_graph(_config(write_config, graph="two_stage"))
    uids = {node.getTransformationUID(): node.getOperatorName() for node in graph.getStreamNodes().toArray()}
    assert uids["dedup-and-partials"] == "dedup, classify late or on time, partial windows"
    assert uids["merge-partials-close-windows"] == "merge partials, close windows"
    assert uids["guard-window-limits"] == "guard window limits"


# The SQL graph's operators that keep state, by uid: a savepoint maps back to them only while these stay.
SQL_GRAPH_STATEFUL_UIDS = {
    "1_kafka": "Source: KafkaSource-default_catalog.default_database.usage_events",
    "guard-window-limits": "guard window limits",
    "7_deduplicate": "Deduplicate[7]",
    "classify-lateness": "classify late or on time",
    "13_group-window-aggregate": "GroupWindowAggregate[13]",
    "close-windows-jvm": "close windows",
    "write-window-updates": "write window updates: Writer",
    "write-final-windows": "write final windows: Writer",
    "18_sink": "late_events_sink[18]: Writer",
    "20_sink": "dead_letter_sink[20]: Writer",
    "23_sink": "closed_windows_sink[23]: Writer",
}


# Meters that group by dimensions and count distinct values: the group-by key and the distinct values come from the source.
GROUPING_METERS = (
    "meters:\n  - name: tokens\n    group_by: [region, model]\n"
    "  - name: users\n    aggregation: UNIQUE_COUNT\n    unique_dimension: user\n"
)


@pytest.mark.parametrize("meters", ["", GROUPING_METERS], ids=["default-meters", "grouping-meters"])
def test_the_sql_graphs_stateful_operators_keep_their_uids(write_config, meters):
    """A savepoint of the default graph restores across releases only if these uids name the same operators.

    A change here is a plan change for every deployment (docs/operations.md, Upgrades): make it on purpose.
    """
    cfg = load_config(
        write_config(f"kafka:\n  bootstrap_servers: 127.0.0.1:9\n{meters}"),
        environ={"METERFLOW_POSTGRES_PASSWORD": "unused-at-planning"},
    )
    graph = usage_stream_graph(cfg)
    planned = {node.getTransformationUID(): node.getOperatorName() for node in graph.getStreamNodes().toArray()}
    # A job is planned in a process of its own, where the planner numbers its nodes from 1 (the
    # source). The graphs other tests planned in this process moved that JVM-wide counter on by the
    # same amount for every node: number them from 1 again.
    (source_uid,) = [uid for uid, name in planned.items() if name == SQL_GRAPH_STATEFUL_UIDS["1_kafka"]]
    offset = int(source_uid.split("_")[0]) - 1

    def renumbered(uid: str) -> str:
        prefix, _, rest = uid.partition("_")
        return f"{int(prefix) - offset}_{rest}" if prefix.isdigit() else uid

    def renamed(name: str) -> str:
        return re.sub(r"\[(\d+)\]", lambda m: f"[{int(m.group(1)) - offset}]", name)

    uids = {renumbered(uid): renamed(name) for uid, name in planned.items() if not uid.startswith("Sink Committer")}
    uids |= {
        f"Sink Committer: {renumbered(uid[16:])}": renamed(name)
        for uid, name in planned.items()
        if uid.startswith("Sink Committer: ")
    }
    for uid, name in SQL_GRAPH_STATEFUL_UIDS.items():
        assert uids.get(uid) == name, (uid, uids.get(uid))
        if uid.endswith("_sink") or uid.startswith("write-"):
            assert f"Sink Committer: {uid}" in uids, uid
