"""``meterflow usage``: windowed usage from Postgres."""

from __future__ import annotations

import json
from decimal import Decimal

import click
from rich.table import Table

from meterflow.commands.root import Context, cli, console, fmt_qty, pass_ctx


@cli.command()
@click.option("--tenant", default=None, help="Only this tenant (prefix match).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_ctx
def usage(ctx: Context, tenant: str | None, fmt: str) -> None:
    """Print windowed usage from Postgres."""
    from meterflow.commands.corrections import corrected_quantities
    from sinks.postgres import fetch_usage

    rows = [r for r in fetch_usage(ctx.cfg.postgres) if tenant is None or r.tenant_id.startswith(tenant)]
    corrected = corrected_quantities(ctx.cfg, rows)
    if fmt == "json":
        for r, c in zip(rows, corrected, strict=True):
            console.print_json(
                json.dumps(
                    {**r.__dict__, "quantity": format(r.quantity, "f"), "corrected_quantity": format(c, "f")},
                    default=str,
                )
            )
        return
    print_usage(rows, corrected)


def print_usage(rows: list, corrected: list[Decimal] | None = None) -> None:
    """Print usage rows (sinks.postgres.UsageRow) as a table, with their corrected totals when given."""
    table = Table(
        "tenant", "customer", "meter", "dimensions", "window (UTC)", "quantity", "corrected", "events", "rev", "final"
    )
    for i, r in enumerate(rows):
        window = f"{r.window_start:%Y-%m-%d %H:%M:%S}-{r.window_end:%H:%M:%S}"
        fixed = "" if corrected is None or corrected[i] == r.quantity else fmt_qty(corrected[i])
        table.add_row(
            r.tenant_id,
            r.customer_id,
            r.meter,
            "" if r.dimensions_key == "{}" else r.dimensions_key,
            window,
            fmt_qty(r.quantity),
            fixed,
            str(r.event_count),
            str(r.revision),
            "yes" if r.is_final else "no",
        )
    console.print(table)
