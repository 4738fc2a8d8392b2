"""Metrics wiring as data: the reporter port range, Flink's reporter keys and the Prometheus config."""

from __future__ import annotations

from datetime import timedelta

import pytest

from meterflow.config import load_config
from meterflow.config_values import parse_port_range
from meterflow.errors import ConfigError
from meterflow.local.flink import render_flink_conf
from meterflow.metrics_conf import (
    LOOPBACK_REPORTER_FACTORY,
    flink_reporter_conf,
    local_prometheus_config,
    prometheus_config,
    scrape_targets,
)


@pytest.mark.parametrize(
    ("spec", "ports"),
    [
        ("9249", (9249,)),
        ("9249-9252", (9249, 9250, 9251, 9252)),
        ("9249,9260", (9249, 9260)),
        ("9249-9250, 9260", (9249, 9250, 9260)),
        ("9249-9250,9250", (9249, 9250)),
    ],
)
def test_port_range_parses_like_flink(spec, ports):
    """Single ports, ranges and comma lists (Flink's port-range syntax), in order, each once."""
    assert parse_port_range(spec) == ports


@pytest.mark.parametrize("spec", ["", "abc", "9252-9249", "0", "70000", "9249-", "1000-2000"])
def test_port_range_refuses_malformed_or_huge(spec):
    """A malformed, reversed, out-of-range or oversized range is refused."""
    with pytest.raises(ValueError):
        parse_port_range(spec)


def test_reporter_conf_binds_loopback():
    """Every JobManager and TaskManager gets the loopback reporter on 127.0.0.1 and the configured ports."""
    conf = flink_reporter_conf("9249-9252")
    assert conf == {
        "metrics.reporter.prom.factory.class": LOOPBACK_REPORTER_FACTORY,
        "metrics.reporter.prom.host": "127.0.0.1",
        "metrics.reporter.prom.port": "9249-9252",
    }
    with pytest.raises(ValueError):
        flink_reporter_conf("nope")


def test_reporter_conf_replaces_the_stock_factory_of_the_cluster_config():
    """Rendered over flink-conf's stock reporter, the local cluster's config names the loopback one."""
    base = {
        "metrics": {
            "reporter": {
                "prom": {
                    "factory": {"class": "org.apache.flink.metrics.prometheus.PrometheusReporterFactory"},
                    "port": 9249,
                }
            }
        }
    }
    prom = render_flink_conf(base, flink_reporter_conf("19249,19250"))["metrics"]["reporter"]["prom"]
    assert prom == {"factory": {"class": LOOPBACK_REPORTER_FACTORY}, "port": "19249,19250", "host": "127.0.0.1"}


def test_prometheus_config_scrapes_every_reporter_port():
    """One scrape job over host:port for each port of the range, the rule files, one interval."""
    conf = prometheus_config(scrape_targets("127.0.0.1", (9249, 9250)), timedelta(seconds=5), ["/x/alerts.yml"])
    assert conf["global"] == {"scrape_interval": "5s", "evaluation_interval": "5s", "scrape_timeout": "5s"}
    assert conf["rule_files"] == ["/x/alerts.yml"]
    assert conf["scrape_configs"] == [
        {"job_name": "flink", "static_configs": [{"targets": ["127.0.0.1:9249", "127.0.0.1:9250"]}]}
    ]


def test_local_prometheus_config_follows_the_typed_config(write_config):
    """The stack's Prometheus config comes from stack.flink_metrics_ports and stack.prometheus_scrape_interval."""
    cfg = load_config(
        write_config("stack:\n  flink_metrics_ports: 19249-19250\n  prometheus_scrape_interval: 2s\n"), environ={}
    )
    conf = local_prometheus_config(cfg)
    assert conf["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:19249", "127.0.0.1:19250"]
    assert conf["global"]["scrape_interval"] == "2s"
    assert conf["scrape_configs"][1] == {
        "job_name": "meterflow-corrections",
        "static_configs": [{"targets": ["127.0.0.1:9260"]}],
    }, "the corrections follower"
    assert conf["scrape_configs"][2] == {
        "job_name": "meterflow-serve",
        "static_configs": [{"targets": ["127.0.0.1:8088"]}],
    }, "the HTTP service"
    off = load_config(write_config("corrections:\n  metrics_port: 0\n"), environ={})
    assert [j["job_name"] for j in local_prometheus_config(off)["scrape_configs"]] == ["flink", "meterflow-serve"]


def test_defaults_and_env_override(write_config):
    """Defaults: Prometheus on 9090, reporters on 9249-9252; both overridable from the environment."""
    cfg = load_config(write_config(""), environ={})
    assert (cfg.stack.prometheus_port, cfg.stack.flink_metrics_ports) == (9090, "9249-9252")
    assert (
        load_config(write_config("stack:\n  flink_metrics_ports: 19249\n"), environ={}).stack.flink_metrics_ports
        == "19249"
    )
    cfg = load_config(
        write_config(""),
        environ={"METERFLOW_STACK__PROMETHEUS_PORT": "19090", "METERFLOW_STACK__FLINK_METRICS_PORTS": "19249,19250"},
    )
    assert (cfg.stack.prometheus_port, cfg.stack.flink_metrics_ports) == (19090, "19249,19250")


@pytest.mark.parametrize(
    "stack",
    [
        "  flink_metrics_ports: nine\n",
        "  prometheus_port: 9250\n",  # inside the default reporter range
        "  prometheus_scrape_interval: 500ms\n",
    ],
)
def test_invalid_metrics_settings_are_config_errors(write_config, stack):
    """A malformed range, Prometheus inside the reporter range, or a sub-second scrape interval is refused."""
    with pytest.raises(ConfigError):
        load_config(write_config("stack:\n" + stack), environ={})
