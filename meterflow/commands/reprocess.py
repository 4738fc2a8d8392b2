"""The ``meterflow reprocess`` command: recompute a closed period from the usage-events topic into a
shadow table, show the difference per customer, and bill only the difference on request."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

import click
from rich.table import Table

from meterflow.commands.corrections import parse_bound
from meterflow.commands.root import Context, cli, console, err_console, fmt_qty, pass_ctx
from meterflow.errors import CorrectionError


@cli.command("reprocess")
@click.option("--since", required=True, help="First window start of the period (ISO-8601, UTC; on a window boundary).")
@click.option(
    "--until",
    required=True,
    help="End of the period, exclusive (ISO-8601, UTC; on a window boundary; every window closed).",
)
@click.option(
    "--shadow-table",
    default=None,
    help="Table of the recomputed windows (default: <postgres.usage_table>_reprocessed).",
)
@click.option(
    "--bill",
    is_flag=True,
    help="Record a correction per window that differs, billed by the billing job like any correction.",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_ctx
def reprocess(ctx: Context, since: str, until: str, shadow_table: str | None, bill: bool, fmt: str) -> None:
    """Recompute the period's windows from the usage-events topic (every unique event counted, late
    or not) and compare each with what was metered: its final row plus its corrections (late events,
    earlier reprocesses). Exit 1 when windows differ and --bill was not given.

    With --bill, each window that differs gets one correction for the difference (recorded with its
    owed meter event, in one transaction, under the corrections' lock), so nothing already billed is
    billed again and a second run finds nothing. Refused while the usage job has not read the topic
    as far as the recomputation did, or late events of the period wait in the late-events topic
    (run `meterflow corrections apply` first), or a window of the period has no final row.
    """
    from connectors.kafka_admin import committed_offsets
    from connectors.kafka_reader import first_retained, read_from
    from jobs.reprocess_job import recompute
    from meterflow.commands.corrections import read_new_late_events
    from meterflow.corrections import approval_threshold
    from meterflow.local.flink import table_jobs_jars
    from meterflow.reprocess import per_customer, read_from_ms, reprocess_correction, reprocess_period, retention_gaps
    from sinks.reprocess_store import bill_differences, compare, unrecorded, write_shadow

    cfg = ctx.cfg
    try:
        lower, upper = parse_bound(since), parse_bound(until)
    except ValueError as e:
        raise click.BadParameter(f"--since/--until must be ISO-8601 times: {e}") from e
    assert lower is not None and upper is not None  # noqa: S101 - both options are required
    period = reprocess_period(lower, upper, cfg, datetime.now(UTC))
    table = shadow_table or f"{cfg.postgres.usage_table}_reprocessed"
    gaps = retention_gaps(
        first_retained(cfg.kafka.bootstrap_servers, cfg.kafka.usage_events_topic), read_from_ms(period, cfg)
    )
    if gaps:
        msg = (
            f"{cfg.kafka.usage_events_topic} no longer keeps the start of {period.label} in partitions {gaps} (retention deleted it): "
            "a recomputation would miss those events and bill them away; reprocess a later period"
        )
        raise CorrectionError(msg)
    jars = table_jobs_jars()
    err_console.print(f"recomputing {period.label} from {cfg.kafka.usage_events_topic} ...")
    recomputed_from = datetime.now(UTC)
    recomputed = recompute(cfg, period, jars)
    write_shadow(cfg, table, period, recomputed)
    metered, found = compare(cfg, period, recomputed)
    if metered.other_sizes:
        err_console.print(
            f"[yellow]{metered.other_sizes} usage rows or corrections overlap the period in windows of another size: they are not compared, and --bill is refused[/]"
        )
    customers = per_customer(recomputed, metered.values, found)
    recorded = []
    if bill and found:
        # Whatever the job has not read yet, or late events not yet recorded, would be billed here
        # and again when the job or `corrections apply` gets to them.
        unread = next(
            read_from(
                cfg.kafka.bootstrap_servers,
                cfg.kafka.usage_events_topic,
                committed_offsets(cfg.kafka.bootstrap_servers, cfg.kafka.consumer_group, cfg.kafka.usage_events_topic),
            ),
            None,
        )
        if unread is not None:
            msg = f"the usage job (consumer group {cfg.kafka.consumer_group}) has not read {cfg.kafka.usage_events_topic} to its end (partition {unread[0]} from offset {unread[1]}): bill once it has"
            raise CorrectionError(msg)
        waiting = unrecorded(
            cfg, [e for e in read_new_late_events(cfg) if period.since <= e.window.window_start < period.until]
        )
        if waiting:
            msg = f"{len(waiting)} late events of {period.label} are not recorded as corrections yet: run `meterflow corrections apply` first"
            raise CorrectionError(msg)
        max_age, max_ahead = cfg.billing.max_window_age, cfg.billing.max_window_ahead

        def correction(d):  # noqa: ANN001, ANN202 - a WindowDifference to its Correction
            threshold = approval_threshold(cfg.corrections, d.window.tenant_id)
            return reprocess_correction(d, period, datetime.now(UTC), max_age, max_ahead, threshold)

        recorded = bill_differences(cfg, period, recomputed, correction, datetime.now(UTC), recomputed_from)
    if fmt == "json":
        report = {
            "period": {"since": period.since.isoformat(), "until": period.until.isoformat()},
            "shadow_table": table,
            "windows": {"recomputed": len(recomputed), "metered": len(metered.values), "differing": len(found)},
            "customers": [
                {
                    "tenant_id": c.tenant_id,
                    "customer_id": c.customer_id,
                    "meter": c.meter,
                    "windows_differing": c.windows,
                    "metered": str(c.metered),
                    "recomputed": str(c.recomputed),
                    "difference": str(c.difference),
                }
                for c in customers
            ],
            "differences": [
                {
                    "tenant_id": d.window.tenant_id,
                    "customer_id": d.window.customer_id,
                    "meter": d.window.meter,
                    "dimensions_key": d.window.dimensions_key,
                    "window_start": d.window.window_start.isoformat(sep=" "),
                    "window_end": d.window.window_end.isoformat(sep=" "),
                    "metered": str(d.metered),
                    "recomputed": str(d.recomputed),
                    "difference": str(d.delta),
                }
                for d in found
            ],
            "billed": [
                {"correction_id": c.correction_id, "status": c.status, "delta": str(c.delta), "reason": c.reason}
                for c in recorded
            ],
        }
        console.print_json(json.dumps(report))
    else:
        view = Table(
            "tenant",
            "customer",
            "meter",
            "windows differing",
            "metered",
            "recomputed",
            "difference",
            title=f"reprocess {period.label}",
        )
        for c in customers:
            view.add_row(
                c.tenant_id,
                c.customer_id,
                c.meter,
                str(c.windows),
                fmt_qty(c.metered),
                fmt_qty(c.recomputed),
                fmt_qty(c.difference) if c.difference else "",
            )
        console.print(view)
    err_console.print(
        f"{len(recomputed)} windows recomputed into {table}; {len(found)} differ from what was metered"
        + (f"; {len(recorded)} corrections recorded" if bill else "")
    )
    if found and not bill:
        sys.exit(1)
