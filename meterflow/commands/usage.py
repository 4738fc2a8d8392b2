"""``meterflow usage``: windowed usage from Postgres."""

from __future__ import annotations

import json
from decimal import Decimal

import click
from rich.table import Table

from meterflow.commands.root import Context, cli, console, pass_ctx


@cli.command()
@click.option("--tenant", default=None, help="Only this tenant (prefix match).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_ctx
def usage(ctx: Context, tenant: str | None, fmt: str) -> None:
    """Print windowed usage from Postgres."""
    from sinks.postgres import fetch_usage

    rows = [r for r in fetch_usage(ctx.cfg.postgres) if tenant is None or r.tenant_id.startswith(tenant)]
    if fmt == "json":
        for r in rows:
            console.print_json(json.dumps({**r.__dict__, "quantity": format(r.quantity, "f")}, default=str))
        return
    print_usage(rows)


def print_usage(rows: list) -> None:
    """Print usage rows (sinks.postgres.UsageRow) as a table."""
    table = Table("tenant", "customer", "meter", "dimensions", "window (UTC)", "quantity", "events", "rev", "final")
    for r in rows:
        window = f"{r.window_start:%Y-%m-%d %H:%M:%S}-{r.window_end:%H:%M:%S}"
        table.add_row(r.tenant_id, r.customer_id, r.meter, "" if r.dimensions_key == "{}" else r.dimensions_key, window, fmt_qty(r.quantity), str(r.event_count), str(r.revision), "yes" if r.is_final else "no")
    console.print(table)


def fmt_qty(q: Decimal) -> str:
    """A quantity without exponent or trailing zeros."""
    return format(q.normalize(), "f")
