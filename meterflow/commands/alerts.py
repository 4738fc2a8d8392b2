"""``meterflow alerts``: tenants' threshold rules and webhook endpoints, the crossings' ledger, replay."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

import click
from rich.table import Table

from meterflow.alerts import BASES, PERIODS, STATUSES, AlertRule, new_signing_secret
from meterflow.commands.root import Context, cli, console, err_console, pass_ctx


def _connected(ctx: Context) -> Any:
    from sinks import alerts_store
    from sinks.postgres import connect

    conn = connect(ctx.cfg.postgres)
    conn.autocommit = True
    alerts_store.apply_alerts_schema(conn, ctx.cfg.alerts)
    return conn


@cli.group()
def alerts() -> None:
    """Threshold alerts: rules per tenant, each crossing delivered once as a signed webhook (README, "Threshold alerts")."""


@alerts.group("rules")
def rules_group() -> None:
    """A tenant's rules: a meter's usage per billing period or day reaching a threshold."""


@rules_group.command("add")
@click.argument("tenant_id")
@click.argument("rule_id")
@click.option("--meter", required=True)
@click.option("--threshold", required=True, help="A positive decimal, in the meter's units.")
@click.option("--period", type=click.Choice(PERIODS), default="billing_period", show_default=True)
@click.option(
    "--basis",
    type=click.Choice(BASES),
    default="provisional",
    show_default=True,
    help="provisional: every window so far; final: closed windows only.",
)
@pass_ctx
def rules_add(ctx: Context, tenant_id: str, rule_id: str, meter: str, threshold: str, period: str, basis: str) -> None:
    """Add RULE_ID for TENANT_ID: it holds for every customer of the tenant."""
    from sinks import alerts_store

    try:
        rule = AlertRule(rule_id, tenant_id, meter, Decimal(threshold), period, basis)  # type: ignore[arg-type]
    except (ValueError, InvalidOperation) as e:
        raise click.BadParameter(str(e)) from e
    with _connected(ctx) as conn:
        alerts_store.add_rule(conn, ctx.cfg.alerts, rule)
    err_console.print(f"rule {rule_id} for {tenant_id}: {meter} >= {threshold} per {period} ({basis})")


@rules_group.command("list")
@click.option("--tenant", default=None)
@pass_ctx
def rules_list(ctx: Context, tenant: str | None) -> None:
    """Every rule (of one tenant)."""
    from sinks import alerts_store

    table = Table("tenant", "rule", "meter", "threshold", "period", "basis")
    with _connected(ctx) as conn:
        for r in alerts_store.rules(conn, ctx.cfg.alerts, tenant):
            table.add_row(r.tenant_id, r.rule_id, r.meter, format(r.threshold.normalize(), "f"), r.period, r.basis)
    console.print(table)


@rules_group.command("remove")
@click.argument("tenant_id")
@click.argument("rule_id")
@pass_ctx
def rules_remove(ctx: Context, tenant_id: str, rule_id: str) -> None:
    """Remove a rule (its crossings stay in the ledger)."""
    from sinks import alerts_store

    with _connected(ctx) as conn:
        err_console.print(f"{alerts_store.remove_rule(conn, ctx.cfg.alerts, tenant_id, rule_id)} rule(s) removed")


@alerts.command("endpoint")
@click.argument("tenant_id")
@click.argument("url")
@pass_ctx
def endpoint_set(ctx: Context, tenant_id: str, url: str) -> None:
    """Send TENANT_ID's alerts to URL, signed with a new secret printed once (the receiver verifies with it)."""
    import httpx

    from sinks import alerts_store

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise click.BadParameter(f"not a URL: {e}") from e
    if parsed.scheme not in ("https", "http") or not parsed.host:
        raise click.BadParameter("the webhook URL is http(s)://host/...")
    secret = new_signing_secret()
    with _connected(ctx) as conn:
        alerts_store.set_endpoint(conn, ctx.cfg.alerts, tenant_id, url, secret)
    err_console.print(f"webhooks of {tenant_id} go to {url}; their signing secret (shown once):")
    click.echo(secret)


@alerts.command("list")
@click.option("--status", type=click.Choice(STATUSES), default=None)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_ctx
def crossings_list(ctx: Context, status: str | None, fmt: str) -> None:
    """The ledger: each crossing, its webhook's status, attempts and last error."""
    from sinks import alerts_store

    with _connected(ctx) as conn:
        rows = alerts_store.crossings(conn, ctx.cfg.alerts, status)
    if fmt == "json":
        for row in rows:
            click.echo(json.dumps(row, default=str))
        return
    table = Table("crossing", "tenant", "customer", "rule", "period start", "total", "status", "attempts", "last error")
    for r in rows:
        table.add_row(
            r["crossing_id"],
            r["tenant_id"],
            r["customer_id"],
            r["rule_id"],
            f"{r['period_start']:%Y-%m-%d %H:%M}",
            format(r["total"].normalize(), "f"),
            r["status"],
            str(r["attempts"]),
            r["last_error"] or "",
        )
    console.print(table)


@alerts.command("replay")
@click.option("--crossing", "crossing_id", default=None, help="One dead crossing (default: every dead one).")
@pass_ctx
def crossings_replay(ctx: Context, crossing_id: str | None) -> None:
    """Deliver dead webhooks again, with fresh attempts and their original webhook-id."""
    from sinks import alerts_store

    with _connected(ctx) as conn:
        n = alerts_store.replay(conn, ctx.cfg.alerts, crossing_id)
    err_console.print(f"{n} dead crossing(s) due again; meterflow serve delivers them")
