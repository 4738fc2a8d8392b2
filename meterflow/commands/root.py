"""The root of the ``meterflow`` command line: the group, its shared context and the consoles."""

from __future__ import annotations

import os
import sys
from decimal import Decimal
from pathlib import Path

import click
from rich.console import Console

from meterflow.config import (
    CONFIG_PATH_ENV,
    DEFAULT_CONFIG_FILE,
    JobConfig,
    load_config,
)

# Wide enough for the usage table when output is not a terminal (CI logs, pipes).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


class Context:
    """Config path and lazily loaded config shared by subcommands."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._cfg: JobConfig | None = None

    @property
    def cfg(self) -> JobConfig:
        if self._cfg is None:
            self._cfg = load_config(self.config_path)
        return self._cfg

    def reload(self) -> JobConfig:
        self._cfg = None
        return self.cfg

    @property
    def resolved_path(self) -> Path:
        return Path(self.config_path or os.environ.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_FILE).resolve()


pass_ctx = click.make_pass_decorator(Context)


@click.group()
@click.option(
    "--config",
    "config_path",
    envvar="METERFLOW_CONFIG",
    default=None,
    help="YAML config file (default ./meterflow.yaml).",
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """meterflow: billing-grade usage metering on Apache Flink."""
    ctx.obj = Context(config_path)


def fmt_qty(q: Decimal) -> str:
    """A quantity without exponent or trailing zeros."""
    return format(q.normalize(), "f")
