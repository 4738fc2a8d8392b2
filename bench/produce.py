"""Fast bulk production with the project's producer (connectors.producer.send_events), one process per
share of the partitions, and steady-rate production that records each event's produce time."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.dataset import (
    CLOSER_TENANT,
    DatasetSpec,
    Record,
    closers,
    generate,
    partition_of,
    quantity_nanos,
    to_usage_event,
)
from connectors.avro_codec import UsageEvent
from connectors.producer import send_events


def split_partitions(partitions: int, workers: int) -> list[tuple[int, ...]]:
    """Round-robin shares of the partitions, one per worker (no empty shares)."""
    workers = max(1, min(workers, partitions))
    return [tuple(p for p in range(partitions) if p % workers == k) for k in range(workers)]


def _partition_for(partitions: int) -> Callable[[int, UsageEvent], int]:
    def choose(_: int, event: UsageEvent) -> int:
        if event["tenant_id"] == CLOSER_TENANT:
            return int(event["customer_id"][1:])
        return partition_of(event["tenant_id"], event["customer_id"], partitions)

    return choose


def _bulk_worker(
    spec: DatasetSpec, share: tuple[int, ...], closer_ms: int, bootstrap: str, topic: str, counter: mp.Value
) -> None:  # type: ignore[valid-type]  # multiprocessing.Value is a factory, typed as a function
    def on_sent(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    records: Iterator[Record] = (r for r in generate(spec) if r.partition in share)
    tail = [c for c in closers(closer_ms, spec.partitions) if c.partition in share]
    events = (to_usage_event(r) for r in _chain(records, tail))
    # The record timestamp is the produce time, as from any producer; the event time is in the payload.
    send_events(bootstrap, topic, events, on_sent=on_sent, partition_for=_partition_for(spec.partitions))


def _chain(first: Iterator[Record], second: list[Record]) -> Iterator[Record]:
    yield from first
    yield from second


def start_bulk(
    spec: DatasetSpec, closer_ms: int, bootstrap: str, topic: str, workers: int = 2
) -> tuple[list[mp.Process], mp.Value]:  # type: ignore[valid-type]  # multiprocessing.Value is a factory, typed as a function
    """Start producer processes for the data set plus closers; returns them and a shared sent counter."""
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    procs = [
        ctx.Process(target=_bulk_worker, args=(spec, share, closer_ms, bootstrap, topic, counter), daemon=True)
        for share in split_partitions(spec.partitions, workers)
    ]
    for p in procs:
        p.start()
    return procs, counter


@dataclass(frozen=True)
class SteadySpec:
    """Steady-rate live traffic for the freshness phase."""

    rate: float = 20_000
    seconds: float = 30
    tenants: int = 10
    customers: int = 100
    meters: tuple[str, ...] = ("api_calls", "tokens")
    partitions: int = 3
    window_ms: int = 60_000
    seed: int = 23


def _steady_worker(
    spec: SteadySpec, share: tuple[int, ...], rate: float, bootstrap: str, topic: str, out: Path, counter: mp.Value
) -> None:  # type: ignore[valid-type]  # multiprocessing.Value is a factory, typed as a function
    rng = random.Random(spec.seed + share[0])
    customers = [
        (f"tenant-{t}", f"cust-{c}")
        for t in range(spec.tenants)
        for c in range(spec.customers)
        if partition_of(f"tenant-{t}", f"cust-{c}", spec.partitions) in share
    ]
    produced: list[tuple[tuple[str, str, str, int], float]] = []

    def events() -> Iterator[UsageEvent]:
        deadline = time.time() + spec.seconds
        i = 0
        while True:
            now = time.time()
            if now >= deadline:
                return
            tenant, customer = customers[rng.randrange(len(customers))]
            meter = spec.meters[rng.randrange(len(spec.meters))]
            at_ms = int(now * 1000)
            produced.append(((tenant, customer, meter, at_ms - at_ms % spec.window_ms), now))
            i += 1
            yield to_usage_event(
                Record(f"live-{share[0]}-{i}", tenant, customer, meter, quantity_nanos(meter, rng), at_ms, 0)
            )

    def on_sent(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    send_events(bootstrap, topic, events(), rate=rate, on_sent=on_sent, partition_for=_partition_for(spec.partitions))
    out.write_bytes(pickle.dumps(produced))


def start_steady(
    spec: SteadySpec, bootstrap: str, topic: str, out_dir: Path, workers: int = 2
) -> tuple[list[mp.Process], list[Path], mp.Value]:  # type: ignore[valid-type]  # multiprocessing.Value is a factory, typed as a function
    """Start steady producers (the rate split between them); each writes (window key, produce time) pairs to a file."""
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    shares = split_partitions(spec.partitions, workers)
    outs = [out_dir / f"produced-{k}.pickle" for k in range(len(shares))]
    procs = [
        ctx.Process(
            target=_steady_worker,
            args=(spec, share, spec.rate / len(shares), bootstrap, topic, out, counter),
            daemon=True,
        )
        for share, out in zip(shares, outs, strict=True)
    ]
    for p in procs:
        p.start()
    return procs, outs, counter
