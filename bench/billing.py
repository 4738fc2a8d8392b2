"""Billing benchmark: ``.venv/bin/python -m bench.billing`` (options: ``--help``).

On a private stack (free ports, temporary directory, removed afterwards):

1. **Throughput** of the billing job (2 subtasks) against the fault-injecting fake run as its own
   process with a fixed answer latency (10, 50, 200 ms): closed windows are published to the
   closed-windows topic first, then the job is submitted; throughput is sent deliveries per second
   between the first and the last one the ledger records.
2. **The usage job while billing is slow, down or rate-limited**: both jobs run, events flow at a
   steady rate with event time = now, and every second a late event and a bad record are sent;
   reported: the usage job's checkpoint durations (p50/p99/max over every completed checkpoint)
   and how long each late event and dead letter took to be visible to a read_committed reader,
   against two checkpoint intervals.

Prints the figures and writes bench/billing_results.json (docs/benchmarks.md quotes them).
"""

from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from bench.billing_report import render_section, splice_section
from bench.private_stack import BenchStack, private_stack
from meterflow.config import JobConfig
from meterflow.local import flink_jobs

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "billing_results.json"
REPORT = REPO / "docs" / "benchmarks.md"
console = Console()


# ------------------------------------------------------------------ the fake as its own process


class FakeProcess:
    """tests/support/fake_stripe.py in a process of its own, so its CPU never shares a GIL with the driver."""

    def __init__(self, latency: float = 0.0, fail_status: int | None = None, retry_after: float | None = None) -> None:
        args = [sys.executable, "-m", "tests.support.fake_stripe", "--latency", str(latency)]
        if fail_status:
            args += ["--fail-status", str(fail_status)]
        if retry_after is not None:
            args += ["--retry-after", str(retry_after)]
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ------------------------------------------------------------------ helpers


def job_config(stack: BenchStack, name: str, api_base: str, **sections: dict) -> tuple[JobConfig, Path]:
    """A fresh set of topics, group and tables for one run, billing through ``api_base``."""
    run = uuid.uuid4().hex[:6]
    kafka = {
        **stack.base["kafka"],
        "usage_events_topic": f"in-{name}-{run}",
        "late_events_topic": f"late-{name}-{run}",
        "dead_letter_topic": f"dead-{name}-{run}",
        "closed_windows_topic": f"closed-{name}-{run}",
        "consumer_group": f"g-{name}-{run}",
    }
    postgres = {**stack.base["postgres"], "usage_table": f"usage_{name}_{run}"}
    billing = {
        "enabled": True,
        "ledger_table": f"deliveries_{name}_{run}",
        "customers_table": f"customers_{name}_{run}",
        **sections.pop("billing", {}),
    }
    flink = {**stack.base["flink"], "job_name": f"bench-{name}-{run}", **sections.pop("flink", {})}
    stripe = {"api_base": api_base, **sections.pop("stripe", {})}
    cfg, path = stack.config(
        f"{name}-{run}", kafka=kafka, postgres=postgres, billing=billing, flink=flink, stripe=stripe, **sections
    )
    from connectors.kafka_admin import ensure_project_topics
    from sinks.ledger import apply_schemas

    ensure_project_topics(cfg)
    apply_schemas(cfg)
    return cfg, path


def map_customers(cfg: JobConfig, tenants: int, customers: int) -> None:
    from billing.deliveries import CustomerMapping
    from sinks.ledger import map_customers as write

    write(
        cfg,
        [CustomerMapping(f"tenant-{t}", f"cust-{c}", f"cus_{t}_{c}") for t in range(tenants) for c in range(customers)],
    )


def sent_count(cfg: JobConfig) -> int:
    from sinks.postgres import connect

    with connect(cfg.postgres) as conn:
        return conn.execute(f"SELECT count(*) FROM {cfg.billing.ledger_table} WHERE status = 'sent'").fetchone()[0]


def cpu_groups(cfg: JobConfig, fake: FakeProcess) -> dict[str, list[int]]:
    """The processes whose CPU the throughput phase reports, by role."""
    from bench.pipelines import stack_pids
    from bench.procstat import all_stats
    from meterflow.local.base import descendants
    from meterflow.local.flink import FlinkCluster

    cluster = FlinkCluster(cfg)
    workers = cluster.python_workers()
    kafka_pid, *pg = stack_pids(cfg)
    parents = {pid: st[0] for pid, st in all_stats().items()}
    return {
        "taskmanager JVM": cluster.taskmanager_pids(),
        "Python workers": workers,
        "fake provider": [fake.proc.pid],
        "Postgres": sorted(descendants(pg, parents)),
        "Kafka": [kafka_pid],
    }


def cpu_seconds(groups: dict[str, list[int]]) -> dict[str, float]:
    from bench.procstat import all_stats

    stats = all_stats()
    return {name: sum(stats[p][1] for p in pids if p in stats) for name, pids in groups.items()}


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"n": len(ordered), "p50": statistics.median(ordered), "p99": p99, "max": ordered[-1]}


# ------------------------------------------------------------------ 1. throughput


def in_flight_of(api: str, max_in_flight: int | None) -> int:
    """``billing.max_in_flight`` as given, else the shipped default for ``api``."""
    return max_in_flight or JobConfig.model_validate({"stripe": {"meter_events_api": api}}).billing_max_in_flight


def measure_throughput(
    stack: BenchStack, latency_ms: int, windows: int, max_in_flight: int | None, api: str = "v1"
) -> dict[str, Any]:
    """Sent deliveries per second of the billing job (2 subtasks) against the fake answering after
    ``latency_ms``, through Stripe's ``api`` (``v1``: a call per delivery; ``v2_stream``: requests of up to 100)."""
    from tests.e2e.helpers import closed_window, publish_closed_windows

    fake = FakeProcess(latency=latency_ms / 1000)
    try:
        stripe = {"meter_events_api": api, "meter_events_base": fake.url} if api != "v1" else {}
        cfg, path = job_config(
            stack,
            f"tp{latency_ms}{api.replace('_', '')}",
            fake.url,
            billing={"parallelism": 2, **({"max_in_flight": max_in_flight} if max_in_flight else {})},
            stripe=stripe,
        )
        customers = 500
        per_key = max(1, windows // (customers * 2))
        map_customers(cfg, 2, customers)
        size = cfg.event_time.window_size
        start = (datetime.now(UTC) - timedelta(hours=3)).replace(second=0, microsecond=0)
        records = [
            closed_window(f"tenant-{t}", f"cust-{c}", "tokens", start + i * size, size, f"{c}.{i}", 1)
            for i in range(per_key)
            for t in range(2)
            for c in range(customers)
        ]
        publish_closed_windows(cfg, records)
        job_id = flink_jobs.submit_billing(cfg, path)
        samples: list[tuple[float, int]] = []
        cpu: dict[str, dict[str, float]] = {}
        deadline = time.monotonic() + 600
        try:
            while time.monotonic() < deadline:
                if flink_jobs.restarts(cfg, job_id):
                    msg = f"the billing job restarted; see the TaskManager log in {cfg.state_dir}/flink/log"
                    raise RuntimeError(msg)
                n = sent_count(cfg)
                samples.append((time.monotonic(), n))
                # CPU over the steady part: from 10% to 90% of the deliveries.
                if "from" not in cpu and n >= 0.1 * len(records):
                    groups = cpu_groups(cfg, fake)
                    cpu["from"] = cpu_seconds(groups)
                if "to" not in cpu and n >= 0.9 * len(records):
                    cpu["to"] = cpu_seconds(groups)
                if n >= len(records):
                    break
                time.sleep(0.5)
        finally:
            flink_jobs.cancel(cfg, job_id)
        started = next(t for t, n in samples if n > 0)
        done = samples[-1]
        rate = (done[1] - 1) / (done[0] - started) if done[0] > started else float("nan")
        # Steady state: the middle 80% of the deliveries, so start-up and the tail do not count.
        lo = next(t for t, n in samples if n >= 0.1 * len(records))
        hi = next(t for t, n in samples if n >= 0.9 * len(records))
        steady = 0.8 * len(records) / (hi - lo) if hi > lo else float("nan")
        spent = {k: round(1000 * (cpu["to"][k] - cpu["from"][k]) / (0.8 * len(records)), 3) for k in cpu.get("to", {})}
        result = {
            "api": api,
            "cpu_ms_per_delivery": spent,
            "cpu_cores_busy": round((sum(cpu["to"].values()) - sum(cpu["from"].values())) / (hi - lo), 2)
            if "to" in cpu
            else None,
            "latency_ms": latency_ms,
            "windows": len(records),
            "sent": done[1],
            "max_in_flight_per_subtask": cfg.billing_max_in_flight,
            "subtasks": 2,
            "events_per_s": round(rate, 1),
            "steady_events_per_s": round(steady, 1),
            "seconds": round(done[0] - started, 1),
        }
        console.print(f"throughput at {latency_ms} ms: {result}")
        return result
    finally:
        fake.stop()


def measure_hot_customer(
    stack: BenchStack, latency_ms: int, cold: int, hot: int, max_in_flight: int, held_per_key: int | None
) -> dict[str, Any]:
    """Time to bill ``cold`` windows of as many customers published after ``hot`` windows of one
    customer (2 subtasks), with the shipped ``billing.max_held_per_key`` or ``held_per_key``."""
    from tests.e2e.helpers import closed_window, publish_closed_windows

    fake = FakeProcess(latency=latency_ms / 1000)
    try:
        billing = {
            "max_in_flight": max_in_flight,
            "parallelism": 2,
            **({"max_held_per_key": held_per_key} if held_per_key else {}),
        }
        cfg, path = job_config(stack, f"hot{held_per_key or 'd'}", fake.url, billing=billing)
        map_customers(cfg, 1, cold)
        from billing.deliveries import CustomerMapping
        from sinks.ledger import map_customers as write

        write(cfg, [CustomerMapping("tenant-0", "cust-hot", "cus_hot")])
        size = cfg.event_time.window_size
        start = (datetime.now(UTC) - hot * size - timedelta(hours=1)).replace(second=0, microsecond=0)
        burst = [closed_window("tenant-0", "cust-hot", "tokens", start + i * size, size, "1", 1) for i in range(hot)]
        others = [closed_window("tenant-0", f"cust-{c}", "tokens", start, size, "1", 1) for c in range(cold)]
        publish_closed_windows(cfg, burst + others)  # the burst first: it reaches the deliverers ahead of everyone else
        job_id = flink_jobs.submit_billing(cfg, path)
        t0, cold_done, deadline = None, None, time.monotonic() + 1800
        try:
            while time.monotonic() < deadline:
                if flink_jobs.restarts(cfg, job_id):
                    msg = f"the billing job restarted; see the TaskManager log in {cfg.state_dir}/flink/log"
                    raise RuntimeError(msg)
                hot_sent, cold_sent = sent_by_hot(cfg)
                if t0 is None and hot_sent + cold_sent:
                    t0 = time.monotonic()
                if cold_done is None and cold_sent >= cold:
                    cold_done = time.monotonic()
                if hot_sent + cold_sent >= hot + cold:
                    break
                time.sleep(0.5)
            done = time.monotonic()
        finally:
            flink_jobs.cancel(cfg, job_id)
        result = {
            "latency_ms": latency_ms,
            "hot_windows": hot,
            "cold_windows": cold,
            "max_in_flight_per_subtask": max_in_flight,
            "subtasks": 2,
            "max_held_per_key": held_per_key or JobConfig.model_validate({}).billing.max_held_per_key,
            "cold_done_s": round(cold_done - t0, 1) if cold_done and t0 else None,
            "all_done_s": round(done - t0, 1) if t0 else None,
            "hot_sent": sent_by_hot(cfg)[0],
        }
        console.print(f"one hot customer at {latency_ms} ms: {result}")
        return result
    finally:
        fake.stop()


def sent_by_hot(cfg: JobConfig) -> tuple[int, int]:
    """(sent deliveries of the hot customer, sent deliveries of everyone else)."""
    from sinks.postgres import connect

    with connect(cfg.postgres) as conn:
        hot, other = conn.execute(
            f"SELECT count(*) FILTER (WHERE customer_id = 'cust-hot'), count(*) FILTER (WHERE customer_id <> 'cust-hot') FROM {cfg.billing.ledger_table} WHERE status = 'sent'"
        ).fetchone()
    return int(hot), int(other)


# ------------------------------------------------------------------ 2. the usage job while billing suffers


class VisibilityProbe:
    """Sends a late event and a bad record every second; a read_committed reader times when each becomes visible."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.sent: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def send(self, n: int) -> None:
        from kafka import KafkaProducer

        from connectors.avro_codec import encode_usage_event

        producer = KafkaProducer(bootstrap_servers=self.cfg.kafka.bootstrap_servers, acks="all")
        try:
            for i in range(n):
                if self.stop.is_set():
                    return
                late_id = f"probe-late-{i}"
                # Dated 10 minutes back: its window closed long ago, so it is late, not counted.
                late = {
                    "event_id": late_id,
                    "tenant_id": "probe",
                    "customer_id": "probe",
                    "meter": "tokens",
                    "quantity": Decimal(1),
                    "event_time": datetime.now(UTC) - timedelta(minutes=10),
                    "dimensions": {},
                }
                producer.send(self.cfg.kafka.usage_events_topic, encode_usage_event(late), key=b"probe/probe").get(30)
                self.sent[late_id] = time.time()
                bad = f"probe-bad-{i}"
                producer.send(self.cfg.kafka.usage_events_topic, bad.encode()).get(30)
                self.sent[bad] = time.time()
                time.sleep(1)
        finally:
            producer.close()

    def read(self) -> None:
        import fastavro
        from kafka import KafkaConsumer

        from connectors.avro_types import load_schema
        from jobs.plan import DEAD_LETTER_SCHEMA, LATE_EVENT_SCHEMA

        late_schema, dead_schema = (
            fastavro.parse_schema(load_schema(s)) for s in (LATE_EVENT_SCHEMA, DEAD_LETTER_SCHEMA)
        )
        k = self.cfg.kafka
        consumer = KafkaConsumer(
            k.late_events_topic,
            k.dead_letter_topic,
            bootstrap_servers=k.bootstrap_servers,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            group_id=None,
        )
        try:
            while not self.stop.is_set():
                for tp, records in consumer.poll(timeout_ms=200).items():
                    now = time.time()
                    for r in records:
                        if tp.topic == k.late_events_topic:
                            key = fastavro.schemaless_reader(io.BytesIO(r.value), late_schema)["event_id"]
                        else:
                            key = fastavro.schemaless_reader(io.BytesIO(r.value), dead_schema)["payload"].decode(
                                errors="replace"
                            )
                        self.seen.setdefault(key, now)
        finally:
            consumer.close()

    def latencies(self) -> tuple[list[float], list[float], int]:
        late = [self.seen[k] - t for k, t in self.sent.items() if k.startswith("probe-late") and k in self.seen]
        dead = [self.seen[k] - t for k, t in self.sent.items() if k.startswith("probe-bad") and k in self.seen]
        return late, dead, sum(1 for k in self.sent if k not in self.seen)


def steady_events(cfg: JobConfig, rate: int, seconds: int, stop: threading.Event) -> int:
    """``rate`` usage events a second, dated now, for ``seconds``: windows keep closing, billing keeps getting work."""
    from kafka import KafkaProducer

    from connectors.avro_codec import encode_usage_event
    from connectors.producer import SyntheticSpec, synthetic_events

    producer = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all", linger_ms=5)
    sent = 0
    try:
        for second in range(seconds):
            if stop.is_set():
                break
            began = time.time()
            spec = SyntheticSpec(
                count=rate,
                tenants=2,
                customers=50,
                start=datetime.now(UTC) - timedelta(seconds=1),
                span=timedelta(seconds=1),
                seed=second,
            )
            for e in synthetic_events(spec):
                producer.send(
                    cfg.kafka.usage_events_topic,
                    encode_usage_event(e),
                    key=f"{e['tenant_id']}/{e['customer_id']}".encode(),
                )
                sent += 1
            producer.flush()
            time.sleep(max(0.0, 1 - (time.time() - began)))
    finally:
        producer.close()
    return sent


def checkpoint_durations(cfg: JobConfig, job_id: str, seen: dict[int, dict]) -> None:
    """Collect completed checkpoints from the REST history (by id, so none is counted twice)."""
    for c in flink_jobs.checkpoint_stats(cfg, job_id).get("history", []):
        if c.get("status") == "COMPLETED":
            seen[c["id"]] = c
        elif c.get("status") == "FAILED":
            seen.setdefault(-c["id"], c)


def measure_usage_under(stack: BenchStack, mode: str, seconds: int, rate: int) -> dict[str, Any]:
    """Both jobs; the provider ``mode``: healthy, slow, down or rate-limited."""
    fake = {
        "healthy": lambda: FakeProcess(latency=0.05),
        "slow": lambda: FakeProcess(latency=2.0),
        "down": lambda: FakeProcess(fail_status=503),
        "rate-limited": lambda: FakeProcess(fail_status=429, retry_after=2),
    }[mode]()
    try:
        cfg, path = job_config(
            stack,
            mode.replace("-", ""),
            fake.url,
            event_time={"window_size": "10s", "watermark_delay": "2s", "source_idle_timeout": "5s"},
            flink={"parallelism": 2},
        )
        map_customers(cfg, 2, 50)
        usage_job = flink_jobs.submit(cfg, path)
        billing_job = flink_jobs.submit_billing(cfg, path)
        probe, stop, checkpoints = VisibilityProbe(cfg), threading.Event(), {}
        threads = [
            threading.Thread(target=probe.read, daemon=True),
            threading.Thread(target=probe.send, args=(seconds - 10,), daemon=True),
        ]
        try:
            checkpoint_durations(cfg, usage_job, checkpoints)
            first_id = max((i for i in checkpoints if i > 0), default=0)
            producer = threading.Thread(target=steady_events, args=(cfg, rate, seconds, stop), daemon=True)
            producer.start()
            time.sleep(5)  # the watermark reaches now first, so a probe dated 10 minutes back is late
            for t in threads:
                t.start()
            while producer.is_alive():
                checkpoint_durations(cfg, usage_job, checkpoints)
                producer.join(3)
            time.sleep(2 * cfg.flink.checkpoint_interval.total_seconds() + 2)
            checkpoint_durations(cfg, usage_job, checkpoints)
            billing_counts = flink_jobs.checkpoint_stats(cfg, billing_job)["counts"]
            from sinks.ledger import status_summary

            ledger = {f"{kind}/{status}": n for _, kind, status, n, *_ in status_summary(cfg)}
        finally:
            probe.stop.set()
            stop.set()
            flink_jobs.cancel(cfg, billing_job)
            flink_jobs.cancel(cfg, usage_job)
        completed = [c for i, c in checkpoints.items() if i > first_id]
        failed = sum(1 for i in checkpoints if i < 0 and -i > first_id)
        durations = [c["end_to_end_duration"] / 1000 for c in completed]
        late, dead, missing = probe.latencies()
        bound = 2 * cfg.flink.checkpoint_interval.total_seconds()
        result = {
            "mode": mode,
            "seconds": seconds,
            "events_per_s": rate,
            "checkpoint_interval_s": cfg.flink.checkpoint_interval.total_seconds(),
            "usage_checkpoints": {"completed": len(completed), "failed": failed, "duration_s": percentiles(durations)},
            "late_visible_s": percentiles(late),
            "dead_letter_visible_s": percentiles(dead),
            "probes_never_seen": missing,
            "within_two_intervals": round(sum(1 for v in late + dead if v <= bound) / max(1, len(late + dead)), 3),
            "billing_checkpoints": {k: billing_counts.get(k) for k in ("completed", "failed", "in_progress")},
            "ledger": ledger,
        }
        console.print(f"{mode}: {json.dumps(result)}")
        return result
    finally:
        fake.stop()


def lat_or_modes(latencies: str, modes: str) -> bool:
    return any(x for x in latencies.split(",")) or any(m for m in modes.split(","))


@click.command()
@click.option(
    "--windows",
    default=30000,
    show_default=True,
    help="Closed windows per throughput run (long enough that start-up is not the figure).",
)
@click.option(
    "--latencies", default="10,50,200", show_default=True, help="Fake answer latencies (ms) for the throughput curve."
)
@click.option(
    "--max-in-flight",
    type=int,
    default=None,
    help="billing.max_in_flight per subtask for the throughput runs  [default: the shipped default of each API]",
)
@click.option(
    "--apis",
    default="v1,v2_stream",
    show_default=True,
    help="stripe.meter_events_api values for the throughput runs; figures of other APIs, latencies or max in flight are kept from the last run.",
)
@click.option(
    "--modes",
    default="healthy,slow,down,rate-limited",
    show_default=True,
    help="Provider modes for the usage-job phase ('' to skip).",
)
@click.option("--seconds", default=60, show_default=True, help="Length of each usage-job phase.")
@click.option("--rate", default=1000, show_default=True, help="Usage events per second during the usage-job phase.")
@click.option(
    "--hot-customer",
    default="5000,5000",
    show_default=True,
    help="HOT,COLD: windows of one customer published before one window each of COLD customers, at 50 ms answers ('' to skip).",
)
@click.option("--keep-state", is_flag=True, help="Keep the private stack's logs and data for a post-mortem.")
@click.option(
    "--render-only", is_flag=True, help="Only rewrite the docs/benchmarks.md section from bench/billing_results.json."
)
def main(
    windows: int,
    latencies: str,
    max_in_flight: int | None,
    apis: str,
    modes: str,
    seconds: int,
    rate: int,
    hot_customer: str,
    keep_state: bool,
    render_only: bool,
) -> None:
    """Measure billing throughput and the usage job's checkpoints while billing suffers; write bench/billing_results.json and the Billing section of docs/benchmarks.md."""
    if render_only:
        REPORT.write_text(splice_section(REPORT.read_text(), render_section(json.loads(RESULTS.read_text()))))
        console.print(f"wrote the billing section of {REPORT}")
        return
    from bench.machine import machine_info

    now = datetime.now(UTC).isoformat(timespec="seconds")
    results: dict[str, Any] = {
        "date": now,
        "hot_customer_date": now,
        "machine": machine_info(),
        "throughput": [],
        "usage_job_while_billing_suffers": [],
        "hot_customer": [],
    }
    chosen_apis = [a for a in apis.split(",") if a]
    if RESULTS.exists():
        # What this run does not measure stays as the last run measured it.
        previous = json.loads(RESULTS.read_text())
        if not lat_or_modes(latencies, modes):
            results.update(
                {k: previous[k] for k in ("date", "throughput", "usage_job_while_billing_suffers") if k in previous}
            )
        else:
            measured = {
                (a, int(x), in_flight_of(a, max_in_flight)) for a in chosen_apis for x in latencies.split(",") if x
            }
            results["throughput"] = [
                t
                for t in previous.get("throughput", [])
                if (t.get("api", "v1"), t["latency_ms"], t["max_in_flight_per_subtask"]) not in measured
            ]
            if not any(m for m in modes.split(",")):
                results["usage_job_while_billing_suffers"] = previous.get("usage_job_while_billing_suffers", [])
        if not hot_customer:
            results.update({k: previous[k] for k in ("hot_customer", "hot_customer_date") if k in previous})
    with private_stack(
        3,
        keep_state=keep_state,
        echo=console.print,
        flink_options={"taskmanager.numberOfTaskSlots": "4", "web.checkpoints.history": "200"},
    ) as stack:
        cfg, _ = stack.config("base")
        with cfg.path(cfg.secrets_file).open("a") as secrets:
            secrets.write("METERFLOW_STRIPE_API_KEY=sk_test_meterflowBench\n")  # any key works with the fake
        lat = [int(x) for x in latencies.split(",") if x]
        if lat:
            # A first job on a fresh cluster runs while the JVM compiles its hot paths: not measured.
            measure_throughput(stack, lat[0], min(windows, 2000), max_in_flight)
        for api in chosen_apis:
            for latency in lat:
                results["throughput"].append(measure_throughput(stack, latency, windows, max_in_flight, api))
        for mode in [m for m in modes.split(",") if m]:
            results["usage_job_while_billing_suffers"].append(measure_usage_under(stack, mode, seconds, rate))
        if hot_customer:
            hot, cold = (int(x) for x in hot_customer.split(","))
            slots = in_flight_of("v1", max_in_flight)
            for held in (
                None,
                slots,
            ):  # the shipped default, then a key allowed to hold every slot (as before fair scheduling)
                results["hot_customer"].append(measure_hot_customer(stack, 50, cold, hot, slots, held))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    REPORT.write_text(splice_section(REPORT.read_text(), render_section(results)))
    console.print(f"wrote {RESULTS} and the billing section of {REPORT}")


if __name__ == "__main__":
    main()
