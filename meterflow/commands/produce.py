"""``meterflow produce``: Avro usage events, synthetic or from a JSON-lines file, to the input topic."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from meterflow.commands.root import Context, cli, err_console, pass_ctx
from meterflow.config import JobConfig
from meterflow.config_values import parse_duration


@cli.command()
@click.option("--count", default=1000, show_default=True, help="Synthetic events to generate.")
@click.option("--tenants", default=2, show_default=True)
@click.option("--customers", default=5, show_default=True, help="Customers per tenant.")
@click.option("--meters", default="api_calls,tokens", show_default=True, help="Comma-separated meter names.")
@click.option("--rate", default=0.0, show_default=True, help="Events per second (0 = as fast as possible).")
@click.option("--span", default="8m", show_default=True, help="Event-time span of synthetic events.")
@click.option("--start", default=None, help="Event time of the first synthetic event (ISO-8601; default now - 10m).")
@click.option("--seed", default=7, show_default=True)
@click.option(
    "--file", "jsonl", type=click.Path(path_type=Path), default=None, help="Send events from a JSON-lines file instead."
)
@click.option("--topic", default=None, help="Target topic (default kafka.usage_events_topic).")
@pass_ctx
def produce(
    ctx: Context,
    count: int,
    tenants: int,
    customers: int,
    meters: str,
    rate: float,
    span: str,
    start: str | None,
    seed: int,
    jsonl: Path | None,
    topic: str | None,
) -> None:
    """Write Avro usage events to the input topic, with a progress bar.

    From a JSON-lines file, invalid lines, and lines that break the input contract (the job's
    limits on ids, dimensions and quantity), are not sent: each is reported with its line number and
    reason and saved to <file>.rejected.jsonl; the command then exits 2.
    """
    from connectors.producer import (
        RejectedLine,
        SyntheticSpec,
        read_jsonl,
        synthetic_events,
    )

    cfg = ctx.cfg
    rejected: list[RejectedLine] = []
    if jsonl is not None:
        events = list(read_jsonl(jsonl, rejected))
    else:
        spec = SyntheticSpec(
            count=count,
            tenants=tenants,
            customers=customers,
            meters=tuple(m.strip() for m in meters.split(",") if m.strip()),
            start=datetime.fromisoformat(start).astimezone(UTC) if start else datetime.now(UTC) - timedelta(minutes=10),
            span=parse_duration(span),
            seed=seed,
        )
        events = list(synthetic_events(spec))
    sent = send_with_progress(cfg, topic or cfg.kafka.usage_events_topic, events, rate)
    err_console.print(f"sent {sent} events to {topic or cfg.kafka.usage_events_topic}")
    if rejected and jsonl is not None:  # records are rejected only when read from a file
        out = jsonl.with_suffix(jsonl.suffix + ".rejected.jsonl")
        with out.open("w") as handle:
            for r in rejected:
                handle.write(json.dumps({"line": r.line_number, "reason": r.reason, "text": r.text}) + "\n")
                err_console.print(f"[red]line {r.line_number}: {escape(r.reason)}[/]")  # a reason may quote "[...]"
        err_console.print(f"{len(rejected)} invalid line(s) not sent; saved with reasons to {out}")
        sys.exit(2)


def send_with_progress(cfg: JobConfig, topic: str, events: list, rate: float) -> int:
    """Send ``events`` to ``topic`` with a progress bar on stderr; the number sent."""
    from connectors.producer import send_events

    columns = (TextColumn("producing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(
        *columns, console=err_console, transient=False, disable=not err_console.is_terminal and len(events) < 10_000
    ) as progress:
        task = progress.add_task("produce", total=len(events))
        return send_events(
            cfg.kafka.bootstrap_servers, topic, events, rate=rate, on_sent=lambda n: progress.advance(task, n)
        )
