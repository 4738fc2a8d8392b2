"""The ``meterflow`` command line: one module per command group, all registered on ``root.cli``.

``stack`` (the local stack), ``produce``, ``job`` (submit, jobs, stop), ``usage``, ``late_audit``,
``billing`` (billing status/replay/customers, reconcile), ``corrections`` (apply, list, approve,
reject), ``reprocess``, ``dead_letters`` (list, replay), ``tune``, ``demo``, ``serve`` (the HTTP service, ``api-keys``, ``cycles``) and ``alerts`` (threshold alerts).
"""

from __future__ import annotations

import sys

from meterflow.commands import (  # noqa: F401 - importing registers the commands
    alerts,
    billing,
    corrections,
    dead_letters,
    demo,
    job,
    late_audit,
    produce,
    reprocess,
    serve,
    stack,
    tune,
    usage,
)
from meterflow.commands.root import cli, err_console
from meterflow.errors import MeterflowError

__all__ = ["cli", "main"]


def main() -> None:
    """Entry point: turn MeterflowError into a clear message and exit code 1."""
    try:
        cli(standalone_mode=True)
    except MeterflowError as e:
        err_console.print(f"[red]error:[/] {e}")
        sys.exit(1)
