"""``meterflow serve`` (the HTTP service: meterflow/serve/) and ``meterflow api-keys`` (tenants' keys)."""

from __future__ import annotations

import click
from rich.table import Table

from meterflow.commands.root import Context, cli, console, err_console, pass_ctx


@cli.command("serve")
@click.option("--host", default=None, help="Listen address (default serve.host).")
@click.option("--port", type=int, default=None, help="Listen port (default serve.port).")
@pass_ctx
def serve(ctx: Context, host: str | None, port: int | None) -> None:
    """Run the HTTP service: POST /v1/events writes usage events to the input topic (README, "HTTP ingest")."""
    import uvicorn

    from connectors.event_writer import KafkaEventWriter
    from meterflow.serve.app import KeyCache, create_app
    from sinks.api_keys import tenant_of

    cfg = ctx.cfg
    writer = KafkaEventWriter(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic)
    keys = KeyCache(lambda digest: tenant_of(cfg, digest), cfg.serve.key_cache_ttl.total_seconds())
    try:
        uvicorn.run(
            create_app(cfg, writer, keys),
            host=host or cfg.serve.host,
            port=port or cfg.serve.port,
            log_level="warning",
            # The API key travels in a header; uvicorn's access log never prints headers.
            access_log=False,
        )
    finally:
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
