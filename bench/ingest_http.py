"""HTTP ingest end to end: events/s accepted by ``POST /v1/events`` and counted in Postgres, request
latency, and the delay of threshold-alert webhooks from the window that crossed the threshold.

What it does, in order:

1. Starts a private stack (Kafka, Postgres, a Flink cluster; free ports, a temporary state
   directory, bench/private_stack.py). For each batch size (``--batches``, default 100 and 1,000
   events per request) a job config of its own (topics, usage table, alert tables, consumer group),
   the usage job submitted with the shipped defaults (1-minute windows, watermark delay 5 s,
   checkpoint interval 5 s, parallelism 1, RocksDB), and ``meterflow serve`` started on it as its own
   process with default settings (one uvicorn worker, alerts evaluated every 2 s).
2. Makes one API key per tenant (``meterflow api-keys create``) and points each tenant's webhook
   endpoint (``meterflow alerts endpoint``) at a receiver on loopback (an http.server thread in this
   process) that records each webhook's arrival time.
3. Runs ``--clients`` closed-loop clients (asyncio + httpx, in this process), each posting batches
   of one tenant's events: ``--tenants`` tenants of ``--customers`` customers each (customers weighted
   1 to 4, so they reach a threshold at different times), meters ``api_calls`` (quantity 1) and
   ``tokens`` (1 to 2,000), unique event ids, event times the moment the batch is built. After
   ``--warmup`` seconds a rule ``--basis final`` on ``api_calls`` per billing period is added for
   every tenant, its threshold half of what an average customer sends in the whole run (from the
   warm-up's rate), so the heavier customers cross it in windows that close while the load runs.
   Requests started in the next ``--seconds`` are timed client-side; any answer but 202 is an error.
4. Sends one closing event per Kafka partition, dated past the last window's end plus the
   watermark delay (ahead of now by at most a window and the delay, within
   ``event_time.max_event_ahead``), and polls Postgres until the sum of ``event_count`` of the run's
   tenants equals the events accepted.
5. Reads the alert ledger and the usage rows: for each crossing, the usage row whose commit made
   the customer's final total reach the threshold (rows in commit order, ``updated_at``; Postgres
   sets it to ``now()``, the start of the job's transaction), the ledger's ``crossed_at`` and the
   webhook's arrival at the receiver.

End to end: all events accepted (warm-up included) over the time from the first request to the
moment Postgres held all of them. Accepted over HTTP: events of the requests started within the
measured interval over that interval. CPU seconds over the measured interval are recorded for the
service, the Flink JobManager and TaskManager, Kafka, Postgres, this process (the clients and the
receiver) and the whole machine; the rest is other processes sharing the machine. Results go to
``bench/results_ingest_http.json``; a markdown table is printed.

    .venv/bin/python -m bench.ingest_http [--batches 100 1000] [--clients 16] [--warmup 15] [--seconds 75]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner
from kafka.partitioner.default import murmur2

from bench.machine import machine_info
from bench.private_stack import BenchStack, private_stack
from bench.procstat import TreeMeter, read_pid
from bench.stats import percentile
from meterflow.commands import cli
from meterflow.config import JobConfig
from meterflow.local import flink_jobs
from meterflow.local.flink import FlinkCluster
from sinks.postgres import connect
from tests.e2e.helpers import CLOSER_TENANT, free_port, wait_for

RESULTS = Path(__file__).resolve().parent / "results_ingest_http.json"
RULE_METER = "api_calls"


class Receiver:
    """A webhook receiver on loopback: answers 200 and records (arrival epoch s, webhook-id)."""

    def __init__(self) -> None:
        self.received: list[tuple[float, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                arrived = time.time()
                self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append((arrived, self.headers.get("webhook-id", "")))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/meterflow"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def meterflow_cli(path: Path, *args: str) -> str:
    """Run a ``meterflow`` command on the config at ``path``; its last line of output."""
    result = CliRunner().invoke(cli, ["--config", str(path), *args], catch_exceptions=False)
    if result.exit_code != 0:
        msg = f"meterflow {' '.join(args)}: {result.output}"
        raise RuntimeError(msg)
    out = result.stdout.strip()
    return out.splitlines()[-1] if out else ""


@contextmanager
def serve_process(config_path: Path, log_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """``meterflow serve`` on ``config_path`` as its own process on a free loopback port."""
    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from meterflow.commands import main; main()", "--config", str(config_path)]
            + ["serve", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(healthy, 60, "meterflow serve to answer")
            yield port, proc
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def machine_cpu_s() -> float:
    """CPU seconds the whole machine spent busy (all but idle and iowait), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    ticks = sum(fields[:8]) - fields[3] - fields[4]
    return ticks / 100


@dataclass
class Load:
    """What the clients of one run share, and what they recorded."""

    port: int
    keys: dict[str, str]
    customers: dict[str, list[str]]
    weights: list[float]
    batch: int
    label: str
    measure: tuple[float, float] = (0.0, 0.0)
    stop_at: float = 0.0
    first_request_wall: float = 0.0
    last_answer_wall: float = 0.0
    accepted: int = 0
    failed_events: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    # (started, latency s, status, accepted) of every request
    samples: list[tuple[float, float, int, int]] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)


def batch_body(load: Load, tenant: str, client: int, seq: int) -> bytes:
    at = datetime.now(UTC).isoformat(timespec="milliseconds")
    customers = random.choices(load.customers[tenant], weights=load.weights, k=load.batch)
    events = []
    for i, customer in enumerate(customers):
        tokens = random.random() < 0.5
        events.append(
            {
                "event_id": f"{load.label}-{client}-{seq}-{i}",
                "tenant_id": tenant,
                "customer_id": customer,
                "meter": "tokens" if tokens else RULE_METER,
                "quantity": str(random.randint(1, 2000)) if tokens else "1",
                "event_time": at,
            }
        )
    return json.dumps({"events": events}, separators=(",", ":")).encode()


async def client_loop(load: Load, http: httpx.AsyncClient, client: int) -> None:
    tenants = sorted(load.keys)
    seq = 0
    while time.monotonic() < load.stop_at:
        tenant = tenants[(client + seq) % len(tenants)]
        body = batch_body(load, tenant, client, seq)
        seq += 1
        headers = {"Authorization": f"Bearer {load.keys[tenant]}", "Content-Type": "application/json"}
        started = time.monotonic()
        if not load.first_request_wall:
            load.first_request_wall = time.time()
        try:
            answer = await http.post(f"http://127.0.0.1:{load.port}/v1/events", content=body, headers=headers)
        except httpx.HTTPError as e:
            load.transport_errors.append(f"{type(e).__name__}: {e}")
            continue
        latency = time.monotonic() - started
        load.last_answer_wall = time.time()
        load.statuses[answer.status_code] = load.statuses.get(answer.status_code, 0) + 1
        accepted = 0
        if answer.status_code in (202, 503):
            # A 503's accepted events were acknowledged by Kafka too: the job counts them.
            result = answer.json()
            accepted = int(result["accepted"])
            load.failed_events += int(result.get("failed", 0))
        load.accepted += accepted
        load.samples.append((started, latency, answer.status_code, accepted))
        if answer.status_code in (429, 503):
            await asyncio.sleep(float(answer.headers.get("retry-after", "1")))


def final_totals(cfg: JobConfig, tenants: list[str]) -> dict[str, float]:
    """The largest final api_calls total of any customer per billing period (the current month) so far."""
    with connect(cfg.postgres) as conn:
        row = conn.execute(
            f"SELECT coalesce(max(s), 0) FROM (SELECT sum(quantity) s FROM {cfg.postgres.usage_table} "
            "WHERE is_final AND meter = %s AND tenant_id = ANY(%s) GROUP BY tenant_id, customer_id) t",
            (RULE_METER, tenants),
        ).fetchone()
    return {"max_final": float(row[0]) if row else 0.0}


async def add_rules(load: Load, path: Path, cfg: JobConfig, planned_s: float, after_s: float) -> dict[str, Any]:
    """After ``after_s`` of load: a final-basis rule per tenant, at half an average customer's run total."""
    await asyncio.sleep(after_s)
    while not load.accepted:  # the rate needs answers
        await asyncio.sleep(0.5)
    rate = load.accepted / max(load.last_answer_wall - load.first_request_wall, 1e-9)
    n_customers = sum(len(c) for c in load.customers.values())
    average_total = rate * planned_s * 0.5 / n_customers  # half the events are api_calls of quantity 1
    threshold = max(10, int(average_total * 0.5))
    now_final = await asyncio.to_thread(final_totals, cfg, sorted(load.keys))
    threshold = max(threshold, int(now_final["max_final"] * 1.2) + 1)
    added_at = time.time()
    for tenant in sorted(load.keys):
        await asyncio.to_thread(
            meterflow_cli,
            path,
            *("alerts", "rules", "add", tenant, "bench-final", "--meter", RULE_METER),
            *("--threshold", str(threshold), "--basis", "final"),
        )
    return {
        "threshold": threshold,
        "rate_at_warmup": rate,
        "max_final_total_when_added": now_final["max_final"],
        "added_at": added_at,
    }


async def run_load(load: Load, clients: int, warmup: float, seconds: float, path: Path, cfg: JobConfig) -> dict:
    begin = time.monotonic()
    load.measure = (begin + warmup, begin + warmup + seconds)
    load.stop_at = load.measure[1]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        rules = asyncio.create_task(add_rules(load, path, cfg, warmup + seconds, warmup))
        await asyncio.gather(*(client_loop(load, http, c) for c in range(clients)))
        return await rules


def closers(partitions: int, at: datetime, tag: str) -> list[dict[str, str]]:
    """One event per partition: customers chosen so the service's key (tenant/customer) lands on each."""
    chosen: dict[int, str] = {}
    n = 0
    while len(chosen) < partitions:
        customer = f"p{n}"
        chosen.setdefault((murmur2(f"{CLOSER_TENANT}/{customer}".encode()) & 0x7FFFFFFF) % partitions, customer)
        n += 1
    return [
        {
            "event_id": f"closer-{tag}-{c}",
            "tenant_id": CLOSER_TENANT,
            "customer_id": c,
            "meter": RULE_METER,
            "quantity": "1",
            "event_time": at.isoformat(),
        }
        for c in chosen.values()
    ]


def counted(cfg: JobConfig, tenants: list[str]) -> int:
    with connect(cfg.postgres) as conn:
        row = conn.execute(
            f"SELECT coalesce(sum(event_count), 0) FROM {cfg.postgres.usage_table} WHERE tenant_id = ANY(%s)",
            (tenants,),
        ).fetchone()
    return int(row[0]) if row else 0


def pending_crossings(cfg: JobConfig, tenants: list[str]) -> int:
    with connect(cfg.postgres) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {cfg.alerts.crossings_table} WHERE tenant_id = ANY(%s) AND status <> 'sent'",
            (tenants,),
        ).fetchone()
    return int(row[0]) if row else 0


def alert_delays(cfg: JobConfig, tenants: list[str], received: list[tuple[float, str]]) -> dict[str, Any]:
    """Per crossing: the crossing row's commit (updated_at), crossed_at, sent_at and the arrival."""
    arrivals: dict[str, float] = {}
    for at, ident in received:
        arrivals.setdefault(ident, at)
    a = cfg.alerts
    table = cfg.postgres.usage_table
    rows = []
    with connect(cfg.postgres) as conn:
        ledger = conn.execute(
            f"SELECT crossing_id, tenant_id, customer_id, meter, threshold, total, crossed_at, sent_at, attempts, status "
            f"FROM {a.crossings_table} WHERE tenant_id = ANY(%s) ORDER BY crossed_at",
            (tenants,),
        ).fetchall()
        for ident, tenant, customer, meter, threshold, total, crossed_at, sent_at, attempts, status in ledger:
            usage = conn.execute(
                f"SELECT window_start, quantity, updated_at FROM {table} WHERE tenant_id = %s AND customer_id = %s "
                "AND meter = %s AND is_final ORDER BY updated_at, window_start",
                (tenant, customer, meter),
            ).fetchall()
            running, commit = 0, None
            for window_start, quantity, updated_at in usage:
                running += quantity
                if running >= threshold:
                    commit = (window_start, updated_at)
                    break
            crossed = crossed_at.replace(tzinfo=UTC).timestamp()
            arrival = arrivals.get(ident)
            committed = commit[1].timestamp() if commit else None
            rows.append(
                {
                    "crossing_id": ident,
                    "tenant_id": tenant,
                    "customer_id": customer,
                    "total": str(total),
                    "status": status,
                    "attempts": attempts,
                    "window_start": commit[0].isoformat() if commit else None,
                    "row_committed_at": committed,
                    "crossed_at": crossed,
                    "sent_at": sent_at.timestamp() if sent_at else None,
                    "arrived_at": arrival,
                    "commit_to_arrival_s": arrival - committed if arrival and committed else None,
                    "commit_to_crossed_s": crossed - committed if committed else None,
                    "crossed_to_arrival_s": arrival - crossed if arrival else None,
                }
            )

    def summary(key: str) -> dict[str, float | None]:
        values = [r[key] for r in rows if r[key] is not None]
        if not values:
            return {"n": 0, "p50": None, "max": None, "min": None}
        return {"n": len(values), "p50": percentile(values, 50), "max": max(values), "min": min(values)}

    windows = sorted({r["window_start"] for r in rows if r["window_start"]})
    per_window = []
    for w in windows:
        delays = [r["commit_to_arrival_s"] for r in rows if r["window_start"] == w and r["commit_to_arrival_s"]]
        if delays:
            per_window.append(
                {"window_start": w, "crossings": len(delays), "first_s": min(delays), "last_s": max(delays)}
            )
    return {
        "crossings": len(rows),
        "webhooks_received": len(received),
        "distinct_webhooks": len(arrivals),
        "windows_with_crossings": len(windows),
        "per_window": per_window,
        "commit_to_arrival_s": summary("commit_to_arrival_s"),
        "commit_to_crossed_s": summary("commit_to_crossed_s"),
        "crossed_to_arrival_s": summary("crossed_to_arrival_s"),
        "per_crossing": rows,
    }


def run_batch_size(stack: BenchStack, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    from connectors.kafka_admin import ensure_project_topics

    label = f"b{batch}-{uuid.uuid4().hex[:4]}"
    name = f"http-{label}"
    suffix = label.replace("-", "_")
    cfg, path = stack.config(
        name,
        kafka={
            "usage_events_topic": f"bench-in-{label}-{stack.run_id}",
            "late_events_topic": f"bench-late-{label}-{stack.run_id}",
            "dead_letter_topic": f"bench-dead-{label}-{stack.run_id}",
            "closed_windows_topic": f"bench-closed-{label}-{stack.run_id}",
            "consumer_group": f"bench-{label}-{stack.run_id}",
        },
        postgres={"usage_table": f"usage_{suffix}"},
        flink={"job_name": f"bench-http-{label}"},
        alerts={
            "rules_table": f"alert_rules_{suffix}",
            "endpoints_table": f"alert_endpoints_{suffix}",
            "crossings_table": f"alert_crossings_{suffix}",
        },
    )
    ensure_project_topics(cfg)
    tenants = [f"{label}-t{t}" for t in range(args.tenants)]
    customers = {t: [f"c{c:03d}" for c in range(args.customers)] for t in tenants}
    weights = [1 + (c % 10) / 3 for c in range(args.customers)]
    receiver = Receiver()
    print(f"[{label}] batch {batch}: serve, keys, endpoints, job ...", flush=True)
    out: dict[str, Any] = {"batch": batch, "label": label, "clients": args.clients, "tenants": args.tenants}
    out["customers_per_tenant"] = args.customers
    try:
        with serve_process(path, stack.dir / f"serve-{label}.log") as (port, proc):
            keys = {t: meterflow_cli(path, "api-keys", "create", t) for t in tenants}
            closer_key = meterflow_cli(path, "api-keys", "create", CLOSER_TENANT)
            for t in tenants:
                secret = meterflow_cli(path, "alerts", "endpoint", t, receiver.url)
                assert secret.startswith("whsec_"), secret
            job_id = flink_jobs.submit(cfg, path, timeout=240)
            try:
                load = Load(port, keys, customers, weights, batch, label)
                meter = TreeMeter()
                cpu: dict[str, Any] = {}
                flink = FlinkCluster(cfg)
                kafka_pid, postgres_pid = (
                    read_pid(cfg.state_dir / "kafka" / "kafka.pid"),
                    read_pid(cfg.state_dir / "postgres" / "data" / "postmaster.pid"),
                )
                groups = {
                    "serve": [proc.pid],
                    "flink_taskmanager": flink.taskmanager_pids(),
                    "flink_jobmanager": flink.jobmanager_pids(),
                    "kafka": [kafka_pid] if kafka_pid else [],
                    "postgres": [postgres_pid] if postgres_pid else [],
                }

                async def sample_cpu() -> None:
                    await asyncio.sleep(max(0.0, load.measure[0] - time.monotonic()))
                    cpu["start"] = (meter.sample(groups), time.process_time(), machine_cpu_s())
                    await asyncio.sleep(max(0.0, load.measure[1] - time.monotonic()))
                    cpu["end"] = (meter.sample(groups), time.process_time(), machine_cpu_s())

                async def both() -> dict[str, Any]:
                    sampler = asyncio.create_task(sample_cpu())
                    rules = await run_load(load, args.clients, args.warmup, args.seconds, path, cfg)
                    await sampler
                    return rules

                print(f"[{label}] posting for {args.warmup + args.seconds:.0f} s ...", flush=True)
                out["rules"] = asyncio.run(both())
                posted_until = time.time()
                # Closers past the last window's end and the watermark delay: every window of the run closes.
                size = cfg.event_time.window_size
                now = datetime.now(UTC)
                last_end = datetime.fromtimestamp(
                    (now.timestamp() // size.total_seconds() + 1) * size.total_seconds(), UTC
                )
                at = last_end + cfg.event_time.watermark_delay + timedelta(seconds=1)
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/v1/events",
                    json={"events": closers(cfg.kafka.partitions, at, label)},
                    headers={"Authorization": f"Bearer {closer_key}"},
                    timeout=30,
                )
                closers_at = time.time()
                out["closers"] = {"status": answer.status_code, "event_time": at.isoformat(), "sent_at": closers_at}
                print(f"[{label}] {load.accepted:,} accepted; waiting for Postgres ...", flush=True)
                deadline = time.time() + args.drain_timeout
                total = 0
                matched_at = None
                while time.time() < deadline:
                    total = counted(cfg, tenants)
                    if total >= load.accepted:
                        matched_at = time.time()
                        break
                    time.sleep(0.25)
                # Webhooks of the windows the closers closed: a few more alert passes, then every crossing sent.
                time.sleep(2 * cfg.alerts.interval.total_seconds() + 1)
                wait_for(lambda: not pending_crossings(cfg, tenants), 120, "every crossing's webhook")
                out["alerts"] = alert_delays(cfg, tenants, receiver.received)
                checked_total = counted(cfg, tenants)
            finally:
                flink_jobs.cancel(cfg, job_id)
    finally:
        receiver.close()

    lo, hi = load.measure
    measured = [s for s in load.samples if lo <= s[0] < hi]
    latencies = [s[1] * 1000 for s in measured if s[2] == 202]
    http_events = sum(s[3] for s in measured)
    (serve0, proc0, mach0), (serve1, proc1, mach1) = cpu["start"], cpu["end"]
    out.update(
        {
            "requests": len(load.samples),
            "statuses": {str(k): v for k, v in sorted(load.statuses.items())},
            "transport_errors": len(load.transport_errors),
            "transport_error_examples": load.transport_errors[:5],
            "failed_events": load.failed_events,
            "accepted": load.accepted,
            "counted": checked_total,
            "counted_when_matched": total,
            "measured_s": hi - lo,
            "measured_requests": len(measured),
            "http_events_per_s": http_events / (hi - lo),
            "http_requests_per_s": len(measured) / (hi - lo),
            "latency_ms": {
                "p50": percentile(latencies, 50) if latencies else None,
                "p90": percentile(latencies, 90) if latencies else None,
                "p99": percentile(latencies, 99) if latencies else None,
                "max": max(latencies) if latencies else None,
            },
            "first_request_at": load.first_request_wall,
            "posting_s": posted_until - load.first_request_wall,
            "closers_to_counted_s": matched_at - closers_at if matched_at else None,
            "end_to_end_s": matched_at - load.first_request_wall if matched_at else None,
            "end_to_end_events_per_s": load.accepted / (matched_at - load.first_request_wall) if matched_at else None,
            "cpu_s_measured": {
                **{name: serve1[name][0] - serve0[name][0] for name in serve1},
                "load_generator_and_receiver": proc1 - proc0,
                "machine": mach1 - mach0,
                "other_processes": (mach1 - mach0)
                - (proc1 - proc0)
                - sum(v[0] - serve0[k][0] for k, v in serve1.items()),
            },
        }
    )
    return out


def fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| batch | accepted | end to end (events/s) | over HTTP (events/s) | p50 ms | p99 ms | non-202 | "
        "alert: commit → arrival p50 / max s | crossed_at → arrival p50 / max s | crossings |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        a = r["alerts"]
        non_202 = sum(v for k, v in r["statuses"].items() if k != "202") + r["transport_errors"]
        lines.append(
            f"| {r['batch']:,} | {r['accepted']:,} | {fmt(r['end_to_end_events_per_s'])} | {fmt(r['http_events_per_s'])} "
            f"| {fmt(r['latency_ms']['p50'], 1)} | {fmt(r['latency_ms']['p99'], 1)} | {non_202} "
            f"| {fmt(a['commit_to_arrival_s']['p50'], 2)} / {fmt(a['commit_to_arrival_s']['max'], 2)} "
            f"| {fmt(a['crossed_to_arrival_s']['p50'], 2)} / {fmt(a['crossed_to_arrival_s']['max'], 2)} "
            f"| {a['crossings']} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[100, 1000], help="events per request, one run each")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--customers", type=int, default=50, help="customers per tenant")
    p.add_argument("--warmup", type=float, default=15, help="seconds of load before measuring")
    p.add_argument("--seconds", type=float, default=75, help="measured seconds per batch size")
    p.add_argument("--partitions", type=int, default=3, help="input topic partitions (shipped default 3)")
    p.add_argument("--drain-timeout", type=float, default=300, help="longest wait for Postgres to hold every event")
    p.add_argument("--results", type=Path, default=RESULTS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    # A TERM (like Ctrl-C) unwinds through the stack's cleanup instead of leaving it running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, Any] = {
        "run": {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python -m bench.ingest_http " + " ".join(sys.argv[1:]),
            "options": {k: str(v) for k, v in vars(args).items()},
        },
        "machine": machine_info(),
        "runs": [],
    }
    with private_stack(args.partitions) as stack:
        for batch in args.batches:
            run = run_batch_size(stack, batch, args)
            # The machine is shared: what else ran shows in the load average and in other_processes.
            run["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
            results["runs"].append(run)
            args.results.write_text(json.dumps(results, indent=2, default=str) + "\n")
            print(table(results["runs"][-1:]), flush=True)
    print(table(results["runs"]))


if __name__ == "__main__":
    main()
