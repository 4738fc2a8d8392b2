"""Prometheus metrics of the corrections follower (``meterflow corrections apply --follow``).

The follower is the deployment's own process that turns late events into corrections (started by
``meterflow submit`` on the local stack, a service in docker-compose, a Deployment on Kubernetes).
Its metrics say whether it runs and whether a late event could age out of the late topic before it
is applied: ops/alerts.yml reads them (MeterflowCorrectionsStalled,
MeterflowLateEventsNearRetention); the names are in meterflow/metrics_catalog.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from meterflow.config import JobConfig
from meterflow.corrections import Plan, waiting


class FollowerMetrics:
    """The follower's gauges and counters, served over HTTP on ``corrections.metrics_port``."""

    def __init__(self, cfg: JobConfig, topic: str, registry: CollectorRegistry | None = None) -> None:
        self.cfg, self.topic = cfg, topic
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.last_pass = Gauge(
            "meterflow_corrections_last_pass_timestamp_seconds",
            "When the last run of the follower ended without an error (unix s).",
            registry=r,
        )
        self.waiting_events = Gauge(
            "meterflow_corrections_waiting_events",
            "Late events left for a later run: their window had no final row yet.",
            registry=r,
        )
        self.waiting_age = Gauge(
            "meterflow_corrections_waiting_oldest_age_seconds",
            "How long the oldest waiting late event has been in the late topic (0: none waits).",
            registry=r,
        )
        self.retention = Gauge(
            "meterflow_corrections_late_topic_retention_seconds",
            "The late topic's retention.ms, in s (+Inf: unlimited; NaN: not known yet).",
            registry=r,
        )
        self.recorded = Counter("meterflow_corrections_recorded", "Corrections recorded.", registry=r)
        self.retention.set(math.nan)
        self._retention_known = False

    def serve(self, port: int) -> None:
        """Serve ``/metrics`` on ``port`` (a daemon thread: it ends with the follower)."""
        start_http_server(port, registry=self.registry)

    def read_retention(self) -> None:
        """The late topic's retention from the brokers, until known (the topic may not exist yet)."""
        from connectors.kafka_admin import describe_topic_configs

        if self._retention_known:
            return
        value = (
            describe_topic_configs(self.cfg.kafka.bootstrap_servers, {self.topic: ["retention.ms"]})
            .get(self.topic, {})
            .get("retention.ms")
        )
        if value is not None:
            self.retention.set(retention_seconds(value))
            self._retention_known = True

    def observe(self, plans: Iterable[Plan], now: datetime) -> None:
        """After a run that ended without an error; ``now`` naive UTC."""
        plans = list(plans)
        left = waiting(plans, now)
        self.recorded.inc(sum(len(p.corrections) for p in plans))
        self.waiting_events.set(left.events)
        self.waiting_age.set(left.oldest_age_s)
        self.last_pass.set_to_current_time()


def retention_seconds(retention_ms: str) -> float:
    """Kafka's ``retention.ms`` in seconds; -1 (keep forever) is +Inf."""
    ms = int(retention_ms)
    return math.inf if ms < 0 else ms / 1000
