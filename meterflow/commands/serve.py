"""``meterflow serve`` (the HTTP service: meterflow/serve/), ``meterflow api-keys`` (tenants' keys) and
``meterflow cycles`` (customers' billing cycles)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click
from rich.table import Table

from meterflow.commands.root import Context, cli, console, err_console, pass_ctx


@cli.command("serve")
@click.option("--host", default=None, help="Listen address (default serve.host).")
@click.option("--port", type=int, default=None, help="Listen port (default serve.port).")
@pass_ctx
def serve(ctx: Context, host: str | None, port: int | None) -> None:
    """Run the HTTP service: POST /v1/events writes usage events to the input topic, GET
    /v1/customers/{id}/usage reads usage, /usage/{id} is a customer's page (README, "HTTP service")."""
    import logging

    import uvicorn
    from prometheus_client import CollectorRegistry

    from connectors.event_writer import KafkaEventWriter
    from meterflow.serve.alerts_worker import AlertWorker
    from meterflow.serve.app import KeyCache, create_app
    from meterflow.serve.usage_reader import UsageReader, writer_pool
    from sinks.api_keys import tenant_of

    cfg = ctx.cfg
    # The alerts worker logs each crossing and failed webhook to the service's output.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("meterflow.alerts").setLevel(logging.INFO)
    writer = KafkaEventWriter(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic)
    keys = KeyCache(lambda digest: tenant_of(cfg, digest), cfg.serve.key_cache_ttl.total_seconds())
    # Opened and closed by the app, in the event loop it reads in.
    reader = UsageReader(cfg)
    registry = CollectorRegistry()
    alerts_pool = writer_pool(cfg)
    worker = AlertWorker(cfg, alerts_pool.connection, registry) if cfg.alerts.enabled else None
    if worker is not None:
        alerts_pool.open(wait=True, timeout=30)
        worker.start()
    try:
        uvicorn.run(
            create_app(cfg, writer, keys, reader, registry=registry),
            host=host or cfg.serve.host,
            port=port or cfg.serve.port,
            log_level="warning",
            # The API key travels in a header; uvicorn's access log never prints headers.
            access_log=False,
        )
    finally:
        if worker is not None:
            worker.stop()
        alerts_pool.close()
        writer.close()


@cli.group("api-keys")
def api_keys() -> None:
    """Tenants' API keys for the HTTP service, stored hashed."""


@api_keys.command("create")
@click.argument("tenant_id")
@click.option("--name", default="default", show_default=True, help="A name to revoke it by.")
@pass_ctx
def api_keys_create(ctx: Context, tenant_id: str, name: str) -> None:
    """Create a key for TENANT_ID and print it once (only its hash is kept)."""
    from meterflow.serve.ingest import hash_api_key, new_api_key
    from sinks.api_keys import create_key

    key = new_api_key()
    create_key(ctx.cfg, hash_api_key(key), tenant_id, name)
    err_console.print(f"key {name!r} for tenant {tenant_id} (shown once; only its hash is stored):")
    click.echo(key)


@api_keys.command("revoke")
@click.argument("tenant_id")
@click.argument("name")
@pass_ctx
def api_keys_revoke(ctx: Context, tenant_id: str, name: str) -> None:
    """Revoke TENANT_ID's keys named NAME (the service stops taking them within serve.key_cache_ttl)."""
    from sinks.api_keys import revoke_keys

    err_console.print(f"{revoke_keys(ctx.cfg, tenant_id, name)} key(s) revoked")


@api_keys.command("list")
@pass_ctx
def api_keys_list(ctx: Context) -> None:
    """Every key's tenant, name and dates (never the key)."""
    from sinks.api_keys import list_keys

    table = Table("tenant", "name", "created", "revoked")
    for tenant, name, created, revoked in list_keys(ctx.cfg):
        table.add_row(
            tenant, name, f"{created:%Y-%m-%d %H:%M:%S %Z}", f"{revoked:%Y-%m-%d %H:%M:%S %Z}" if revoked else ""
        )
    console.print(table)


@cli.group("cycles")
def cycles() -> None:
    """Customers' billing cycles: a calendar month or an anniversary day, in the customer's timezone."""


@cycles.command("set")
@click.argument("tenant_id")
@click.argument("customer_id")
@click.option(
    "--anchor-day",
    type=click.IntRange(1, 31),
    default=None,
    help="Anniversary: each period starts on this day (the month's last day in a shorter month).",
)
@click.option("--calendar", "calendar_month", is_flag=True, help="Calendar months (the default when none is set).")
@click.option("--timezone", "tz", default="UTC", show_default=True, help="IANA timezone the periods and days are in.")
@pass_ctx
def cycles_set(
    ctx: Context, tenant_id: str, customer_id: str, anchor_day: int | None, calendar_month: bool, tz: str
) -> None:
    """Set CUSTOMER_ID's billing cycle: the usage API's periods and days follow it."""
    from meterflow.billing_cycle import BillingCycle
    from meterflow.serve.usage_reader import set_cycle

    if calendar_month == (anchor_day is not None):
        raise click.UsageError("give one of --anchor-day N or --calendar")
    try:
        cycle = BillingCycle(anchor_day, tz)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--timezone/--anchor-day") from e
    set_cycle(ctx.cfg, tenant_id, customer_id, cycle)
    start, end = cycle.period_of(datetime.now(UTC).replace(tzinfo=None))
    err_console.print(
        f"{tenant_id}/{customer_id}: {cycle.anchor} cycle in {cycle.timezone}; current period {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
    )


@cycles.command("show")
@click.argument("tenant_id")
@click.argument("customer_id")
@pass_ctx
def cycles_show(ctx: Context, tenant_id: str, customer_id: str) -> None:
    """CUSTOMER_ID's billing cycle and its current period (UTC)."""
    from meterflow.serve.usage_reader import cycle_of

    cycle = cycle_of(ctx.cfg, tenant_id, customer_id)
    start, end = cycle.period_of(datetime.now(UTC).replace(tzinfo=None))
    click.echo(
        json.dumps(
            {
                "anchor": cycle.anchor,
                "anchor_day": cycle.anchor_day,
                "timezone": cycle.timezone,
                "period_start": f"{start:%Y-%m-%dT%H:%M:%S}Z",
                "period_end": f"{end:%Y-%m-%dT%H:%M:%S}Z",
            }
        )
    )
