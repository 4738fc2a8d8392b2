"""HTTP ingest and the usage API on the real stack: ``meterflow serve`` as its own process, keys
made with ``meterflow api-keys``, events posted over HTTP into the topic the usage job reads, and
the usage job's totals in Postgres exactly those of the accepted events, each counted once though
a batch was sent twice (a client's retry) and repeated an id within itself. The usage API then
answers, over HTTP only, exactly the Postgres rows and the oracle: per window, and per billing
period for a customer on an anniversary cycle whose period spans a month boundary; provisional
while the windows are open to late events, final (a newer revision) once the job closed them;
and nothing of a customer for another tenant's key."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner
from kafka.partitioner.default import murmur2

from connectors.avro_codec import UsageEvent
from meterflow.commands import cli
from meterflow.local import flink_jobs
from tests.e2e.helpers import CLOSER_TENANT, expected_totals, private_job, serve_process, table_totals, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _key(path, tenant: str) -> str:
    result = CliRunner().invoke(cli, ["--config", str(path), "api-keys", "create", tenant], catch_exceptions=False)
    return result.stdout.strip().splitlines()[-1]


def _get(port: int, key: str, path: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(port: int, key: str, body: object) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/events",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def service(e2e_stack, tmp_path):
    """The usage job's config, and ``meterflow serve`` on it on a free loopback port."""
    # Windows stay open to late events for 10 minutes of event time: provisional until a later closer.
    event_time = {**e2e_stack.base["event_time"], "source_idle_timeout": "30s", "allowed_lateness": "10m"}
    cfg, path = private_job(e2e_stack, "ingest", event_time=event_time)
    with serve_process(path, tmp_path / "serve.log") as port:
        yield cfg, path, port


def _event(event_id: str, tenant: str, customer: str, meter: str, quantity: str, at: datetime) -> dict:
    return {
        "event_id": event_id,
        "tenant_id": tenant,
        "customer_id": customer,
        "meter": meter,
        "quantity": quantity,
        "event_time": at.isoformat(),
    }


def _closers(partitions: int, at: datetime, tag: str = "") -> list[dict]:
    """One event per partition, after the data: the customers are chosen so the service's key (tenant/customer) lands on each."""
    chosen: dict[int, str] = {}
    n = 0
    while len(chosen) < partitions:
        customer = f"p{n}"
        partition = (murmur2(f"{CLOSER_TENANT}/{customer}".encode()) & 0x7FFFFFFF) % partitions
        chosen.setdefault(partition, customer)
        n += 1
    return [_event(f"closer{tag}-{c}", CLOSER_TENANT, c, "api_calls", "1", at) for c in chosen.values()]


def test_events_posted_over_http_are_counted_once_each_and_only_the_keys_tenants(service):
    cfg, path, port = service
    key_a, key_b, key_closer = _key(path, "tenant-a"), _key(path, "tenant-b"), _key(path, CLOSER_TENANT)
    start = (datetime.now(UTC) - timedelta(minutes=30)).replace(second=0, microsecond=0)
    good = [
        _event(
            f"a-{i}",
            "tenant-a",
            f"cust-{i % 3}",
            ("api_calls", "tokens")[i % 2],
            f"{i}.25",
            start + timedelta(seconds=7 * i),
        )
        for i in range(40)
    ]
    batch = [
        *good,
        good[3],  # the same id again in the request
        {**good[4], "event_id": "a-float", "quantity": 1.5},  # a JSON float: inexact
        {**good[5], "event_id": "a-other", "tenant_id": "tenant-b"},  # not this key's tenant
    ]
    job_id = flink_jobs.submit(cfg, path)
    try:
        status, answer = _post(port, key_a, {"events": batch})
        assert status == 202, answer
        assert (answer["accepted"], answer["duplicates"], answer["rejected"]) == (40, 1, 2)
        assert [r["status"] for r in answer["results"][40:]] == ["duplicate", "rejected", "rejected"]
        assert answer["results"][42]["reason"] == "tenant_id is not the tenant of this API key"
        # The client did not see the answer and sends the batch again: accepted again, counted once.
        assert _post(port, key_a, {"events": batch})[0] == 202
        # Tenant b's key cannot write tenant a's events; no key, no entry.
        status, answer = _post(port, key_b, {"events": good[:2]})
        assert status == 202 and answer["rejected"] == 2 and answer["accepted"] == 0
        assert _post(port, "mf_not-a-key", good[0])[0] == 401

        # cust-0 is billed on the 15th of each month in Auckland: its period spans a month boundary.
        cycle = CliRunner().invoke(
            cli,
            [
                "--config",
                str(path),
                "cycles",
                "set",
                "tenant-a",
                "cust-0",
                "--anchor-day",
                "15",
                "--timezone",
                "Pacific/Auckland",
            ],
            catch_exceptions=False,
        )
        assert cycle.exit_code == 0, cycle.output

        # Closers past every window's end, not past its lateness: the windows fire, provisional.
        closers = _closers(cfg.kafka.partitions, start + timedelta(minutes=10), "-open")
        status, answer = _post(port, key_closer, {"events": closers})
        assert status == 202 and answer["accepted"] == len(closers)

        expected = expected_totals(
            [
                UsageEvent(
                    event_id=e["event_id"],
                    tenant_id=e["tenant_id"],
                    customer_id=e["customer_id"],
                    meter=e["meter"],
                    quantity=Decimal(e["quantity"]),
                    event_time=datetime.fromisoformat(e["event_time"]),
                    dimensions={},
                )
                for e in good
            ],
            cfg.event_time.window_size,
        )

        def totals() -> dict:
            return {k: (r.quantity, r.event_count) for k, r in table_totals(cfg).items()}

        wait_for(lambda: totals() == expected, 240, "the usage job's totals of the events posted")
        time.sleep(2)
        assert totals() == expected
        assert not any(r.is_final for r in table_totals(cfg).values())
        span = f"from={start.isoformat()}&to={(start + timedelta(minutes=10)).isoformat()}".replace("+", "%2B")

        def served_windows(status: str) -> dict:
            """Every window of tenant a as the usage API serves it, checked to carry ``status``."""
            served = {}
            for customer in ("cust-0", "cust-1", "cust-2"):
                code, body = _get(port, key_a, f"/v1/customers/{customer}/usage?granularity=window&{span}")
                assert code == 200, body
                for w in body["usage"]:
                    assert w["status"] == status, w
                    key = ("tenant-a", customer, w["meter"], datetime.fromisoformat(w["start"]).replace(tzinfo=None))
                    served[key] = (Decimal(w["quantity"]), w["event_count"])
            return served

        rows = {k: (r.quantity, r.event_count) for k, r in table_totals(cfg).items()}
        assert served_windows("provisional") == expected == rows

        def period() -> dict:
            code, body = _get(port, key_a, f"/v1/customers/cust-0/usage?granularity=period&{span.split('&')[0]}")
            assert code == 200, body
            return body

        provisional = period()
        opens, ends = (datetime.fromisoformat(provisional[k]) for k in ("from", "to"))
        assert provisional["cycle"] == {"anchor": "anniversary", "anchor_day": 15, "timezone": "Pacific/Auckland"}
        assert opens.month != ends.month and opens.hour in (11, 12)  # local midnight of the 15th in Auckland
        cust0 = {k: v for k, v in expected.items() if k[1] == "cust-0"}
        for meter in ("api_calls", "tokens"):
            [row] = [u for u in provisional["usage"] if u["meter"] == meter]
            want = [v for k, v in cust0.items() if k[2] == meter]
            assert (Decimal(row["quantity"]), row["event_count"]) == (sum(q for q, _ in want), sum(n for _, n in want))
            assert row["status"] == "provisional"

        # Tenant b's key reads nothing of tenant a's customer.
        assert _get(port, key_b, "/v1/customers/cust-0/usage")[0] == 404

        # Closers past the lateness too: the windows are final, and so is each window served.
        closers = _closers(cfg.kafka.partitions, min(start + timedelta(hours=1), datetime.now(UTC)), "-close")
        status, answer = _post(port, key_closer, {"events": closers})
        assert status == 202 and answer["accepted"] == len(closers)
        wait_for(lambda: all(r.is_final for r in table_totals(cfg).values()), 240, "the windows to close")
        assert served_windows("final") == expected
        final = period()
        for meter in ("api_calls", "tokens"):
            before = next(u for u in provisional["usage"] if u["meter"] == meter)
            after = next(u for u in final["usage"] if u["meter"] == meter)
            # Its windows are final now (a newer revision), the period itself is open until its end.
            assert after["quantity"] == before["quantity"] and after["revision"] > before["revision"]
            assert after["status"] == "provisional"
    finally:
        flink_jobs.cancel(cfg, job_id)
