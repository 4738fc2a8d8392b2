"""The usage job's own graph, declared in the local environment for graph tests."""

from __future__ import annotations

from typing import Any

from meterflow.config import JobConfig


def declared_usage_job(cfg: JobConfig) -> tuple[Any, Any]:
    """The (StreamExecutionEnvironment, StreamTableEnvironment) of ``jobs/usage_job.py`` for ``cfg``, declared, not run."""
    from jobs.usage_job import build_environment, declare_pipeline
    from meterflow.local.flink import FLINK_CONNECTOR_JARS, JVM_JAR_DIR

    jars = [*sorted(JVM_JAR_DIR.glob("*.jar")), *sorted(FLINK_CONNECTOR_JARS.glob("*.jar"))]
    env, t_env = build_environment(cfg, {"pipeline.jars": ";".join(p.as_uri() for p in jars)})
    declare_pipeline(t_env, cfg).attach_as_datastream()
    return env, t_env


def usage_stream_graph(cfg: JobConfig) -> Any:
    """The StreamGraph ``jobs/usage_job.py`` submits for ``cfg`` (a Java object), without running it."""
    env, _ = declared_usage_job(cfg)
    return env._j_stream_execution_environment.getStreamGraph(False)
