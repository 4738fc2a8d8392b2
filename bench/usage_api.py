"""Latency of the usage API (``GET /v1/customers/{id}/usage``) under concurrent clients.

1. Starts a private Postgres and Kafka broker (free ports, a temporary state directory). Kafka is only
   there because ``meterflow serve`` does not start without one (its kafka-python producer bootstraps
   at start); no event is written.
2. Loads ``--rows`` 1-minute window rows with ``INSERT ... SELECT generate_series`` (primary key built
   after), then ``apply_usage_schema`` builds the quarter-hour rollup from them once; VACUUM ANALYZE.
   With ``--through-trigger`` the rollup's trigger exists first and keeps it row by row, as when the
   job writes windows. Each request kind's query is then timed by EXPLAIN ANALYZE for 30 customers.
3. Starts ``meterflow serve`` as a subprocess on that Postgres, shipped defaults otherwise (one uvicorn
   process, ``serve.usage_pool_size`` 10), with one API key per tenant.
4. Runs ``--clients`` closed-loop aiohttp clients in this process against random customers: the current
   period per day (the default query), ``granularity=period`` over three calendar months, or
   ``granularity=window`` over one hour. After ``--warmup`` s, each request started in the next
   ``--seconds`` is timed client-side; any answer but 200 is an error. ``--think-ms``: a client's mean
   pause between requests (exponentially distributed; one phase per value, 0: none).

The load generator, the service and Postgres share the machine: each one's CPU over the measured
interval is recorded with the machine's total. Results: ``bench/results_usage_api.json`` (one key per
load mode) and a markdown table.

    .venv/bin/python -m bench.usage_api [--rows 10000000] [--clients 100] [--seconds 60] [--think-ms 0 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from bench.machine import machine_info
from bench.procstat import TreeMeter, read_pid
from bench.stats import percentile
from meterflow.billing_cycle import BillingCycle
from meterflow.config import JobConfig, load_config
from meterflow.local.base import free_ports
from meterflow.local.kafka import KafkaBroker
from meterflow.local.postgres import PostgresServer
from meterflow.local.stack import ensure_secrets
from meterflow.serve.ingest import hash_api_key, new_api_key
from meterflow.serve.usage import MAX_WINDOW_ROWS, check_query
from meterflow.serve.usage_reader import apply_usage_schema
from sinks.api_keys import create_key
from sinks.postgres import apply_schema, connect
from sinks.postgres_schema import USAGE_KEY_COLUMNS, usage_table_ddl
from sinks.usage_rollup_schema import spans_sql, windows_sql

RESULTS = Path(__file__).resolve().parent / "results_usage_api.json"
METERS = ("api_calls", "storage_gb_hours")
SPAN_DAYS = 61
PROVISIONAL_MINUTES = 30  # windows starting this close to the load's end are provisional
KINDS = ("day", "period", "window")
ISO = "%Y-%m-%dT%H:%M:%SZ"


@dataclass
class Load:  # what the clients of one phase share
    base: str
    keys: list[str]
    customers: int
    kinds: list[str]
    first: datetime
    end: datetime
    measure: tuple[float, float]
    think_s: float
    samples: list[tuple[str, float, int, int]] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000, help="window rows to load")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--customers", type=int, default=500, help="customers per tenant")
    p.add_argument("--clients", type=int, default=100, help="concurrent clients")
    p.add_argument("--seconds", type=float, default=60, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=10, help="seconds of load before measuring")
    p.add_argument("--mix", default="day=2,period=1,window=1", help="weights of the request kinds")
    p.add_argument("--think-ms", type=float, nargs="+", default=[0.0], help="a client's mean pause between requests")
    p.add_argument(
        "--through-trigger",
        action="store_true",
        help="load with the rollup's trigger in place (as the job writes rows), not the rollup built once after the load",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="kept under one key per load mode")
    return p.parse_args()


def sizes(conn: Any, table: str) -> dict[str, Any]:
    sizes = f"(SELECT count(*) FROM {table}), pg_relation_size(%s), pg_indexes_size(%s), pg_total_relation_size(%s)"
    rows, heap, indexes, total = conn.execute(f"SELECT {sizes}", [table] * 3).fetchone()
    return {"rows": rows, "heap_mb": heap / 2**20, "indexes_mb": indexes / 2**20, "total_mb": total / 2**20}


def load_rows(cfg: JobConfig, args: argparse.Namespace, end: datetime) -> dict[str, Any]:
    """Window rows for tenants x customers x meters, each series evenly spread over SPAN_DAYS up to ``end``."""
    series = args.tenants * args.customers * len(METERS)
    per_series = args.rows // series
    stride = max(1, SPAN_DAYS * 1440 // per_series)
    table = cfg.postgres.usage_table
    if args.through_trigger:
        apply_schema(cfg.postgres)  # the usage table with its rollup and the rollup's trigger, as shipped
    else:
        with connect(cfg.postgres) as conn, conn.transaction():
            for statement in usage_table_ddl(table):  # the usage table alone: its rollup is made after the load
                conn.execute(statement)
    out: dict[str, Any] = {"series": series, "windows_per_series": per_series, "stride_minutes": stride}
    started = time.monotonic()
    values = {"m": len(METERS), "t": args.tenants, "meters": list(METERS), "n": series, "end": end}
    values |= {"prov": end - timedelta(minutes=PROVISIONAL_MINUTES), "w": per_series, "stride": stride}
    with connect(cfg.postgres) as conn:
        conn.autocommit = True
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {table}_pkey")
        for i in range(20):
            lo, hi = i * per_series // 20, (i + 1) * per_series // 20 - 1
            # s: the series (customer s / meters, meter s % meters); k: its window, oldest first.
            conn.execute(
                f"""INSERT INTO {table} (tenant_id, customer_id, meter, window_start, window_end, quantity,
                    event_count, revision, is_final)
                SELECT 'tenant-' || (s / %(m)s) %% %(t)s, 'cust-' || lpad((s / %(m)s)::text, 6, '0'),
                       (%(meters)s::text[])[s %% %(m)s + 1], ws, ws + interval '1 minute',
                       round((random() * 40)::numeric, 3), 1 + floor(random() * 40)::int,
                       CASE WHEN ws < %(prov)s THEN 2 ELSE 1 END, ws < %(prov)s
                FROM generate_series(%(lo)s::int, %(hi)s::int) k, generate_series(0, %(n)s::int - 1) s,
                     LATERAL (SELECT %(end)s - make_interval(mins => (%(w)s - 1 - k) * %(stride)s + (s * 7) %% %(stride)s) AS ws) w""",
                values | {"lo": lo, "hi": hi},
            )
            print(f"  loaded {(hi + 1) * series:,} rows, {time.monotonic() - started:.0f} s", flush=True)
        out["insert_s"] = time.monotonic() - started
        t = time.monotonic()
        conn.execute(f"ALTER TABLE {table} ADD PRIMARY KEY ({', '.join(USAGE_KEY_COLUMNS)})")
        out["primary_key_s"] = time.monotonic() - t
    t = time.monotonic()
    apply_usage_schema(cfg)  # the rollup made from the rows (unless the trigger kept it), the close horizon's index
    out["rollup_build_s"] = time.monotonic() - t
    t = time.monotonic()
    with connect(cfg.postgres) as conn:
        conn.autocommit = True
        for name in (table, f"{table}_rollup"):
            conn.execute(f"VACUUM (ANALYZE) {name}")
        out["vacuum_analyze_s"] = time.monotonic() - t
        out["usage_table"], out["rollup_table"] = sizes(conn, table), sizes(conn, f"{table}_rollup")
        out["provisional_rows"] = conn.execute(f"SELECT count(*) FROM {table} WHERE NOT is_final").fetchone()[0]  # type: ignore[index]
        first, last = conn.execute(f"SELECT min(window_start), max(window_end) FROM {table}").fetchone()  # type: ignore[misc]
    out["first_window"], out["last_window_end"] = first.isoformat(), last.isoformat()
    return out


def month_start(moment: datetime, back: int) -> datetime:
    months = moment.year * 12 + moment.month - 1 - back
    return datetime(months // 12, months % 12 + 1, 1)  # naive UTC


def request_for(kind: str, first: datetime, end: datetime) -> dict[str, str]:
    if kind == "period":
        since, until = month_start(end, 2), month_start(end, -1)  # three calendar months, the current one last
        return {"granularity": "period", "from": since.strftime(ISO), "to": until.strftime(ISO)}
    if kind == "window":
        since = first + timedelta(minutes=random.randrange(int((end - first).total_seconds() // 60) - 60))
        return {"granularity": "window", "from": since.strftime(ISO), "to": (since + timedelta(hours=1)).strftime(ISO)}
    return {}  # the current period, per day


def explain(cfg: JobConfig, tenants: int, customers: int, first: datetime, end: datetime) -> dict[str, Any]:
    """Postgres's execution time of each kind's main query (as UsageReader.usage runs it) for 30 random customers."""
    out: dict[str, Any] = {}
    table = cfg.postgres.usage_table
    with connect(cfg.postgres) as conn:
        for kind in KINDS:
            times, plan = [], ""
            for _ in range(30):
                c = random.randrange(tenants * customers)
                r = request_for(kind, first, end)
                args: dict[str, Any] = {
                    "since": r.get("from"),
                    "until": r.get("to"),
                    "granularity": r.get("granularity", "day"),
                }
                q = check_query(f"cust-{c:06d}", BillingCycle(), end, **args)
                where: list[Any] = [f"tenant-{c % tenants}", q.customer_id, q.since, q.until]
                if kind == "window":
                    sql, _ = windows_sql(table, (), False)
                    params = [*where, MAX_WINDOW_ROWS + 1]
                else:
                    sql, _ = spans_sql(table, (), False)
                    params = [list(q.bounds), *where]
                rows = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", params).fetchall()
                plan = "\n".join(r[0] for r in rows)
                times.append(float(plan.rsplit("Execution Time: ", 1)[1].split()[0]))
            out[kind] = {"median_ms": statistics.median(times), "max_ms": max(times), "plan": plan}
    return out


async def client(session: aiohttp.ClientSession, load: Load) -> None:
    measure_from, measure_to = load.measure
    await asyncio.sleep(random.uniform(0, load.think_s))
    while time.monotonic() < measure_to:
        kind, c = random.choice(load.kinds), random.randrange(load.customers)
        params = request_for(kind, load.first, load.end)
        headers = {"Authorization": f"Bearer {load.keys[c % len(load.keys)]}"}
        started, rows = time.monotonic(), 0
        try:
            async with session.get(f"{load.base}/v1/customers/cust-{c:06d}/usage", params=params, headers=headers) as r:
                body, status = await r.read(), r.status
            rows = len(json.loads(body).get("usage", [])) if status == 200 else 0
        except (aiohttp.ClientError, TimeoutError):
            status = -1
        if measure_from <= started < measure_to:
            load.samples.append((kind, time.monotonic() - started, status, rows))
        if load.think_s:  # independent users: exponential pauses, so requests arrive at random, not in step
            await asyncio.sleep(random.expovariate(1 / load.think_s))


def machine_busy_s() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def summary(samples: list[tuple[str, float, int, int]], seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("all", *KINDS):
        chosen = [s for s in samples if kind in ("all", s[0])]
        ms = [s[1] * 1000 for s in chosen]
        if ms:
            errors, empty = sum(s[2] != 200 for s in chosen), sum(s[2] == 200 and s[3] == 0 for s in chosen)
            out[kind] = {"requests": len(ms), "requests_per_s": len(ms) / seconds, "errors": errors}
            out[kind] |= {"empty_answers": empty, "mean_usage_rows": sum(s[3] for s in chosen) / len(chosen)}
            out[kind] |= {f"p{q}_ms": percentile(ms, q) for q in (50, 90, 99)} | {"max_ms": max(ms)}
    return out


async def phase(load: Load, clients: int, groups: dict[str, list[int]], warmup: float, seconds: float) -> dict:
    meter = TreeMeter()
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        tasks = [asyncio.create_task(client(session, load)) for _ in range(clients)]
        await asyncio.sleep(warmup)
        before, busy, own = meter.sample(groups), machine_busy_s(), time.process_time()
        await asyncio.sleep(seconds)
        after, busy, own = meter.sample(groups), machine_busy_s() - busy, time.process_time() - own
        await asyncio.gather(*tasks)
    cpu = {name: (after[name][0] - before[name][0]) / seconds for name in groups}
    cpu |= {"load generator": own / seconds, "machine": busy / seconds}
    latency = summary(load.samples, seconds)
    think = {"think_ms": load.think_s * 1000, "think": "exponential"}
    return {"clients": clients, **think, "latency": latency, "cpu_cores": cpu}


def start_server(config: Path, cfg: JobConfig, log: Path) -> subprocess.Popen[bytes]:
    cmd = [str(Path(sys.executable).parent / "meterflow"), "--config", str(config), "serve"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERFLOW_")}
    with log.open("ab") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{cfg.serve.host}:{cfg.serve.port}/v1/health", timeout=1):
                return server
        except OSError:
            time.sleep(0.5)
    msg = f"meterflow serve did not start; see {log}"
    raise RuntimeError(msg)


def markdown(phases: list[dict[str, Any]]) -> str:
    lines = [
        "| clients | think ms | kind | requests/s | p50 ms | p90 ms | p99 ms | max ms | errors |",
        "|---" * 9 + "|",
    ]
    for ph in phases:
        for kind, s in ph["latency"].items():
            figures = " | ".join(f"{s[k]:.1f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))
            lines.append(
                f"| {ph['clients']} | {ph['think_ms']:.0f} | {kind} | {s['requests_per_s']:,.0f} | {figures} | {s['errors']} |"
            )
    return "\n".join(lines)


def git(*args: str) -> list[str]:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.splitlines()


CONFIG = """kafka: {{bootstrap_servers: "127.0.0.1:{0}"}}
postgres: {{port: {2}}}
stack: {{state_dir: state, kafka_controller_port: {1}}}
serve: {{port: {3}}}
secrets_file: state/secrets.env
"""


def main() -> None:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="meterflow-usage-api-"))
    config = root / "meterflow.yaml"
    config.write_text(CONFIG.format(*free_ports(4)))
    ensure_secrets(load_config(config, environ={}))
    cfg = load_config(config, environ={})
    postgres, kafka = PostgresServer(cfg), KafkaBroker(cfg)
    server: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "args": vars(args)}
    try:
        print(f"state in {root}; starting Postgres and Kafka ...", flush=True)
        postgres.up()
        kafka.up()
        end = datetime.now(UTC).replace(tzinfo=None, second=0, microsecond=0)  # naive UTC, as the usage table holds it
        result["data"] = data = load_rows(cfg, args, end)
        first = datetime.fromisoformat(data["first_window"])
        result["explain"] = explain(cfg, args.tenants, args.customers, first, end)
        print(json.dumps({"data": data, "explain_ms": {k: v["median_ms"] for k, v in result["explain"].items()}}))
        keys = [new_api_key() for _ in range(args.tenants)]
        for i, key in enumerate(keys):
            create_key(cfg, hash_api_key(key), f"tenant-{i}", "bench")
        server = start_server(config, cfg, root / "serve.log")
        pids = {"postgres": read_pid(postgres.data / "postmaster.pid"), "kafka": read_pid(kafka.pid_file)}
        groups = {name: [pid or 0] for name, pid in {"service": server.pid, **pids}.items()}
        kinds = [k for part in args.mix.split(",") for k in [part.split("=")[0]] * int(part.split("=")[1])]
        base, customers = f"http://{cfg.serve.host}:{cfg.serve.port}", args.tenants * args.customers
        result["phases"] = []
        for think in args.think_ms:
            print(f"{args.clients} clients, {think:.0f} ms between requests ...", flush=True)
            now = time.monotonic() + args.warmup
            load = Load(base, keys, customers, kinds, first, end, (now, now + args.seconds), think / 1000)
            result["phases"].append(asyncio.run(phase(load, args.clients, groups, args.warmup, args.seconds)))
            print(json.dumps(result["phases"][-1]["cpu_cores"]), flush=True)
        result["machine"] = machine_info()
        result["commit"], result["uncommitted"] = git("rev-parse", "HEAD")[0], git("status", "--porcelain")
        kept = json.loads(args.results.read_text()) if args.results.exists() else {}
        kept["rollup_kept_by_trigger" if args.through_trigger else "rollup_built_once"] = result
        args.results.write_text(json.dumps(kept, indent=2, default=str) + "\n")
        print(markdown(result["phases"]))
        print(f"results in {args.results}")
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(30)
        kafka.down()
        postgres.down()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
