"""The local stack's Prometheus: Debian's ``prometheus`` binary on loopback, scraping the Flink reporters.

Runs from the state directory like the other parts, never as the system service::

    .stack/prometheus/             prometheus.yml, data/, prometheus.log, prometheus.pid

It loads the alert rules of ``ops/alerts.yml`` and scrapes every port of
``stack.flink_metrics_ports``, where the JobManager and TaskManagers serve their metrics.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from meterflow.config import JobConfig
from meterflow.errors import StackError
from meterflow.local.base import REPO_ROOT, ComponentStatus, pid_alive, port_open, require_free, stop_pid, wait_until
from meterflow.metrics_conf import LOOPBACK, local_prometheus_config

ALERT_RULES = REPO_ROOT / "ops" / "alerts.yml"
PROMETHEUS_BINARY = "prometheus"


def prometheus_binary() -> Path:
    """Debian's Prometheus server binary."""
    found = shutil.which(PROMETHEUS_BINARY) or shutil.which(PROMETHEUS_BINARY, path="/usr/bin:/usr/sbin")
    if not found:
        msg = "Prometheus not installed: run scripts/setup.sh (apt-get install prometheus)"
        raise StackError(msg)
    return Path(found)


class PrometheusServer:
    """Prometheus on 127.0.0.1:``stack.prometheus_port`` with its config and data in the state directory."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.state_dir / "prometheus"
        self.port = cfg.stack.prometheus_port
        self.config_file = self.dir / "prometheus.yml"
        self.pid_file = self.dir / "prometheus.pid"
        self.log = self.dir / "prometheus.log"

    @property
    def url(self) -> str:
        """Base URL of the web UI and HTTP API."""
        return f"http://{LOOPBACK}:{self.port}"

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    def ready(self) -> bool:
        """Prometheus answers ``/-/ready`` (config and rules loaded, TSDB open)."""
        return self._get("/-/ready")[0] == 200

    def running(self) -> bool:
        """Our process is alive and its port answers."""
        return pid_alive(self.pid_file) is not None and port_open(LOOPBACK, self.port)

    def write_config(self) -> None:
        """prometheus.yml from the typed config (meterflow.metrics_conf)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = local_prometheus_config(self.cfg, [str(ALERT_RULES)])
        self.config_file.write_text(yaml.safe_dump(conf, sort_keys=False))

    def up(self) -> None:
        """Write the config, start Prometheus on loopback and wait until it is ready."""
        if self.running():
            return
        require_free(LOOPBACK, self.port, "Prometheus", "stack.prometheus_port")
        binary = prometheus_binary()
        self.write_config()
        args = [
            str(binary),
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--storage.tsdb.retention.time=7d",
        ]
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.dir,
            )
        self.pid_file.write_text(str(proc.pid))
        wait_until(lambda: self.ready() or proc.poll() is not None, "Prometheus", 60, self.log)
        if proc.poll() is not None:
            msg = f"Prometheus exited with code {proc.returncode}; see {self.log}"
            raise StackError(msg)

    def down(self) -> None:
        """Stop Prometheus (SIGTERM; it flushes its head block)."""
        stop_pid(self.pid_file, "Prometheus", timeout=20)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query through ``/api/v1/query``: the result vector (``metric`` labels and ``value``)."""
        status, body = self._get(f"/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {}
        if status != 200 or doc.get("status") != "success":
            msg = f"Prometheus query {promql!r} failed ({status}): {doc.get('error') or body[:300]!r}"
            raise StackError(msg)
        return doc["data"]["result"]

    def status(self) -> ComponentStatus:
        """Running state and address."""
        return ComponentStatus(
            "prometheus", self.running(), self.url, f"scrapes Flink on {LOOPBACK}:{self.cfg.stack.flink_metrics_ports}"
        )
