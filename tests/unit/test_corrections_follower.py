"""The corrections follower's metrics: what waits, for how long, and the names the alerts read."""

from __future__ import annotations

import math
import socket
import urllib.request
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

from prometheus_client import CollectorRegistry

from meterflow.commands.corrections_metrics import FollowerMetrics, retention_seconds
from meterflow.corrections import WindowState, plan_corrections, waiting
from meterflow.metrics_catalog import CORRECTIONS_METRICS
from tests.unit.test_corrections import NOW, W, _cfg, _ev, _w


def test_waiting_counts_the_deferred_events_and_ages_the_oldest():
    """Events of a window without a final row wait; the oldest's age runs from when the job routed it late."""
    now = NOW.replace(tzinfo=None)
    old, new = replace(_ev("a", "1"), seen_at=now - timedelta(hours=30)), replace(_ev("b", "1"), seen_at=now - timedelta(minutes=5))
    final = _ev("c", "2", _w("calls"))
    plan = plan_corrections([old, new, final], set(), {W: WindowState(None, row_final=False), _w("calls"): WindowState(Decimal(3), row_final=True)}, _cfg(), NOW)
    left = waiting([plan], now)
    assert (left.events, left.oldest_age_s) == (2, 30 * 3600.0)
    assert waiting([plan_corrections([final], set(), {_w("calls"): WindowState(Decimal(3), row_final=True)}, _cfg(), NOW)], now).oldest_age_s == 0.0


def _scrape(registry: CollectorRegistry) -> dict[str, float]:
    return {s.name: s.value for m in registry.collect() for s in m.samples if not s.name.endswith("_created")}


def test_follower_metrics_are_the_catalogs_and_follow_each_run():
    registry = CollectorRegistry()
    metrics = FollowerMetrics(_cfg(), "late", registry)
    assert set(_scrape(registry)) == CORRECTIONS_METRICS, "the names ops/alerts.yml may read"
    assert math.isnan(_scrape(registry)["meterflow_corrections_late_topic_retention_seconds"]), "not known before the topic is read"
    now = NOW.replace(tzinfo=None)
    waiting_event = replace(_ev("a", "1"), seen_at=now - timedelta(minutes=10))
    plan = plan_corrections([waiting_event, _ev("c", "2", _w("calls"))], set(), {W: WindowState(None, row_final=False), _w("calls"): WindowState(Decimal(3), row_final=True)}, _cfg(), NOW)
    metrics.observe([plan], now)
    got = _scrape(registry)
    assert (got["meterflow_corrections_waiting_events"], got["meterflow_corrections_waiting_oldest_age_seconds"], got["meterflow_corrections_recorded_total"]) == (1, 600.0, 1)
    assert got["meterflow_corrections_last_pass_timestamp_seconds"] > 0


def test_follower_serves_its_metrics_over_http():
    registry = CollectorRegistry()
    metrics = FollowerMetrics(_cfg(), "late", registry)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics.serve(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "meterflow_corrections_waiting_events 0.0" in body


def test_retention_seconds():
    assert retention_seconds("604800000") == 604800.0 and retention_seconds("-1") == math.inf
