"""``meterflow billing status/replay/republish/customers`` and ``meterflow reconcile``: the billing ledger."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from meterflow.commands.corrections import parse_bound
from meterflow.commands.root import Context, cli, console, err_console, fmt_qty, pass_ctx
from meterflow.config import JobConfig
from meterflow.config_values import parse_duration

if TYPE_CHECKING:
    from billing.reconcile import Period


@cli.group()
def billing() -> None:
    """The billing ledger: status, customer mapping, replay of dead deliveries."""


@billing.command("status")
@click.option("--dead", "show_dead", is_flag=True, help="Also list every dead delivery with its reason.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_ctx
def billing_status(ctx: Context, show_dead: bool, fmt: str) -> None:
    """Summarise the delivery ledger per destination, kind and status."""
    from sinks.ledger import fetch_deliveries, status_summary

    summary = status_summary(ctx.cfg)
    dead = fetch_deliveries(ctx.cfg, ("dead",)) if show_dead else []
    if fmt == "json":
        rows = [
            dict(
                zip(
                    ("provider", "kind", "status", "deliveries", "quantity", "oldest_window", "last_update"),
                    r,
                    strict=True,
                )
            )
            for r in summary
        ]
        console.print_json(json.dumps({"summary": rows, "dead": [d.__dict__ for d in dead]}, default=str))
        return
    table = Table("destination", "kind", "status", "deliveries", "quantity", "oldest window (UTC)", "last update")
    for provider, kind, status, n, quantity, oldest, updated in summary:
        table.add_row(
            provider,
            kind,
            status,
            str(n),
            fmt_qty(quantity),
            f"{oldest:%Y-%m-%d %H:%M:%S}",
            f"{updated:%Y-%m-%d %H:%M:%S %Z}",
        )
    console.print(table)
    if dead:
        dead_table = Table(
            "identifier", "kind", "tenant", "customer", "meter", "window (UTC)", "quantity", "attempts", "reason"
        )
        for d in dead:
            dead_table.add_row(
                d.identifier,
                d.kind,
                d.tenant_id,
                d.customer_id,
                d.meter,
                f"{d.window_start:%Y-%m-%d %H:%M:%S}",
                fmt_qty(d.quantity),
                str(d.attempts),
                d.last_error or "",
            )
        console.print(dead_table)


@billing.command("replay")
@click.option(
    "--identifier", "identifiers", multiple=True, help="Only these deliveries (repeatable); default: every dead one."
)
@click.option(
    "--include-failed", is_flag=True, help="Also deliveries left failed or pending by a job that no longer runs."
)
@click.option(
    "--force",
    is_flag=True,
    help="Also deliveries first sent longer ago than the provider deduplicates; each is checked at the provider first.",
)
@click.option("--dry-run", is_flag=True, help="List what would be re-sent, send nothing.")
@pass_ctx
def billing_replay(
    ctx: Context, identifiers: tuple[str, ...], include_failed: bool, force: bool, dry_run: bool
) -> None:
    """Re-send dead deliveries with their original identifiers, after the cause was fixed.

    Same identifier and Idempotency-Key as the first attempt, so within the provider's dedup window
    (billing.provider_dedup_window, 24 h at Stripe) the provider never counts a delivery twice.
    A delivery first sent longer ago is refused unless --force; with --force the provider's totals
    are checked first, and the delivery is re-sent only if the provider does not have it (the
    decision is recorded in the ledger). Exits non-zero if any delivery is refused or still dead.
    """
    from billing.routing import delivery_limits
    from meterflow.destinations import STRIPE
    from sinks.ledger import fetch_deliveries

    cfg = ctx.cfg
    statuses = ("dead", "failed", "pending") if include_failed else ("dead",)
    chosen = [d for d in fetch_deliveries(cfg, statuses) if not identifiers or d.identifier in identifiers]
    missing = set(identifiers) - {d.identifier for d in chosen}
    if missing:
        err_console.print(
            f"[yellow]not replayable (unknown, or not in status {'/'.join(statuses)}):[/] {', '.join(sorted(missing))}"
        )
    now = datetime.now(UTC)
    declared = cfg.billing.destination_names()
    refused = {
        d.identifier: reason
        for d in chosen
        if (
            reason := d.replay_refusal(
                now, delivery_limits(cfg, d.provider if d.provider in declared else STRIPE).dedup_window
            )
        )
    }
    for identifier, reason in refused.items():
        err_console.print(f"[red]{'checking at the provider' if force else 'refused'}[/] {identifier}: {reason}")
    if not force:
        chosen = [d for d in chosen if d.identifier not in refused]
    if dry_run or not chosen:
        for d in chosen:
            console.print(
                f"{d.identifier}  {d.kind}  {d.tenant_id}/{d.customer_id}/{d.meter}  {d.window_start:%Y-%m-%d %H:%M:%S}  {d.status}: {d.last_error or ''}"
            )
        err_console.print(f"{len(chosen)} deliveries {'would be ' if dry_run else ''}replayed")
        if refused and not force:
            sys.exit(1)
        return
    import asyncio

    counts = asyncio.run(_replay(cfg, [d.identifier for d in chosen]))
    console.print(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    if counts.get("dead") or (refused and not force):
        sys.exit(1)


async def _replay(cfg: JobConfig, identifiers: list[str]) -> dict[str, int]:
    """Deliver each chosen delivery until sent or dead (in this process, with the job's deliverer)."""
    import asyncio
    import uuid as _uuid

    from billing.deliveries import Dead
    from jobs.deliverers import routed_deliverers

    # Each delivery through the destination that recorded it, as the billing job would.
    deliverers = routed_deliverers(cfg, f"replay-{_uuid.uuid4().hex[:12]}", connections=1, sleep=asyncio.sleep)
    counts: dict[str, int] = defaultdict(int)
    columns = (TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=err_console, disable=not err_console.is_terminal) as progress:
            task = progress.add_task("replay", total=len(identifiers))
            for identifier in identifiers:
                outcome = await deliverers.router.deliver(identifier, replay=True)
                counts[type(outcome).__name__.lower()] += 1
                if isinstance(outcome, Dead):
                    err_console.print(f"[red]still dead[/] {identifier}: {outcome.reason}")
                progress.advance(task)
    finally:
        await deliverers.close()
    return counts


@billing.command("republish")
@click.option("--tenant", default=None, help="Only this tenant.")
@click.option("--since", default=None, help="Only windows starting at or after this (ISO-8601, UTC).")
@click.option("--until", default=None, help="Only windows starting before this (ISO-8601, UTC).")
@click.option(
    "--grace",
    default="2m",
    show_default=True,
    help="Windows finalised more recently than this may still be on their way to billing and are skipped.",
)
@click.option("--dry-run", is_flag=True, help="List what would be published, publish nothing.")
@pass_ctx
def billing_republish(
    ctx: Context, tenant: str | None, since: str | None, until: str | None, grace: str, dry_run: bool
) -> None:
    """Publish again the final windows billing never saw at their final revision.

    A window final in Postgres whose closed-window record never reached billing (its output
    transaction was aborted by Kafka after an outage longer than kafka.transaction_timeout) shows in
    `meterflow reconcile` as not billed, or billed at an older revision. This publishes its final
    row to the closed-windows topic again; the billing job bills it once with its deterministic
    identifier, or bills the difference to what it billed. Running it twice publishes nothing new
    to bill: a window billing has at its final revision is not chosen.
    """
    from billing.reconcile import unpublished
    from connectors.avro_codec import encode_closed_window
    from connectors.kafka_writer import send_values
    from sinks.ledger import fetch_ledger_windows
    from sinks.postgres import fetch_usage

    cfg = ctx.cfg
    try:
        lower, upper = parse_bound(since), parse_bound(until)
    except ValueError as e:
        raise click.BadParameter(f"--since/--until must be ISO-8601 times: {e}") from e
    cutoff = datetime.now(UTC) - parse_duration(grace)
    rows = {
        (r.tenant_id, r.customer_id, r.meter, r.dimensions_key, r.window_start, r.window_end): r
        for r in fetch_usage(cfg.postgres)
        if r.is_final
        and r.updated_at <= cutoff
        and (tenant is None or r.tenant_id == tenant)
        and (lower is None or r.window_start >= lower)
        and (upper is None or r.window_start < upper)
    }
    chosen = [
        rows[k] for k in unpublished(((k, r.revision, r.quantity) for k, r in rows.items()), fetch_ledger_windows(cfg))
    ]
    for r in chosen:
        console.print(
            f"{r.tenant_id}/{r.customer_id}/{r.meter} {r.dimensions_key} {r.window_start:%Y-%m-%d %H:%M:%S}  {fmt_qty(r.quantity)}  revision {r.revision}"
        )
    if dry_run or not chosen:
        err_console.print(
            f"{len(chosen)} final windows {'would be ' if dry_run else ''}published again to {cfg.kafka.closed_windows_topic}"
        )
        return
    records = [
        (
            None,
            encode_closed_window(
                {  # unkeyed, as the usage job writes them
                    "tenant_id": r.tenant_id,
                    "customer_id": r.customer_id,
                    "meter": r.meter,
                    "dimensions_key": r.dimensions_key,
                    "window_start": r.window_start.replace(tzinfo=UTC),
                    "window_end": r.window_end.replace(tzinfo=UTC),
                    "quantity": r.quantity,
                    "event_count": r.event_count,
                    "revision": r.revision,
                }
            ),
        )
        for r in chosen
    ]
    sent = send_values(cfg.kafka.bootstrap_servers, cfg.kafka.closed_windows_topic, records, noun="closed windows")
    err_console.print(
        f"{sent} final windows published again to {cfg.kafka.closed_windows_topic}; the billing job bills them (check with `meterflow reconcile`)"
    )


@billing.group("customers")
def billing_customers() -> None:
    """Which destination bills each tenant's customer, and as which customer there."""


def _month(value: str | None) -> datetime | None:
    """--from: a UTC date (YYYY-MM-DD, the first of a month); None when not given."""
    if value is None:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give a UTC date, YYYY-MM-DD (the first of a month)") from None


_DESTINATION = click.option(
    "--destination",
    default="stripe",
    show_default=True,
    help="stripe, or a destination declared in billing.destinations.",
)
_FROM = click.option(
    "--from",
    "effective_from",
    default=None,
    help="Move the customer to --destination from this UTC month on (YYYY-MM-01): windows starting from then go there, earlier ones stay where they are billed. Refused if the ledger holds a window of theirs from that month or later.",
)


@billing_customers.command("set")
@click.argument("tenant_id")
@click.argument("customer_id")
@click.argument("provider_customer_id")
@_DESTINATION
@_FROM
@pass_ctx
def billing_customers_set(
    ctx: Context,
    tenant_id: str,
    customer_id: str,
    provider_customer_id: str,
    destination: str,
    effective_from: str | None,
) -> None:
    """Map TENANT_ID/CUSTOMER_ID to its customer at the destination (a Stripe cus_... id, a Metronome
    customer id, a Chargebee subscription id)."""
    from sinks.ledger import map_customer

    since = _month(effective_from)
    map_customer(ctx.cfg, tenant_id, customer_id, provider_customer_id, destination, since)
    when = f" from {since:%Y-%m-%d}" if since else ""
    err_console.print(f"{tenant_id}/{customer_id} -> {destination} {provider_customer_id}{when}")


@billing_customers.command("import")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_DESTINATION
@_FROM
@pass_ctx
def billing_customers_import(ctx: Context, csv_file: Path, destination: str, effective_from: str | None) -> None:
    """Map many customers from a CSV with the header tenant_id,customer_id,provider_customer_id, all at one destination.

    Nothing is written if any row is invalid or refused; every problem is listed (exit code 2).
    """
    from billing.deliveries import parse_customer_csv
    from sinks.ledger import map_customers

    mappings, problems = parse_customer_csv(csv_file.read_text())
    for problem in problems:
        err_console.print(f"[red]{csv_file}: {problem}[/]")
    if problems:
        sys.exit(2)
    map_customers(ctx.cfg, mappings, destination, _month(effective_from))
    err_console.print(f"{len(mappings)} customers mapped to {destination}")


@billing_customers.command("list")
@pass_ctx
def billing_customers_list(ctx: Context) -> None:
    """Print every customer mapping, with the month each takes effect from."""
    from sinks.ledger import fetch_customers

    table = Table("tenant", "customer", "destination", "customer there", "from (UTC)")
    for tenant, customer, destination, there, since in fetch_customers(ctx.cfg):
        table.add_row(tenant, customer, destination, there, f"{since:%Y-%m-%d}" if since else "the start")
    console.print(table)


@cli.command()
@click.option(
    "--period",
    type=click.Choice(["period", "day", "month"]),
    default="period",
    show_default=True,
    help="Total per customer's billing period (its cycle, `meterflow cycles`; calendar months in UTC without one), "
    "per the customer's local day, or per calendar month in UTC.",
)
@click.option("--tenant", default=None, help="Only this tenant.")
@click.option(
    "--since",
    default=None,
    help="Only windows starting at or after this (ISO-8601, UTC), e.g. when billing was switched on.",
)
@click.option("--until", default=None, help="Only windows starting before this (ISO-8601, UTC).")
@click.option(
    "--grace",
    default="2m",
    show_default=True,
    help="Windows finalised more recently than this may still be in flight and are skipped.",
)
@click.option(
    "--provider-totals",
    is_flag=True,
    help="Also ask the provider for each customer's monthly meter totals and compare them with the values sent.",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_ctx
def reconcile(
    ctx: Context,
    period: Period,
    tenant: str | None,
    since: str | None,
    until: str | None,
    grace: str,
    provider_totals: bool,
    fmt: str,
) -> None:
    """Compare final windows in Postgres with what the ledger says the provider accepted.

    A window counts as billed with its own meter event plus its corrections (a changed final
    value is billed as the difference, late events as a correction of their window); it is owed
    its final value plus its applied or approved corrections from late events. Every correction is
    listed. The values sent are checked against each meter's rounding: a carried meter's values
    of a billing period (the customer's cycle) add up to the whole part of their quantities. Exits 1 and lists every
    discrepancy (window not billed, billed with another quantity, billed without a final window,
    values sent that break the rounding); exits 0 when they agree.

    With --provider-totals, each month's total the provider reports for a customer's meter (its
    meter event summaries) is compared with the values the ledger says it accepted; a difference
    (usage sent outside meterflow, an event the provider lost or counts differently) is listed and
    exits 1 too. Months with a value accepted within --grace (the provider's summaries may lag), or
    with a delivery still pending or failed (its call may have reached the provider), are skipped;
    --tenant keeps the provider customers mapped for that tenant.
    """
    from billing.reconcile import corrections_of, value_discrepancies
    from billing.reconcile import reconcile as compare
    from sinks.ledger import fetch_reconciliation_input

    try:
        lower, upper = parse_bound(since), parse_bound(until)
    except ValueError as e:
        raise click.BadParameter(f"--since/--until must be ISO-8601 times: {e}") from e
    found = fetch_reconciliation_input(ctx.cfg, parse_duration(grace))

    def chosen(rows: list) -> list:
        return [
            w
            for w in rows
            if (tenant is None or w.tenant_id == tenant)
            and (lower is None or w.window_start >= lower)
            and (upper is None or w.window_start < upper)
        ]

    ledger = chosen(found.ledger)
    totals, discrepancies = compare(chosen(found.finals), ledger, period, chosen(found.late_corrections), found.cycles)
    # Values are checked per whole billing period (a carried meter's rule holds over its period).
    roundings = {m.name: m.billing_rounding for m in ctx.cfg.meters}
    months = value_discrepancies(
        [w for w in found.ledger if tenant is None or w.tenant_id == tenant], roundings, found.cycles
    )
    # Every billing period (the customer's cycle) the bounds touch.
    discrepancies += [
        d for d in months if (upper is None or d.window_start < upper) and (lower is None or d.window_end > lower)
    ]
    corrections = corrections_of(ledger)
    at_provider = _provider_differences(ctx.cfg, parse_duration(grace), tenant, lower, upper) if provider_totals else []
    if fmt == "json":
        report = {
            "periods": [t.__dict__ for t in totals],
            "corrections": [c.__dict__ for c in corrections],
            "discrepancies": [d.__dict__ for d in discrepancies],
        }
        if provider_totals:
            report["provider_differences"] = [{**d.__dict__, "detail": d.detail} for d in at_provider]
        console.print_json(json.dumps(report, default=str))
    else:
        table = Table(
            "destination",
            "tenant",
            "customer",
            "meter",
            "period",
            "windows",
            "corrections",
            "final quantity",
            "billed quantity",
            "agrees",
        )
        for t in totals:
            table.add_row(
                t.destination or "none",
                t.tenant_id,
                t.customer_id,
                t.meter,
                t.period,
                str(t.windows),
                str(t.corrections),
                fmt_qty(t.final_quantity),
                fmt_qty(t.billed_quantity),
                "yes" if t.agrees else "[red]no[/]",
            )
        console.print(table)
        if corrections:
            fixes = Table(
                "tenant",
                "customer",
                "meter",
                "dimensions",
                "window (UTC)",
                "origin",
                "revision",
                "correction",
                "status",
                title="corrections (billed as the difference)",
            )
            for c in corrections:
                fixes.add_row(
                    c.tenant_id,
                    c.customer_id,
                    c.meter,
                    c.dimensions_key,
                    f"{c.window_start:%Y-%m-%d %H:%M:%S}-{c.window_end:%H:%M:%S}",
                    c.origin,
                    str(c.revision),
                    fmt_qty(c.quantity),
                    c.status,
                )
            console.print(fixes)
        if discrepancies:
            issues = Table(
                "kind",
                "destination",
                "tenant",
                "customer",
                "meter",
                "dimensions",
                "window (UTC)",
                "final",
                "billed",
                "detail",
            )
            for d in discrepancies:
                q = [("" if v is None else fmt_qty(v)) for v in (d.final_quantity, d.billed_quantity)]
                issues.add_row(
                    d.kind,
                    d.destination or "none",
                    d.tenant_id,
                    d.customer_id,
                    d.meter,
                    d.dimensions_key,
                    f"{d.window_start:%Y-%m-%d %H:%M:%S}-{d.window_end:%H:%M:%S}",
                    *q,
                    d.detail,
                )
            console.print(issues)
        if at_provider:
            differing = Table(
                "provider customer",
                "event name",
                "month",
                "values sent",
                "provider total",
                title="the provider's totals differ from the values sent",
            )
            for p in at_provider:
                differing.add_row(
                    p.provider_customer_id, p.event_name, f"{p.month:%Y-%m}", fmt_qty(p.sent), fmt_qty(p.provider_total)
                )
            console.print(differing)
    if at_provider:
        err_console.print(
            f"[red]{len(at_provider)} months[/] where the provider's total differs from the values the ledger sent"
        )
    if discrepancies or at_provider:
        if discrepancies:
            err_console.print(
                f"[red]{len(discrepancies)} discrepancies[/] between final windows and the billing ledger"
            )
        sys.exit(1)
    err_console.print(
        f"final windows and the billing ledger agree ({sum(t.windows for t in totals)} windows)"
        + ("; so do the provider's monthly totals" if provider_totals else "")
    )


def _provider_differences(
    cfg: JobConfig, grace: timedelta, tenant: str | None, lower: datetime | None, upper: datetime | None
) -> list:
    """Each settled month's provider total against the values sent (reconcile --provider-totals)."""
    import asyncio

    from billing.reconcile import provider_differences, summary_bounds
    from billing.whole_values import billing_period_start
    from connectors.stripe_stream import meter_events_provider
    from sinks.ledger import fetch_customers, fetch_sent_groups

    now = datetime.now(UTC)
    cutoff = now - grace
    customers = {
        m[3] for m in fetch_customers(cfg) if m[2] == cfg.billing.provider and (tenant is None or m[0] == tenant)
    }
    first = billing_period_start(lower).replace(tzinfo=None) if lower is not None else None
    groups = [
        g
        for g in fetch_sent_groups(cfg)
        if g.provider_customer_id in customers
        and g.last_sent_at <= cutoff
        and not g.unsettled
        and (first is None or g.month >= first)
        and (upper is None or g.month < upper)
    ]
    ahead = int(cfg.billing.max_window_ahead.total_seconds())

    async def ask() -> dict:
        provider = meter_events_provider(cfg)
        try:
            return {
                (g.provider_customer_id, g.event_name, g.month): await provider.total(
                    g.event_name, g.provider_customer_id, *summary_bounds(g.month, now, ahead)
                )
                for g in groups
            }
        finally:
            await provider.close()

    return provider_differences(groups, asyncio.run(ask()) if groups else {})
