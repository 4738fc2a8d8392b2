"""``meterflow late-audit``: the late-events topic per tenant, customer, meter and window (meterflow/late_audit.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from meterflow.commands.corrections import parse_bound
from meterflow.commands.root import Context, cli, console, err_console, pass_ctx

if TYPE_CHECKING:
    from meterflow.late_audit import GroupBy


@cli.command("late-audit")
@click.option("--tenant", default=None, help="Only this tenant.")
@click.option("--since", default=None, help="Only events with event_time >= this (ISO-8601, UTC).")
@click.option("--until", default=None, help="Only events with event_time < this (ISO-8601, UTC).")
@click.option(
    "--by", "group_by", type=click.Choice(["window", "customer", "tenant"]), default="window", show_default=True
)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option(
    "--histogram", type=click.Path(dir_okay=False), default=None, help="Also write a PNG histogram of lateness here."
)
@click.option("--topic", default=None, help="Late-events topic (default kafka.late_events_topic).")
@pass_ctx
def late_audit(
    ctx: Context,
    tenant: str | None,
    since: str | None,
    until: str | None,
    group_by: GroupBy,
    fmt: str,
    histogram: str | None,
    topic: str | None,
) -> None:
    """Audit the late-events topic: count, quantity and lateness per tenant/customer/meter/window.

    Reads committed records only (read_committed), from the beginning of the topic.
    """
    from connectors.kafka_reader import read_committed
    from meterflow.commands.corrections import late_event_decoder
    from meterflow.late_audit import select, summarize, to_csv, to_json, write_histogram

    cfg = ctx.cfg
    topic = topic or cfg.kafka.late_events_topic
    columns = (TextColumn("reading late events"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("read", total=None)
        records = list(
            read_committed(
                cfg.kafka.bootstrap_servers,
                topic,
                late_event_decoder(),
                on_progress=lambda n, total: progress.update(task, completed=n, total=total),
            )
        )
    bound = {"since": parse_bound(since), "until": parse_bound(until)}
    chosen = select(records, tenant=tenant, since=bound["since"], until=bound["until"])
    from meterflow.commands.corrections import recorded_outcomes

    rows = summarize(chosen, by=group_by, outcomes=recorded_outcomes(cfg))
    if fmt == "csv":
        click.echo(to_csv(rows), nl=False)
    elif fmt == "json":
        click.echo(to_json(rows))
    else:
        table = Table(
            "tenant",
            "customer",
            "meter",
            "window start (UTC)",
            "late events",
            "quantity",
            "p50 ms",
            "p90 ms",
            "max ms",
            "corrected",
            "not correctable",
            title=f"late events in {topic}",
        )
        for r in rows:
            table.add_row(
                r.tenant_id,
                r.customer_id,
                r.meter,
                r.window_start,
                str(r.count),
                format(r.quantity, "f"),
                str(r.lateness_p50_ms),
                str(r.lateness_p90_ms),
                str(r.lateness_max_ms),
                str(r.corrected),
                str(r.not_corrected),
            )
        console.print(table)
    err_console.print(f"{len(chosen)} late events selected of {len(records)} in {topic}")
    if histogram:
        if not chosen:
            err_console.print("no late events: no histogram written")
        else:
            write_histogram([int(r["lateness_ms"]) for r in chosen], histogram)
            err_console.print(f"histogram written to {histogram}")
