"""The README's first command's demo on the session stack: ``meterflow demo`` as its own process on
a config of its own. It counts its sample in Postgres exactly, and shows the usage API (a curl of
the usage endpoint, whose period totals it checks against Postgres) and the usage page of
``meterflow serve``, which ``stack up`` started and Prometheus scrapes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meterflow.local import flink_jobs
from meterflow.local.corrections_follower import CorrectionsFollower
from meterflow.local.http_service import HttpService
from meterflow.local.prometheus import PrometheusServer
from tests.e2e.helpers import private_job, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_demo_counts_its_sample_and_serves_it_over_http(e2e_stack):
    cfg, path = private_job(e2e_stack, "demo")
    try:
        done = subprocess.run(
            [sys.executable, "-c", "from meterflow.commands import main; main()", "--config", str(path)]
            + ["demo", "--count", "400", "--timeout", "240"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        said = done.stdout + done.stderr
        assert done.returncode == 0, said
        assert "all final, match the totals computed from the 400 produced events" in said
        assert f"curl -s -H @{cfg.state_dir / 'serve'}" in said
        assert "The period totals served equal the customer's rows in Postgres." in said
        assert "/usage/" in said and "#key=" in said
        assert "Bearer mf_" not in said  # the key is in the header file, not on the screen

        # Prometheus scrapes the service `stack up` started: the demo's usage request is counted there.
        prom = PrometheusServer(cfg)

        def served() -> float:
            found = prom.query('sum(meterflow_usage_requests_total{job="meterflow-serve",code="200"})')
            return float(found[0]["value"][1]) if found else 0.0

        wait_for(lambda: served() >= 1, 60, "Prometheus to scrape the service's usage requests")
        assert prom.query('up{job="meterflow-serve"} == 1')
    finally:
        for name in flink_jobs.job_names(cfg):
            for job in flink_jobs.running_jobs(cfg, name):
                flink_jobs.cancel(cfg, job["jid"])
        CorrectionsFollower(cfg, path).stop()  # the demo's submit started it
        HttpService(cfg, path).down()
