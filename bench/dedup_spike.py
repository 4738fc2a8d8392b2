"""The throughput gate: what a keyed JVM dedup stage costs per event, measured alone.

Starts a private Kafka broker (nothing else), produces the benchmark data set (bench/dataset.py,
2M records by default) with the project's producer, then runs bench/DedupSpike.java once per
variant, each in its own JVM (Flink's local mini cluster, parallelism 1):

- ``exchange``: Kafka, the meterflow-avro decoder with its validation, bounded event time and
  watermarks, one keyed exchange on a 128-bit id hash; no state;
- ``dedup`` on RocksDB (the shipped default backend and its options) and on hashmap: the same plus
  the dedup's state access (processing-time TTL of the default 7-day horizon);
- the levers on RocksDB: a Bloom filter over the memtable's keys (``+memtable-bloom``), L0 and L1
  written without compression (``+uncompressed-l0-l1``), both, and a heap Bloom filter that skips
  the state read of an id it has never seen (``dedup+heap-bloom``; not checkpointed in this
  benchmark).

Prints one JSON line per variant and writes bench/results_dedup_spike.json. Steady state is the
second half of the input (JIT warm-up and job start are in the first)::

    .venv/bin/python -m bench.dedup_spike [--events 2000000] [--runs 2]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import click

from bench.dataset import DatasetSpec
from bench.decode_bench import classpath as decoder_classpath
from bench.flamegraph import by_thread, merge, render
from bench.private_stack import base_config
from bench.produce import split_partitions, start_bulk
from bench.profiler import agent_option, chunks_between, extract_library
from meterflow.local.base import REPO_ROOT, free_ports
from meterflow.local.flink import FLINK_CONNECTOR_JARS
from meterflow.local.kafka import KafkaBroker
from meterflow.local.stack import StackConfigs

SOURCE = REPO_ROOT / "bench" / "DedupSpike.java"
RESULTS = REPO_ROOT / "bench" / "results_dedup_spike.json"
VARIANTS = (
    ("exchange", "rocksdb"),
    ("dedup", "rocksdb"),
    ("dedup", "rocksdb+memtable-bloom"),
    ("dedup", "rocksdb+uncompressed-l0-l1"),
    ("dedup", "rocksdb+memtable-bloom+uncompressed-l0-l1"),
    ("dedup+heap-bloom", "rocksdb"),
    ("dedup", "hashmap"),
    # Both keyed stages of the planned job (jvm/ dev.meterflow.stages), not only the dedup.
    ("stages", "rocksdb"),
    ("stages", "hashmap"),
)
FLAME = REPO_ROOT / "docs" / "img" / "flamegraph-dedup-spike.png"
PROFILE_CHUNK_S = 1
# Frames whose inclusive share of the samples the report gives (a sample counts once per label).
FRAMES = (
    ("dedup state get", "RocksDBValueState.value"),
    ("dedup state put", "RocksDBValueState.update"),
    ("RocksDB native calls (JNI, any thread)", "Java_org_rocksdb"),
    ("decode and validate", "UsageEventDecoder"),
    ("keyed exchange, sending", "RecordWriter"),
    (
        "the dedup task's input loop (the exchange's reading and all under it)",
        "StreamTaskNetworkInput",
    ),
    ("Kafka fetch", "KafkaConsumer"),
    ("JIT compiler", "CompileBroker"),
)


def classpath() -> list[Path]:
    """The decoder benchmark's classpath (meterflow-jvm jar, Flink's jars) and the Kafka connector."""
    return [
        *decoder_classpath(),
        *sorted(FLINK_CONNECTOR_JARS.glob("flink-sql-connector-kafka-*.jar")),
    ]


def compile_spike(work: Path) -> Path:
    """Compiled classes (Flink loads the job's functions by name, which a source-file launch cannot serve)."""
    classes = work / "classes"
    subprocess.run(
        [
            "javac",
            "-d",
            str(classes),
            "-cp",
            ":".join(map(str, classpath())),
            str(SOURCE),
        ],
        check=True,
    )
    return classes


def run_variant(
    bootstrap: str,
    topic: str,
    records: int,
    mode: str,
    backend: str,
    work: Path,
    agent: str | None = None,
) -> dict[str, Any]:
    """One run of the Java job in its own JVM (with the profiler's agent when given); its JSON line."""
    checkpoints = work / f"checkpoints-{uuid.uuid4().hex[:6]}"
    checkpoints.mkdir()
    cp = ":".join(map(str, [work / "classes", *classpath()]))
    cmd = [
        "java",
        "-Xms1g",
        "-Xmx1g",
        *([agent] if agent else []),
        "-cp",
        cp,
        "DedupSpike",
        bootstrap,
        topic,
        str(records),
        mode,
        backend,
        str(checkpoints),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise click.ClickException(f"{mode}/{backend} failed:\n{done.stderr[-3000:]}")
    line = next(ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("{"))
    shutil.rmtree(checkpoints, ignore_errors=True)
    return json.loads(line)


def profile_dedup(bootstrap: str, topic: str, records: int, work: Path) -> dict[str, Any]:
    """The RocksDB dedup once more, sampled every millisecond of CPU: the share of each thread and of
    the frames that matter in its steady state, and FLAME (the profile slows the run; its figures are
    not the benchmark's)."""
    out = work / "profile"
    agent = agent_option(extract_library(work / "lib"), out, interval_ms=1, chunk_s=PROFILE_CHUNK_S)
    out.mkdir()
    figures = run_variant(bootstrap, topic, records, "dedup", "rocksdb", work, agent)
    files = chunks_between(
        out,
        figures["steady_from_ms"] / 1000,
        figures["steady_to_ms"] / 1000,
        PROFILE_CHUNK_S,
    )
    stacks = merge(files)
    total = sum(stacks.values()) or 1
    render(stacks, FLAME, "Dedup stage alone (RocksDB, p=1), second half of the input")
    leaves: Counter[str] = Counter()
    for stack, n in stacks.items():
        leaves[Path(stack[-1]).name if stack[-1].startswith("/") else stack[-1]] += (
            n  # a native library by its name, not its temporary path
        )
    shares = {
        "threads": {t: round(n / total, 3) for t, n in by_thread(stacks)[:8]},
        "frames": {
            label: round(
                sum(n for s, n in stacks.items() if any(needle in f for f in s)) / total,
                3,
            )
            for label, needle in FRAMES
        },
        "top_self_frames": {f: round(n / total, 3) for f, n in leaves.most_common(15)},
    }
    click.echo(json.dumps(shares))
    return {"samples": total, **shares}


@click.command()
@click.option(
    "--events",
    default=2_000_000,
    show_default=True,
    help="data set size (records before the closers)",
)
@click.option("--runs", default=2, show_default=True, help="runs of each variant")
@click.option(
    "--results",
    "results_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=RESULTS,
    show_default=True,
    help="where the figures are written",
)
@click.option(
    "--modes",
    default="",
    help="comma-separated modes to run (exchange, dedup, dedup+heap-bloom, stages); default: every variant",
)
@click.option(
    "--profile/--no-profile",
    default=True,
    show_default=True,
    help="one more RocksDB dedup run under async-profiler: CPU by thread and a flame graph of its steady state",
)
def main(events: int, runs: int, results_path: Path, modes: str, profile: bool) -> None:
    """Produce the data set once, then run every variant ``runs`` times and print their figures."""
    work = Path(tempfile.mkdtemp(prefix="meterflow-spike-"))
    run_id = uuid.uuid4().hex[:8]
    stack = StackConfigs(base_config(run_id, free_ports(9), 3), work)
    cfg, _ = stack.config("base")
    broker = KafkaBroker(cfg)
    results: dict[str, Any] = {
        "run": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "events": events,
            "runs": runs,
        },
        "variants": [],
    }
    try:
        compile_spike(work)
        broker.up()
        now_ms = int(time.time() * 1000)
        window_ms = 60_000
        start_ms = now_ms - 2 * 3_600_000
        start_ms -= start_ms % window_ms
        spec = DatasetSpec(
            events=events,
            partitions=cfg.kafka.partitions,
            start_ms=start_ms,
            window_ms=window_ms,
        )
        procs, counter = start_bulk(
            spec,
            now_ms,
            cfg.kafka.bootstrap_servers,
            cfg.kafka.usage_events_topic,
            workers=len(split_partitions(spec.partitions, 2)),
        )
        for p in procs:
            p.join()
        records = spec.events + spec.partitions
        if any(p.exitcode for p in procs) or counter.value != records:
            raise click.ClickException(
                f"production failed: {counter.value} of {records} records acknowledged, exit codes {[p.exitcode for p in procs]}"
            )
        click.echo(f"produced {records} records", err=True)
        for _ in range(runs):
            for mode, backend in [v for v in VARIANTS if not modes or v[0] in modes.split(",")]:
                figures = run_variant(
                    cfg.kafka.bootstrap_servers,
                    cfg.kafka.usage_events_topic,
                    records,
                    mode,
                    backend,
                    work,
                )
                click.echo(json.dumps(figures))
                results["variants"].append(figures)
        if profile:
            results["profile"] = profile_dedup(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic, records, work)
    finally:
        broker.down()
        shutil.rmtree(work, ignore_errors=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
