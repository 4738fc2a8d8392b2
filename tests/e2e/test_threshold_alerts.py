"""Threshold alerts on the real stack, over HTTP only: a rule on final usage per billing period,
events posted to ``meterflow serve`` (duplicates and a malformed one among them), the TaskManager
killed with windows in flight and replaced, and a webhook receiver that fails twice.

The crossing is recorded once and delivered once: the receiver gets the same ``webhook-id`` three
times (two refused, then taken), verifies each signature with the secret ``meterflow alerts
endpoint`` printed, and nothing else arrives; a rule that is not crossed sends nothing. The ledger
says sent after three attempts. A webhook that failed every attempt is dead and ``meterflow
alerts replay`` delivers it again, with its original id.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner
from standardwebhooks.webhooks import Webhook

from meterflow.commands import cli
from meterflow.local import flink_jobs
from tests.e2e.helpers import (
    CLOSER_TENANT,
    kill_taskmanagers,
    private_job,
    replaced_after,
    replacements_so_far,
    serve_process,
    wait_for,
    wait_restarted,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class Receiver:
    """A webhook receiver on loopback: answers each request with the next status of ``answers`` (then 200)."""

    def __init__(self, answers: list[int]) -> None:
        self.answers = answers
        self.received: list[tuple[int, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                status = receiver.answers.pop(0) if receiver.answers else 200
                receiver.received.append((status, dict(self.headers.items()), body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/meterflow"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def _cli(path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--config", str(path), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def _ledger(path) -> list[dict]:
    result = CliRunner().invoke(
        cli, ["--config", str(path), "alerts", "list", "--format", "json"], catch_exceptions=False
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def _post(port: int, key: str, events: list[dict]) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/events",
        data=json.dumps({"events": events}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 202
        return json.loads(answer.read())


def _event(event_id: str, customer: str, quantity: str, at: datetime, tenant: str = "tenant-a") -> dict:
    return {
        "event_id": event_id,
        "tenant_id": tenant,
        "customer_id": customer,
        "meter": "api_calls",
        "quantity": quantity,
        "event_time": at.isoformat(),
    }


def test_a_crossing_is_delivered_once_across_a_taskmanager_kill_and_a_failing_receiver(e2e_stack, tmp_path):
    alerts = {"interval": "1s", "retry_base": "1s", "max_attempts": 3, "lookback": "1h"}
    cfg, path = private_job(e2e_stack, "alerts", alerts=alerts)
    receiver = Receiver([500, 503])
    key = _cli(path, "api-keys", "create", "tenant-a")
    closer_key = _cli(path, "api-keys", "create", CLOSER_TENANT)
    _cli(
        path,
        "alerts",
        "rules",
        "add",
        "tenant-a",
        "big",
        "--meter",
        "api_calls",
        "--threshold",
        "100",
        "--basis",
        "final",
    )
    _cli(path, "alerts", "rules", "add", "tenant-a", "huge", "--meter", "api_calls", "--threshold", "100000")
    secret = _cli(path, "alerts", "endpoint", "tenant-a", receiver.url)
    assert secret.startswith("whsec_")
    start = (datetime.now(UTC) - timedelta(minutes=20)).replace(second=0, microsecond=0)
    # 30 events of 5 over a few windows: 150, the threshold crossed within the third window's events.
    events = [_event(f"e{i}", "cust-1", "5", start + timedelta(seconds=3 * i)) for i in range(30)]
    job_id = flink_jobs.submit(cfg, path)
    try:
        with serve_process(path, tmp_path / "serve.log") as port:
            first = _post(port, key, [*events[:15], events[3], {**events[4], "quantity": "five"}])
            assert (first["accepted"], first["duplicates"], first["rejected"]) == (15, 1, 1)
            before = replacements_so_far(cfg)
            killed_at = kill_taskmanagers(cfg)  # windows of the first half in flight
            assert _post(port, key, [*events[15:], events[0]])["accepted"] == 16  # a retried one among them
            replaced_after(cfg, before, killed_at)
            wait_restarted(cfg, job_id, killed_at)
            closers = [
                _event(f"closer-{c}", c, "1", min(start + timedelta(hours=1), datetime.now(UTC)), CLOSER_TENANT)
                for c in ("p0", "p1", "p2", "p3", "p4", "p5")
            ]
            _post(port, closer_key, closers)

            def delivered() -> list:
                return [r for r in receiver.received if r[0] == 200]

            wait_for(lambda: delivered(), 240, "the webhook to be delivered")
            time.sleep(5)  # more passes: nothing else may arrive
            assert [status for status, _, _ in receiver.received] == [500, 503, 200]
            ids = {headers["webhook-id"] for _, headers, _ in receiver.received}
            assert len(ids) == 1
            for _, headers, body in receiver.received:
                payload = Webhook(secret).verify(body, headers)
                assert payload["type"] == "usage.threshold.crossed"
            data = payload["data"]
            assert (data["rule_id"], data["customer_id"], data["basis"], data["threshold"]) == (
                "big",
                "cust-1",
                "final",
                "100",
            )
            assert 100 <= Decimal(data["total"]) <= 150
            with pytest.raises(Exception, match="signature"):
                Webhook("whsec_" + "A" * 43).verify(body, headers)

            assert [(r["rule_id"], r["status"], r["attempts"]) for r in _ledger(path)] == [("big", "sent", 3)]

            # A receiver that refuses every attempt: the webhook is dead; a replay delivers it, with its id.
            receiver.answers = [500, 500, 500]
            _cli(
                path,
                "alerts",
                "rules",
                "add",
                "tenant-a",
                "small",
                "--meter",
                "api_calls",
                "--threshold",
                "1",
                "--period",
                "day",
            )

            def small() -> list[dict]:
                return [r for r in _ledger(path) if r["rule_id"] == "small"]

            wait_for(lambda: [r["status"] for r in small()] == ["dead"], 120, "the refused webhook to be dead")
            _cli(path, "alerts", "replay")
            wait_for(lambda: [r["status"] for r in small()] == ["sent"], 60, "the replayed webhook to be delivered")
            [crossing] = small()
            assert [s for s, h, _ in receiver.received if h["webhook-id"] == crossing["crossing_id"]] == [
                500,
                500,
                500,
                200,
            ]
    finally:
        flink_jobs.cancel(cfg, job_id)
        receiver.close()
