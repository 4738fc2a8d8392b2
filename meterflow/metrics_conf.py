"""Metrics wiring of the local stack as plain data: Flink's Prometheus reporter keys and Prometheus' config.

Pure: no process, file or network access, so the shape of both configs is unit-tested.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from meterflow.config import JobConfig
from meterflow.config_values import format_duration, parse_port_range

LOOPBACK = "127.0.0.1"
# jvm/ LoopbackPrometheusReporterFactory: Flink's Prometheus reporter bound to one address (the stock
# factory, org.apache.flink.metrics.prometheus.PrometheusReporterFactory, binds every interface).
LOOPBACK_REPORTER_FACTORY = "dev.meterflow.metrics.LoopbackPrometheusReporterFactory"
REPORTER_NAME = "prom"
FLINK_SCRAPE_JOB = "flink"
# The corrections follower (`corrections apply --follow`, meterflow/commands/corrections_metrics.py).
CORRECTIONS_SCRAPE_JOB = "meterflow-corrections"
# The HTTP service (`meterflow serve`, GET /metrics).
SERVE_SCRAPE_JOB = "meterflow-serve"


def flink_reporter_conf(ports: str, host: str = LOOPBACK, factory: str = LOOPBACK_REPORTER_FACTORY) -> dict[str, str]:
    """Dotted Flink config keys that give every JobManager and TaskManager a Prometheus endpoint on host:port.

    Each process takes the first free port of ``ports`` (a Flink port range), so one range serves
    the JobManager, the TaskManager and a replacement TaskManager.
    """
    parse_port_range(ports)  # refuse a malformed range here, not in a JVM's log
    prefix = f"metrics.reporter.{REPORTER_NAME}"
    return {f"{prefix}.factory.class": factory, f"{prefix}.host": host, f"{prefix}.port": ports}


def scrape_targets(host: str, ports: Sequence[int]) -> list[str]:
    """``host:port`` for every port of the reporter range (ports no process holds are down targets)."""
    return [f"{host}:{port}" for port in ports]


def prometheus_config(
    targets: Sequence[str],
    scrape_interval: timedelta,
    rule_files: Sequence[str] = (),
    corrections_targets: Sequence[str] = (),
    serve_targets: Sequence[str] = (),
) -> dict[str, Any]:
    """Prometheus' configuration: a scrape job over the Flink reporter endpoints, one over the
    corrections follower's (when it serves any), one over the HTTP service's, and the alert rule files."""
    interval = format_duration(scrape_interval)
    jobs = [{"job_name": FLINK_SCRAPE_JOB, "static_configs": [{"targets": list(targets)}]}]
    if corrections_targets:
        jobs.append({"job_name": CORRECTIONS_SCRAPE_JOB, "static_configs": [{"targets": list(corrections_targets)}]})
    if serve_targets:
        jobs.append({"job_name": SERVE_SCRAPE_JOB, "static_configs": [{"targets": list(serve_targets)}]})
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "rule_files": list(rule_files),
        "scrape_configs": jobs,
    }


def local_prometheus_config(cfg: JobConfig, rule_files: Sequence[str] = ()) -> dict[str, Any]:
    """The local stack's Prometheus config: every port of ``stack.flink_metrics_ports`` on loopback, the
    corrections follower's and the HTTP service's (``serve.host:serve.port``)."""
    s = cfg.stack
    follower = [f"{LOOPBACK}:{cfg.corrections.metrics_port}"] if cfg.corrections.metrics_port else []
    return prometheus_config(
        scrape_targets(LOOPBACK, parse_port_range(s.flink_metrics_ports)),
        s.prometheus_scrape_interval,
        rule_files,
        follower,
        [f"{cfg.serve.host}:{cfg.serve.port}"],
    )
