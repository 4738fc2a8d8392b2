"""State at scale: what the usage job's dedup costs per id, and how long its checkpoints take.

``python -m bench.state_sizing [--ids 1M,10M,50M] [--backends hashmap,rocksdb] [--forst]``
``python -m bench.state_sizing --report``  (Markdown table of bench/results_state_sizing.json)

Each run starts a private Flink cluster (nothing else: no Kafka, no Postgres), submits
bench/jobs/state_sizing_job.py (the job's own dedup fed N distinct ids by ``datagen``), waits until
all N are in, then triggers two checkpoints through the REST API: the first right after the
ingest (everything RocksDB holds is new to it), the second 5 s later (the job's checkpoint
interval; what a running job's checkpoints look like). Around them it reads the TaskManager's heap
after a full GC (``jcmd``), its RSS and the on-disk size of the RocksDB/ForSt working directory.

Timed runs wait while /tmp/ci-busy or /tmp/meterflow-bench.lock exists, and record whether either
appeared during a run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.flink import submit_script
from bench.private_stack import base_config, bench_flink_cluster
from bench.procstat import parse_stat
from bench.state_sizing_report import (
    ids_label,
    parse_ids,
    render_markdown,
    splice_table,
)
from meterflow.local import flink_jobs
from meterflow.local.base import free_ports
from meterflow.local.stack import StackConfigs

RESULTS = Path(__file__).resolve().parent / "results_state_sizing.json"
JOB_SCRIPT = Path(__file__).resolve().parent / "jobs" / "state_sizing_job.py"
DOCS = tuple(Path(__file__).resolve().parent.parent / "docs" / name for name in ("operations.md", "benchmarks.md"))
BUSY_FILES = (Path("/tmp/ci-busy"), Path("/tmp/meterflow-bench.lock"))
LIVE_RATE = 1000  # new ids/s once the N are in: the rate the operations guide's example assumes
STEADY_GAP_S = 5.0  # the job's checkpoint interval
STALL_S = 60.0
# Heap runs whose TaskManager would take more than this share of the machine's memory are not started.
MAX_MEMORY_SHARE = 0.6
# RocksDB without the Bloom filters the job sets: a comparison row, not a configuration the job offers.
NO_BLOOM = "rocksdb-no-bloom"
# The project's TaskManager (flink-conf/config.yaml): 2560m, 40 % managed memory for RocksDB.
DEFAULT_TM_MB = 2560


def tm_options(backend: str, tm_mb: int, root: Path) -> dict[str, str]:
    """TaskManager memory and working directories for one run.

    Heap state needs task heap and no managed memory; RocksDB and ForSt keep their caches and
    memtables in managed memory (Flink's default 40 %) and their files in a directory measured here.
    """
    options = {"taskmanager.memory.process.size": f"{tm_mb}m", "taskmanager.numberOfTaskSlots": "1"}
    # Flink starts a checkpoint a second after the tasks run; the datagen source, emitting flat out,
    # never acknowledges it, and the triggered checkpoint queues behind it until it times out.
    options["execution.checkpointing.timeout"] = "150 s"
    if backend == "hashmap":
        options["taskmanager.memory.managed.size"] = "0m"
    options["state.backend.rocksdb.localdir"] = str(root / "rocksdb")
    options["state.backend.forst.local-dir"] = str(root / "forst")
    return options


def busy() -> list[str]:
    """Which of the files that mean "other timed work is running" exist."""
    return [str(p) for p in BUSY_FILES if p.exists()]


def wait_quiet(echo: Callable[[str], None]) -> None:
    """Sleep in 30 s steps while another timed workload runs."""
    while found := busy():
        echo(f"waiting: {', '.join(found)} exists")
        time.sleep(30)


def heap_after_gc(pid: int) -> int:
    """Bytes of Java heap in use right after a full GC of ``pid`` (live objects only)."""
    subprocess.run(["jcmd", str(pid), "GC.run"], capture_output=True, check=True, timeout=300)
    out = subprocess.run(
        ["jcmd", str(pid), "GC.heap_info"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    match = re.search(r"total \d+K, used (\d+)K", out)
    if not match:
        msg = f"unexpected GC.heap_info output: {out[:300]}"
        raise RuntimeError(msg)
    return int(match.group(1)) * 1024


def rss(pid: int) -> int:
    """Resident bytes of a process."""
    return parse_stat(Path(f"/proc/{pid}/stat").read_text())[2]


def du(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when absent)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _vertex(details: dict[str, Any], prefix: str) -> dict[str, Any]:
    return next(v for v in details["vertices"] if v["name"].startswith(prefix))


def _failure(cfg: Any, job_id: str) -> str:
    """The job's root exception, first lines."""
    exc = flink_jobs.rest(cfg, f"/jobs/{job_id}/exceptions?maxExceptions=1")
    text = (exc.get("root-exception") or "") or json.dumps(exc.get("exceptionHistory", {}).get("entries", [])[:1])
    return "\n".join(text.splitlines()[:12])


def wait_ingested(cfg: Any, job_id: str, ids: int, timeout: float, on_poll: Callable[[], None]) -> float:
    """Seconds until the Deduplicate has read all N ids; RuntimeError if the job fails or restarts.

    The ``ids`` source does not report FINISHED when it is done: with checkpointing on, a finished
    task waits for one more checkpoint (Flink's final checkpoint). So: the source has written N rows
    and the Deduplicate has read them plus what the live source had sent a second before.
    """
    start = time.monotonic()
    progress: list[tuple[float, int]] = []
    while time.monotonic() - start < timeout:
        on_poll()
        details = flink_jobs.job_details(cfg, job_id)
        if details["state"] != "RUNNING" or flink_jobs.restarts(cfg, job_id):
            msg = f"job {details['state']} during ingest: {_failure(cfg, job_id)}"
            raise RuntimeError(msg)
        written = _vertex(details, "Source: ids")["metrics"]["write-records"]
        live = _vertex(details, "Source: live")["metrics"]["write-records"]
        read = _vertex(details, "Deduplicate")["metrics"]["read-records"]
        if written >= ids and read >= ids + live - LIVE_RATE:
            return time.monotonic() - start
        now = time.monotonic()
        progress = [(t, r) for t, r in progress if now - t <= STALL_S] + [(now, read)]
        # A heap that is full does not fail at once: the JVM runs full GC after full GC and the
        # ingest crawls. Less than 1 % of N in a minute is called a stall, with where it stalled.
        if now - start > STALL_S and read - progress[0][1] < ids // 100:
            msg = f"ingest stalled at {read:,} of {ids:,} ids ({read - progress[0][1]:,} in the last {STALL_S:.0f} s; heap full?)"
            raise RuntimeError(msg)
        time.sleep(0.5)
    msg = f"ingest not done after {timeout:.0f}s"
    raise RuntimeError(msg)


def dedup_records(cfg: Any, job_id: str) -> int:
    """Rows the Deduplicate has read (all distinct: the ids in its state)."""
    return int(_vertex(flink_jobs.job_details(cfg, job_id), "Deduplicate")["metrics"]["read-records"])


def checkpoint(cfg: Any, job_id: str, timeout: float = 1800) -> dict[str, Any]:
    """Trigger a checkpoint, wait for it, return its sizes and durations (the Deduplicate's sync/async parts)."""
    trigger = flink_jobs.rest(cfg, f"/jobs/{job_id}/checkpoints", method="POST", body={})
    deadline = time.monotonic() + timeout
    while True:
        status = flink_jobs.rest(cfg, f"/jobs/{job_id}/checkpoints/{trigger['request-id']}")
        if status["status"]["id"] == "COMPLETED":
            break
        if time.monotonic() > deadline:
            msg = f"checkpoint not complete after {timeout:.0f}s"
            raise RuntimeError(msg)
        time.sleep(0.5)
    op = status.get("operation", {})
    if "failure-cause" in op:
        msg = f"checkpoint failed: {op['failure-cause'].get('stack-trace', '')[:1500]}"
        raise RuntimeError(msg)
    cp_id = op["checkpointId"]
    details = flink_jobs.rest(cfg, f"/jobs/{job_id}/checkpoints/details/{cp_id}")
    vertex = _vertex(flink_jobs.job_details(cfg, job_id), "Deduplicate")["id"]
    sub = flink_jobs.rest(cfg, f"/jobs/{job_id}/checkpoints/details/{cp_id}/subtasks/{vertex}")["subtasks"][0]
    return {
        "id": cp_id,
        "full_bytes": details["state_size"],
        "persisted_bytes": details["checkpointed_size"],
        "end_to_end_s": details["end_to_end_duration"] / 1000,
        "dedup_sync_s": sub["checkpoint"]["sync"] / 1000,
        "dedup_async_s": sub["checkpoint"]["async"] / 1000,
        "dedup_full_bytes": sub["state_size"],
        "dedup_persisted_bytes": sub["checkpointed_size"],
    }


def run_one(backend: str, ids: int, tm_mb: int, echo: Callable[[str], None]) -> dict[str, Any]:
    """One private cluster, one job, N ids: the figures of one row of the table."""
    root = Path(tempfile.mkdtemp(prefix="meterflow-state-"))
    run_id = uuid.uuid4().hex[:8]
    stack = StackConfigs(base_config(run_id, free_ports(9), 1), root)
    # Periodic checkpoints effectively off: the two measured ones are triggered by hand.
    cfg, cfg_path = stack.config(
        "state",
        flink={
            "state_backend": "rocksdb" if backend != "hashmap" else "hashmap",
            "checkpoint_interval": "1d",
            "parallelism": 1,
        },
    )
    cluster = bench_flink_cluster(cfg, tm_options(backend, tm_mb, root))
    result: dict[str, Any] = {
        "backend": backend,
        "ids_target": ids,
        "tm_process_mb": tm_mb,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    overlapped: set[str] = set()
    # Load average over the run: the busy files name known workloads, not every other process.
    result["loadavg_start"] = round(os.getloadavg()[0], 2)
    t0 = time.monotonic()
    try:
        cluster.up()
        (pid,) = cluster.taskmanager_pids()
        heap_before = heap_after_gc(pid)
        args = ["--config", str(cfg_path), "--ids", str(ids), "--live-rate", str(LIVE_RATE)]
        if backend == "forst":
            args += ["--backend", "forst"]
        if backend == NO_BLOOM:
            args += ["--no-bloom-filter"]
        job_id = submit_script(cfg, JOB_SCRIPT, args)
        echo(f"{backend} {ids_label(ids)}: job {job_id} running, ingesting")
        result["ingest_s"] = round(wait_ingested(cfg, job_id, ids, 3 * 3600, lambda: overlapped.update(busy())), 1)
        result["ingest_rate"] = round(ids / result["ingest_s"])
        echo(f"  ingested in {result['ingest_s']} s; checkpoint 1")
        result["checkpoint_first"] = checkpoint(cfg, job_id)
        # Counted once the checkpoint is complete: a checkpoint already pending (Flink may start
        # one on its own during the ingest) delays the one triggered here, and the live ids go on.
        result["ids_in_state"] = dedup_records(cfg, job_id)
        result["heap_live_bytes"] = heap_after_gc(pid) - heap_before
        result["tm_rss_bytes"] = rss(pid)
        result["local_dir_bytes"] = du(root / ("forst" if backend == "forst" else "rocksdb"))
        time.sleep(STEADY_GAP_S)
        echo("  checkpoint 2 (steady state)")
        result["checkpoint_steady"] = checkpoint(cfg, job_id)
        result["ids_in_state_steady"] = dedup_records(cfg, job_id)
        result["checkpoint_dir_bytes"] = du(cfg.path(cfg.flink.checkpoint_dir))
        flink_jobs.cancel(cfg, job_id)
        result["ok"] = True
    except (SystemExit, KeyboardInterrupt) as e:
        # Stopped from outside (SIGTERM, Ctrl-C): recorded with how far the ingest had come.
        result["ok"], result["interrupted"] = False, True
        result["error"] = (
            f"interrupted ({type(e).__name__}) after {time.monotonic() - t0:.0f} s, {_ids_so_far(cfg)} ids in the Deduplicate"
        )
        echo(f"  {result['error']}")
    except Exception as e:  # noqa: BLE001 - a failed size (OOM, missing backend) is a result too
        result["ok"] = False
        result["error"] = f"{type(e).__name__}: {e}"
        echo(f"  failed: {result['error'][:400]}")
        result["tm_log_tail"] = _log_tail(cluster.log_dir)
    finally:
        result["overlapped"] = sorted(overlapped)
        result["loadavg_end"] = round(os.getloadavg()[0], 2)
        result["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)
    return result


def _ids_so_far(cfg: Any) -> str:
    """Rows the running job's Deduplicate has read, or "?" when the cluster does not answer."""
    try:
        (job,) = [j["jid"] for j in flink_jobs.rest(cfg, "/jobs/overview")["jobs"] if j["state"] == "RUNNING"]
        return f"{dedup_records(cfg, job):,}"
    except Exception:  # noqa: BLE001 - best effort, on the way out
        return "?"


def _log_tail(log_dir: Path) -> list[str]:
    """Error lines of the TaskManager logs (OutOfMemoryError, factory errors), last ones."""
    lines: list[str] = []
    for log in sorted(log_dir.glob("*taskexecutor*.log")) + sorted(log_dir.glob("*taskexecutor*.out")):
        lines += [ln for ln in log.read_text(errors="replace").splitlines() if "Error" in ln or "Exception" in ln]
    return lines[-15:]


def machine() -> dict[str, Any]:
    """What the figures ran on."""
    mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    java = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False).stderr.splitlines()[0]
    return {"nproc": len(os.sched_getaffinity(0)), "mem_total": mem.split(":")[1].strip(), "java": java}


def load_results(path: Path = RESULTS) -> dict[str, Any]:
    """The results file (empty when absent)."""
    return json.loads(path.read_text()) if path.exists() else {"runs": []}


def save_run(run: dict[str, Any], path: Path = RESULTS) -> None:
    """Add or replace the run of the same backend and size."""
    data = load_results(path)
    data["machine"] = machine()
    data["runs"] = [
        r for r in data["runs"] if (r["backend"], r["ids_target"]) != (run["backend"], run["ids_target"])
    ] + [run]
    data["runs"].sort(key=lambda r: (r["ids_target"], r["backend"]))
    path.write_text(json.dumps(data, indent=2) + "\n")


def default_tm_mb(backend: str, ids: int) -> int:
    """TaskManager process size: the project's default for RocksDB/ForSt; for heap state, room for the ids.

    About 1.2 GB of the process is not task heap; heap state took ~300 B an id live at 1M, and a
    4,200 MB TaskManager (about 2.9 GB of task heap) thrashed in full GCs near 9.3M ids: 500 B an id leaves
    G1 the free space it needs.
    """
    if backend != "hashmap":
        return DEFAULT_TM_MB
    return max(DEFAULT_TM_MB, 1200 + ids * 500 // 1_000_000)


def memory_mb() -> int:
    """This machine's memory in MB."""
    line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    return int(line.split()[1]) // 1024


def not_run(backend: str, ids: int, tm_mb: int) -> dict[str, Any]:
    """The record of a size that cannot be run here: the TaskManager it would need."""
    error = f"not run: heap state of {ids_label(ids)} ids needs a TaskManager of about {tm_mb:,} MB; this machine has {memory_mb():,} MB in all"
    return {
        "backend": backend,
        "ids_target": ids,
        "tm_process_mb": tm_mb,
        "ok": False,
        "error": error,
        "overlapped": [],
    }


def main(argv: list[str] | None = None) -> None:
    """Run the requested sizes and backends (or print the report)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", default="1M,10M,50M", help="comma-separated sizes, e.g. 1M,10M")
    parser.add_argument(
        "--backends",
        default="hashmap,rocksdb",
        help=f"comma-separated: hashmap, rocksdb, {NO_BLOOM} (RocksDB without Bloom filters, for comparison)",
    )
    parser.add_argument(
        "--forst", action="store_true", help="also try ForSt (state.backend.type: forst) at the smallest size"
    )
    parser.add_argument(
        "--tm-mb", type=int, default=None, help="TaskManager process size in MB (default: per backend and size)"
    )
    parser.add_argument("--report", action="store_true", help="print the Markdown table of the results file and exit")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="with --report: put the table into docs/operations.md and docs/benchmarks.md",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so the private cluster is stopped and its directory removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.report:
        table = render_markdown(load_results(args.results))
        print(table)
        if args.write_docs:
            for doc in DOCS:
                doc.write_text(splice_table(doc.read_text(), table))
        return
    sizes = [parse_ids(s) for s in args.ids.split(",")]
    plan = [(b, n) for n in sizes for b in args.backends.split(",")]
    if args.forst:
        plan.append(("forst", min(sizes)))
    for backend, ids in plan:
        tm_mb = args.tm_mb or default_tm_mb(backend, ids)
        if tm_mb > MAX_MEMORY_SHARE * memory_mb():
            run = not_run(backend, ids, tm_mb)
        else:
            wait_quiet(print)
            run = run_one(backend, ids, tm_mb, print)
        save_run(run, args.results)
        print(json.dumps({k: v for k, v in run.items() if k != "tm_log_tail"}), flush=True)
        if run.get("interrupted"):
            sys.exit(143)


if __name__ == "__main__":
    main(sys.argv[1:])
