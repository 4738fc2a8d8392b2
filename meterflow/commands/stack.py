"""``meterflow stack up/down/status``: the local stack (meterflow/local/)."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.table import Table

from meterflow.commands.root import Context, cli, console, err_console, pass_ctx
from meterflow.config import JobConfig


@cli.group()
def stack() -> None:
    """Run the local stack: Kafka (KRaft), Postgres and a Flink session cluster."""


def stack_up(ctx: Context) -> JobConfig:
    """Generate secrets on first use, then start every part of the stack."""
    from meterflow.local.stack import LocalStack, ensure_secrets

    if ensure_secrets(ctx.cfg):
        err_console.print(f"generated Postgres password in {ctx.cfg.path(ctx.cfg.secrets_file)}")
        ctx.reload()
    LocalStack(ctx.cfg, config_file(ctx)).up(echo=lambda m: err_console.print(m))
    return ctx.cfg


def config_file(ctx: Context) -> Path | None:
    """The config file the HTTP service is started on (None: defaults only, no file to hand it)."""
    path = ctx.resolved_path
    return path if path.is_file() else None


@stack.command("up")
@pass_ctx
def stack_up_cmd(ctx: Context) -> None:
    """Start (or confirm) Kafka, Postgres, Flink, Prometheus and `meterflow serve`; waits until each answers."""
    stack_up(ctx)
    _print_status(ctx)


@stack.command("down")
@pass_ctx
def stack_down(ctx: Context) -> None:
    """Stop Flink, Kafka and Postgres (state stays in the state directory)."""
    from meterflow.local.stack import LocalStack

    LocalStack(ctx.cfg).down()
    err_console.print("stack is down")


@stack.command("status")
@pass_ctx
def stack_status(ctx: Context) -> None:
    """Show which parts of the stack are running; exit 1 if any part this config uses is not."""
    if not _print_status(ctx):
        sys.exit(1)


def _print_status(ctx: Context) -> bool:
    from meterflow.local.stack import LocalStack

    table = Table("component", "state", "address", "detail")
    statuses = LocalStack(ctx.cfg, config_file(ctx)).status()
    for s in statuses:
        state = "[green]running[/]" if s.running else ("[red]stopped[/]" if s.wanted else "stopped")
        table.add_row(s.name, state, s.address, s.detail)
    console.print(table)
    return all(s.running for s in statuses if s.wanted)
