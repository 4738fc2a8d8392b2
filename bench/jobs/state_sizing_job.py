"""The usage job's dedup, alone, fed N distinct ids by ``datagen``: what its state costs per id.

``flink run -d -py bench/jobs/state_sizing_job.py --config X --ids N --live-rate R [--backend forst]``

Environment and options come from the usage job itself (``build_environment``: checkpointing, the
configured state backend, ``table.exec.state.ttl`` = dedup horizon) and the dedup is the job's own
query (``dedup_query``). Two sources feed it:

* ``ids``: exactly N rows of random 63-bit numbers turned into UUID-shaped ids (MD5 hex,
  random-looking as client-made UUIDs are), over ten tenants; it finishes when done.
* ``live``: R new ids per second, unbounded. It keeps the dedup running after ``ids`` finished (a job
  whose sources all finished ends, and its state with it), and gives the second, steady-state
  checkpoint what a running job adds between two checkpoints.
"""

from __future__ import annotations

import argparse
import sys

from jobs.plan import dedup_query
from jobs.source_plan import usage_value_columns
from jobs.sql import sql_with
from jobs.usage_job import build_environment
from meterflow.config import load_config

EVENTS_VIEW = "sizing_events"
TENANTS = 10


def uuid_shaped(expr: str) -> str:
    """A 36-character, UUID-shaped id from the MD5 of a string expression."""
    h = f"MD5({expr})"
    parts = [f"SUBSTR({h}, {start}, {length})" for start, length in ((1, 8), (9, 4), (13, 4), (17, 4), (21, 12))]
    dash = ", '-', "
    return f"CONCAT({dash.join(parts)})"


def events_select(table: str, number: str) -> str:
    """The usage event columns, derived from a BIGINT column; only (tenant_id, event_id) reach the state."""
    return (
        f"SELECT {uuid_shaped(f'CAST({number} AS STRING)')} AS `event_id`,\n"
        f"  CONCAT('tenant-', CAST(MOD({number}, {TENANTS}) AS STRING)) AS `tenant_id`,\n"
        f"  CONCAT('customer-', CAST(MOD({number}, 1000) AS STRING)) AS `customer_id`,\n"
        "  'api_calls' AS `meter`, CAST(1 AS DECIMAL(38, 9)) AS `quantity`,\n"
        "  CAST(LOCALTIMESTAMP AS TIMESTAMP(3)) AS `event_time`, MAP['model', 'm'] AS `dimensions`, `proc_time`\n"
        f"FROM `{table}`"
    )


def main(argv: list[str]) -> None:
    """Declare the sources, the dedup and a discarding sink; submit."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--ids", type=int, required=True)
    parser.add_argument("--live-rate", type=int, default=1000)
    parser.add_argument(
        "--backend", default=None, help="state.backend.type other than flink.state_backend (e.g. forst)"
    )
    parser.add_argument(
        "--no-bloom-filter", action="store_true", help="RocksDB without the Bloom filters the job sets (for comparison)"
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    extra = {"pipeline.name": f"state-sizing-{args.ids}"}
    if args.backend:
        extra["state.backend.type"] = args.backend
    if args.no_bloom_filter:
        extra["state.backend.rocksdb.use-bloom-filter"] = "false"
    _, t_env = build_environment(cfg, extra)
    t_env.get_config().set("pipeline.name", extra["pipeline.name"])
    # datagen defaults to 10,000 rows/s; this rate is never reached, so the source runs flat out.
    # Random 63-bit numbers, not a sequence: datagen's sequence holds every value of its range in
    # a queue from the start (50M ids: over 1 GB of heap, an OutOfMemoryError in the project's
    # TaskManager). Expected repeats among 50M draws of 2^63: 50M^2 / 2^64, about 0.0001.
    ids = {
        "connector": "datagen",
        "rows-per-second": "1000000000",
        "number-of-rows": str(args.ids),
        "fields.n.kind": "random",
        "fields.n.min": "0",
    }
    live = {
        "connector": "datagen",
        "rows-per-second": str(args.live_rate),
        "fields.n.kind": "random",
        "fields.n.min": "0",
    }
    for name, options in (("ids", ids), ("live", live)):
        t_env.execute_sql(f"CREATE TABLE `{name}` (`n` BIGINT, `proc_time` AS PROCTIME()) {sql_with(options)}")
    t_env.execute_sql(
        f"CREATE TEMPORARY VIEW `{EVENTS_VIEW}` AS\n{events_select('ids', '`n`')}\nUNION ALL\n{events_select('live', '`n`')}"
    )
    cols = ", ".join(c.ddl() for c in usage_value_columns())
    t_env.execute_sql(f"CREATE TABLE `discard` ({cols}) WITH ('connector' = 'blackhole')")
    client = t_env.execute_sql(f"INSERT INTO `discard`\n{dedup_query(f'`{EVENTS_VIEW}`')}").get_job_client()
    if client is not None:
        print(f"submitted job {client.get_job_id()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
