"""The ``meterflow corrections`` commands: apply late events as corrections, list, approve, reject."""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import click
from rich.table import Table

from meterflow.commands.root import Context, cli, console, err_console, fmt_qty, pass_ctx
from meterflow.config import JobConfig
from meterflow.corrections import (
    CORRECTION_STATUSES,
    LateEvent,
    Plan,
    late_event_from_record,
)


def utc_now() -> datetime:
    """The commands' clock (aware UTC)."""
    return datetime.now(UTC)


def parse_bound(value: str | None) -> datetime | None:
    """An ISO-8601 bound as naive UTC (a naive input is taken as UTC)."""
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed.astimezone(UTC).replace(tzinfo=None) if parsed.tzinfo else parsed


def late_event_decoder() -> Callable[[bytes], dict[str, Any]]:
    """Decodes one record of the late-events topic (plain Avro; raises on malformed bytes)."""
    import io

    import fastavro

    from connectors.avro_codec import read_record
    from connectors.avro_types import load_schema
    from jobs.plan import LATE_EVENT_SCHEMA

    schema = fastavro.parse_schema(load_schema(LATE_EVENT_SCHEMA))
    return lambda value: read_record(io.BytesIO(value), schema)


def read_late_events(cfg: JobConfig, topic: str | None = None) -> list[dict[str, Any]]:
    """Every committed record of the late-events topic, decoded (read_committed)."""
    from connectors.kafka_reader import read_committed

    return list(read_committed(cfg.kafka.bootstrap_servers, topic or cfg.kafka.late_events_topic, late_event_decoder()))


def read_new_late_events(cfg: JobConfig, topic: str | None = None) -> list[LateEvent]:
    """The late events after the offsets the last incremental run stored (read_committed), each with its position."""
    from connectors.kafka_reader import read_from
    from sinks.corrections_store import stored_offsets

    decode = late_event_decoder()
    topic = topic or cfg.kafka.late_events_topic
    return [
        late_event_from_record(decode(value), cfg, (partition, offset))
        for partition, offset, value in read_from(cfg.kafka.bootstrap_servers, topic, stored_offsets(cfg, topic))
    ]


def late_events_in_range(
    records: list[dict[str, Any]], cfg: JobConfig, since: datetime | None, until: datetime | None
) -> list[LateEvent]:
    """Typed late events with event_time in [since, until), in topic order."""
    from meterflow.late_audit import select

    return [late_event_from_record(r, cfg) for r in select(records, since=since, until=until)]


def corrected_quantities(cfg: JobConfig, rows: list[Any]) -> list[Decimal]:
    """``usage``: each usage row's quantity plus the deltas of its applied and approved corrections."""
    from meterflow.corrections import WindowId, corrected_totals
    from sinks.corrections_store import counted_deltas

    deltas = {w: d for w, (d, _) in counted_deltas(cfg).items()}
    keys = [WindowId(r.tenant_id, r.customer_id, r.meter, r.dimensions_key, r.window_start, r.window_end) for r in rows]
    totals = corrected_totals(zip(keys, (r.quantity for r in rows), strict=True), deltas)
    return [totals[k] for k in keys]


def recorded_outcomes(cfg: JobConfig) -> dict[tuple[str, str], str]:
    """``late-audit``: what ``corrections apply`` recorded per late event (empty before its first run)."""
    from sinks.corrections_store import event_outcomes

    return event_outcomes(cfg)


@cli.group()
def corrections() -> None:
    """Corrections from late events: apply, list, approve, reject (README, "Late events and corrections")."""


@corrections.command("apply")
@click.option("--since", default=None, help="Only late events with event_time >= this (ISO-8601, UTC).")
@click.option("--until", default=None, help="Only late events with event_time < this (ISO-8601, UTC).")
@click.option("--dry-run", is_flag=True, help="Compute the corrections against the database, record none.")
@click.option("--topic", default=None, help="Late-events topic (default kafka.late_events_topic).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option(
    "--resume",
    is_flag=True,
    help="Read only the late events after the offsets the last --resume run stored (stored with each batch).",
)
@click.option("--follow", is_flag=True, help="Keep going: a --resume run every --interval until interrupted.")
@click.option(
    "--interval", default=None, help="Pause between runs with --follow (default corrections.follow_interval)."
)
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="With --follow: serve Prometheus metrics on this port (default corrections.metrics_port; 0: none).",
)
@pass_ctx
def corrections_apply(
    ctx: Context,
    since: str | None,
    until: str | None,
    dry_run: bool,
    topic: str | None,
    fmt: str,
    resume: bool,
    follow: bool,
    interval: str | None,
    metrics_port: int | None,
) -> None:
    """Turn late events into corrections, each event at most once.

    Reads the late-events topic read_committed; one Postgres transaction per batch
    (corrections.batch_size) records the corrections and their events, so running again, or over an
    overlapping range, adds nothing for events already recorded. --resume reads only what is new
    since the last --resume run (its place is stored per partition in each batch's transaction);
    --follow makes a --resume run every --interval and serves the follower's metrics (how many late
    events wait for their window's final row, and for how long, against the late topic's retention).
    """
    import time

    from meterflow.config_values import parse_duration

    pause = parse_duration(interval) if interval else ctx.cfg.corrections.follow_interval
    incremental = resume or follow
    if incremental and (since or until or dry_run):
        msg = "--resume/--follow read everything new once: they don't combine with --since, --until or --dry-run"
        raise click.UsageError(msg)

    from sinks.corrections_store import apply_corrections_schema

    # Once per process, not per --follow pass: with billing on it includes the ledger's DDL.
    apply_corrections_schema(ctx.cfg)  # idempotent; a dry run reads the same tables

    metrics = None
    if follow:
        from meterflow.commands.corrections_metrics import FollowerMetrics

        metrics = FollowerMetrics(ctx.cfg, topic or ctx.cfg.kafka.late_events_topic)
        port = ctx.cfg.corrections.metrics_port if metrics_port is None else metrics_port
        if port:
            try:
                metrics.serve(port)
            except OSError as e:  # the corrections still run; the alert on the missing target says so
                err_console.print(f"[red]corrections follower: metrics not served, port {port}: {e}[/]")
            else:
                err_console.print(
                    f"corrections follower: a run every {pause.total_seconds():g}s, metrics on :{port}/metrics"
                )

    def once() -> None:
        plans = run_apply(
            ctx.cfg,
            since=parse_bound(since),
            until=parse_bound(until),
            dry_run=dry_run,
            topic=topic,
            fmt=fmt,
            now=utc_now,
            incremental=incremental,
        )
        if metrics is not None:
            metrics.read_retention()
            metrics.observe(plans, utc_now().replace(tzinfo=None))

    if follow:
        repeat(once, time.sleep, pause.total_seconds())
    else:
        once()


def repeat(step: Callable[[], None], sleep: Callable[[float], None], pause_s: float, runs: int | None = None) -> int:
    """Run ``step`` then pause, ``runs`` times (forever when None); an error in a step ends the loop
    with that error. Returns the number of runs."""
    done = 0
    while runs is None or done < runs:
        step()
        done += 1
        if runs is None or done < runs:
            sleep(pause_s)
    return done


def run_apply(
    cfg: JobConfig,
    *,
    since: datetime | None,
    until: datetime | None,
    dry_run: bool,
    topic: str | None,
    fmt: str,
    now: Callable[[], datetime],
    incremental: bool = False,
) -> list[Plan]:
    """``corrections apply``: read, plan and record; prints the corrections made (or that would be).

    The tables must exist (``apply_corrections_schema``). ``incremental``: only the late events after
    the stored offsets, and store the new ones with each batch.
    """
    from sinks.corrections_store import ResumePoint, apply_all

    if incremental:
        events, resume = read_new_late_events(cfg, topic), ResumePoint(topic or cfg.kafka.late_events_topic)
    else:
        events, resume = late_events_in_range(read_late_events(cfg, topic), cfg, since, until), None
    plans = apply_all(cfg, events, now(), dry_run=dry_run, resume=resume)
    made = [c for p in plans for c in p.corrections]
    totals: dict[str, int] = {}
    for p in plans:
        for k, v in p.summary.items():
            totals[k] = totals.get(k, 0) + v
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "dry_run": dry_run,
                    "incremental": incremental,
                    "late_events": len(events),
                    "summary": totals,
                    "corrections": [_correction_json(c) for c in made],
                },
                indent=2,
            )
        )
    else:
        _print_corrections(
            [(c, None) for c in made],
            title="corrections (dry run, nothing written)" if dry_run else "corrections recorded",
        )
    verb = "would record" if dry_run else "recorded"
    err_console.print(
        f"{len(events)} {'new late events' if incremental else 'late events in range'}: {verb} {len(made)} corrections "
        f"({', '.join(f'{totals.get(s, 0)} {s}' for s in ('applied', 'pending', 'reported'))}); "
        f"{totals.get('known_events', 0)} already recorded, {totals.get('not_corrected_events', 0)} not correctable, "
        f"{totals.get('deferred_events', 0)} left for a later run (window not final yet)"
    )
    return plans


def _correction_json(c: Any) -> dict[str, Any]:
    w = c.window
    return {
        "correction_id": c.correction_id,
        "tenant_id": w.tenant_id,
        "customer_id": w.customer_id,
        "meter": w.meter,
        "dimensions_key": w.dimensions_key,
        "window_start": w.window_start.isoformat(sep=" "),
        "window_end": w.window_end.isoformat(sep=" "),
        "delta": format(c.delta, "f"),
        "events": c.events,
        "status": c.status,
        "reason": c.reason,
    }


def _print_corrections(rows: list[tuple[Any, datetime | None]], title: str) -> None:
    table = Table(
        "tenant",
        "customer",
        "meter",
        "dimensions",
        "window (UTC)",
        "delta",
        "events",
        "status",
        "reason",
        "applied at",
        title=title,
    )
    table.add_column("correction", overflow="fold", min_width=len("cor-0000000000000-") + 40)
    for c, applied_at in rows:
        w = c.window
        table.add_row(
            w.tenant_id,
            w.customer_id,
            w.meter,
            "" if w.dimensions_key == "{}" else w.dimensions_key,
            f"{w.window_start:%Y-%m-%d %H:%M:%S}-{w.window_end:%H:%M:%S}",
            fmt_qty(c.delta),
            str(c.events),
            c.status,
            c.reason,
            f"{applied_at:%Y-%m-%d %H:%M:%S %Z}" if applied_at else "",
            c.correction_id,
        )
    console.print(table)


@corrections.command("list")
@click.option("--tenant", default=None, help="Only this tenant.")
@click.option("--status", type=click.Choice(CORRECTION_STATUSES), default=None, help="Only corrections in this status.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_ctx
def corrections_list(ctx: Context, tenant: str | None, status: str | None, fmt: str) -> None:
    """List recorded corrections, oldest window first."""
    from sinks.corrections_store import apply_corrections_schema, fetch_corrections

    apply_corrections_schema(ctx.cfg)
    rows = fetch_corrections(ctx.cfg, tenant, status)
    if fmt == "json":
        click.echo(
            json.dumps(
                [
                    {
                        **_correction_json(r.correction),
                        "applied_at": r.applied_at.isoformat(),
                        "decided_by": r.decided_by,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    _print_corrections([(r.correction, r.applied_at) for r in rows], title="corrections")


def _decision_command(action: Literal["approve", "reject"], help_text: str) -> None:
    """Register ``corrections <action> CORRECTION_ID [--note]``: both decisions take the same arguments."""

    @corrections.command(action, help=help_text)
    @click.argument("correction_id")
    @click.option("--note", default=None, help="Why (kept with the decision).")
    @pass_ctx
    def decide_command(ctx: Context, correction_id: str, note: str | None) -> None:
        from sinks.corrections_store import decide

        status = decide(ctx.cfg, correction_id, action, getpass.getuser(), note, utc_now())
        err_console.print(f"correction {correction_id} is {status}")


_decision_command("approve", "Approve a correction held for approval: its delta then counts in the corrected total.")
_decision_command(
    "reject", "Reject a pending or applied correction: its delta no longer counts; its events stay recorded."
)
