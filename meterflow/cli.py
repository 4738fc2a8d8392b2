"""The ``meterflow`` command line: local stack, producer, job submission, usage and the demo."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from meterflow.config import JobConfig, load_config, parse_duration
from meterflow.errors import MeterflowError

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
        import os

        from meterflow.config import CONFIG_PATH_ENV, DEFAULT_CONFIG_FILE

        return Path(self.config_path or os.environ.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_FILE).resolve()


pass_ctx = click.make_pass_decorator(Context)


@click.group()
@click.option("--config", "config_path", envvar="METERFLOW_CONFIG", default=None, help="YAML config file (default ./meterflow.yaml).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """meterflow: billing-grade usage metering on Apache Flink."""
    ctx.obj = Context(config_path)


# ---------------------------------------------------------------- stack


@cli.group()
def stack() -> None:
    """Run the local stack: Kafka (KRaft), Postgres and a Flink session cluster."""


def stack_up(ctx: Context) -> JobConfig:
    """Generate secrets on first use, then start every part of the stack."""
    from meterflow.stack import LocalStack, ensure_secrets

    if ensure_secrets(ctx.cfg):
        err_console.print(f"generated Postgres password in {ctx.cfg.path(ctx.cfg.secrets_file)}")
        ctx.reload()
    LocalStack(ctx.cfg).up(echo=lambda m: err_console.print(m))
    return ctx.cfg


@stack.command("up")
@pass_ctx
def stack_up_cmd(ctx: Context) -> None:
    """Start (or confirm) Kafka, Postgres and Flink; waits until each answers."""
    stack_up(ctx)
    _print_status(ctx.cfg)


@stack.command("down")
@pass_ctx
def stack_down(ctx: Context) -> None:
    """Stop Flink, Kafka and Postgres (state stays in the state directory)."""
    from meterflow.stack import LocalStack

    LocalStack(ctx.cfg).down()
    err_console.print("stack is down")


@stack.command("status")
@pass_ctx
def stack_status(ctx: Context) -> None:
    """Show which parts of the stack are running; exit 1 if any is not."""
    if not _print_status(ctx.cfg):
        sys.exit(1)


def _print_status(cfg: JobConfig) -> bool:
    from meterflow.stack import LocalStack

    table = Table("component", "state", "address", "detail")
    statuses = LocalStack(cfg).status()
    for s in statuses:
        table.add_row(s.name, "[green]running[/]" if s.running else "[red]stopped[/]", s.address, s.detail)
    console.print(table)
    return all(s.running for s in statuses)


# ---------------------------------------------------------------- produce


@cli.command()
@click.option("--count", default=1000, show_default=True, help="Synthetic events to generate.")
@click.option("--tenants", default=2, show_default=True)
@click.option("--customers", default=5, show_default=True, help="Customers per tenant.")
@click.option("--meters", default="api_calls,tokens", show_default=True, help="Comma-separated meter names.")
@click.option("--rate", default=0.0, show_default=True, help="Events per second (0 = as fast as possible).")
@click.option("--span", default="8m", show_default=True, help="Event-time span of synthetic events.")
@click.option("--start", default=None, help="Event time of the first synthetic event (ISO-8601; default now - 10m).")
@click.option("--seed", default=7, show_default=True)
@click.option("--file", "jsonl", type=click.Path(path_type=Path), default=None, help="Send events from a JSON-lines file instead.")
@click.option("--topic", default=None, help="Target topic (default kafka.usage_events_topic).")
@pass_ctx
def produce(ctx: Context, count: int, tenants: int, customers: int, meters: str, rate: float, span: str, start: str | None, seed: int, jsonl: Path | None, topic: str | None) -> None:
    """Write Avro usage events to the input topic, with a progress bar.

    From a JSON-lines file, invalid lines are not sent: each is reported with its line number and
    reason and saved to <file>.rejected.jsonl; the command then exits 2.
    """
    from meterflow.producer import RejectedLine, SyntheticSpec, read_jsonl, send_events, synthetic_events

    cfg = ctx.cfg
    rejected: list[RejectedLine] = []
    if jsonl is not None:
        events = list(read_jsonl(jsonl, rejected))
    else:
        spec = SyntheticSpec(
            count=count,
            tenants=tenants,
            customers=customers,
            meters=tuple(m.strip() for m in meters.split(",") if m.strip()),
            start=datetime.fromisoformat(start).astimezone(UTC) if start else datetime.now(UTC) - timedelta(minutes=10),
            span=parse_duration(span),
            seed=seed,
        )
        events = list(synthetic_events(spec))
    sent = _send_with_progress(cfg, topic or cfg.kafka.usage_events_topic, events, rate)
    err_console.print(f"sent {sent} events to {topic or cfg.kafka.usage_events_topic}")
    if rejected:
        out = jsonl.with_suffix(jsonl.suffix + ".rejected.jsonl")  # type: ignore[union-attr]
        with out.open("w") as handle:
            for r in rejected:
                handle.write(json.dumps({"line": r.line_number, "reason": r.reason, "text": r.text}) + "\n")
                err_console.print(f"[red]line {r.line_number}: {r.reason}[/]")
        err_console.print(f"{len(rejected)} invalid line(s) not sent; saved with reasons to {out}")
        sys.exit(2)


def _send_with_progress(cfg: JobConfig, topic: str, events: list, rate: float) -> int:
    from meterflow.producer import send_events

    columns = (TextColumn("producing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=False, disable=not err_console.is_terminal and len(events) < 10_000) as progress:
        task = progress.add_task("produce", total=len(events))
        return send_events(cfg.kafka.bootstrap_servers, topic, events, rate=rate, on_sent=lambda n: progress.advance(task, n))


# ---------------------------------------------------------------- job


@cli.command()
@click.option("--savepoint", default=None, help="Start the usage job from this savepoint or retained checkpoint.")
@click.option("--billing-savepoint", default=None, help="Start the billing job from this savepoint or retained checkpoint.")
@click.option("--force", is_flag=True, help="Submit even if a job with the same name is running.")
@pass_ctx
def submit(ctx: Context, savepoint: str | None, billing_savepoint: str | None, force: bool) -> None:
    """Submit the usage job and, with billing.enabled, the billing job; wait until they run.

    flink run -py jobs/usage_job.py, then flink run -py jobs/billing_job.py (which reads the usage
    job's closed-windows topic). A job already running under its name is left alone.
    """
    _submit_jobs(ctx, savepoint=savepoint, billing_savepoint=billing_savepoint, force=force)


def _submit_jobs(ctx: Context, *, savepoint: str | None = None, billing_savepoint: str | None = None, force: bool = False) -> None:
    from meterflow import flink_jobs

    cfg = ctx.cfg
    plan = [(cfg.flink.job_name, flink_jobs.submit, savepoint)]
    if cfg.billing.enabled:
        plan.append((cfg.billing_job_name, flink_jobs.submit_billing, billing_savepoint))
    for name, submit_job, start_from in plan:
        existing = flink_jobs.running_jobs(cfg, name)
        if existing and not force:
            err_console.print(f"job {name} already running: {existing[0]['jid']} (use --force to submit another)")
            continue
        with err_console.status(f"submitting {name} ..."):
            job_id = submit_job(cfg, ctx.resolved_path, savepoint=start_from)
        err_console.print(f"{name} submitted")
        console.print(job_id)


@cli.command()
@pass_ctx
def jobs(ctx: Context) -> None:
    """List the cluster's jobs; this config's usage and billing jobs are marked."""
    from meterflow import flink_jobs

    cfg = ctx.cfg
    roles = {cfg.flink.job_name: "usage", cfg.billing_job_name: "billing"}
    table = Table("job id", "name", "role", "state", "started")
    for j in flink_jobs.list_jobs(cfg):
        table.add_row(j["jid"], j["name"], roles.get(j["name"], ""), j["state"], datetime.fromtimestamp(j["start-time"] / 1000, UTC).isoformat(timespec="seconds"))
    console.print(table)


@cli.command()
@click.argument("job_id", required=False)
@click.option("--savepoint", is_flag=True, help="Stop with a savepoint and print its path (for upgrades).")
@pass_ctx
def stop(ctx: Context, job_id: str | None, savepoint: bool) -> None:
    """Stop the running usage and billing jobs (or JOB_ID): cancel, or stop with a savepoint.

    The usage job stops first, so the billing job has read every window it published.
    """
    from meterflow import flink_jobs

    cfg = ctx.cfg
    names = [cfg.flink.job_name, cfg.billing_job_name]  # the billing job too when billing was just switched off
    ids = [job_id] if job_id else [j["jid"] for name in names for j in flink_jobs.running_jobs(cfg, name)]
    if not ids:
        err_console.print("no running job")
        return
    for jid in ids:
        if savepoint:
            console.print(f"{jid}: {flink_jobs.stop_with_savepoint(cfg, jid)}")
        else:
            flink_jobs.cancel(cfg, jid)
            err_console.print(f"cancelled {jid}")


# ---------------------------------------------------------------- usage


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
    _print_usage(rows)


def _print_usage(rows: list) -> None:
    table = Table("tenant", "customer", "meter", "dimensions", "window (UTC)", "quantity", "events", "rev", "final")
    for r in rows:
        window = f"{r.window_start:%Y-%m-%d %H:%M:%S}-{r.window_end:%H:%M:%S}"
        table.add_row(r.tenant_id, r.customer_id, r.meter, "" if r.dimensions_key == "{}" else r.dimensions_key, window, _fmt_qty(r.quantity), str(r.event_count), str(r.revision), "yes" if r.is_final else "no")
    console.print(table)


def _fmt_qty(q: Decimal) -> str:
    return format(q.normalize(), "f")


# ---------------------------------------------------------------- billing


@cli.group()
def billing() -> None:
    """The billing forwarder's ledger: status, customer mapping, replay of dead deliveries."""


@billing.command("status")
@click.option("--dead", "show_dead", is_flag=True, help="Also list every dead delivery with its reason.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_ctx
def billing_status(ctx: Context, show_dead: bool, fmt: str) -> None:
    """Summarise the delivery ledger per provider and status."""
    from sinks.ledger import fetch_deliveries, status_summary

    summary = status_summary(ctx.cfg)
    dead = fetch_deliveries(ctx.cfg, ("dead",)) if show_dead else []
    if fmt == "json":
        rows = [dict(zip(("provider", "kind", "status", "deliveries", "quantity", "oldest_window", "last_update"), r, strict=True)) for r in summary]
        console.print_json(json.dumps({"summary": rows, "dead": [d.__dict__ for d in dead]}, default=str))
        return
    table = Table("provider", "kind", "status", "deliveries", "quantity", "oldest window (UTC)", "last update")
    for provider, kind, status, n, quantity, oldest, updated in summary:
        table.add_row(provider, kind, status, str(n), _fmt_qty(quantity), f"{oldest:%Y-%m-%d %H:%M:%S}", f"{updated:%Y-%m-%d %H:%M:%S %Z}")
    console.print(table)
    if dead:
        dead_table = Table("identifier", "kind", "tenant", "customer", "meter", "window (UTC)", "quantity", "attempts", "reason")
        for d in dead:
            dead_table.add_row(d.identifier, d.kind, d.tenant_id, d.customer_id, d.meter, f"{d.window_start:%Y-%m-%d %H:%M:%S}", _fmt_qty(d.quantity), str(d.attempts), d.last_error or "")
        console.print(dead_table)


@billing.command("replay")
@click.option("--identifier", "identifiers", multiple=True, help="Only these deliveries (repeatable); default: every dead one.")
@click.option("--include-failed", is_flag=True, help="Also deliveries left failed or pending by a job that no longer runs.")
@click.option("--force", is_flag=True, help="Also deliveries first sent longer ago than the provider deduplicates; each is checked at the provider first.")
@click.option("--dry-run", is_flag=True, help="List what would be re-sent, send nothing.")
@pass_ctx
def billing_replay(ctx: Context, identifiers: tuple[str, ...], include_failed: bool, force: bool, dry_run: bool) -> None:
    """Re-send dead deliveries with their original identifiers, after the cause was fixed.

    Same identifier and Idempotency-Key as the first attempt, so within the provider's dedup window
    (billing.provider_dedup_window, 24 h at Stripe) the provider never counts a delivery twice.
    A delivery first sent longer ago is refused unless --force; with --force the provider's totals
    are checked first, and the delivery is re-sent only if the provider does not have it (the
    decision is recorded in the ledger). Exits non-zero if any delivery is refused or still dead.
    """
    from sinks.ledger import fetch_deliveries

    cfg = ctx.cfg
    statuses = ("dead", "failed", "pending") if include_failed else ("dead",)
    chosen = [d for d in fetch_deliveries(cfg, statuses) if not identifiers or d.identifier in identifiers]
    missing = set(identifiers) - {d.identifier for d in chosen}
    if missing:
        err_console.print(f"[yellow]not replayable (unknown, or not in status {'/'.join(statuses)}):[/] {', '.join(sorted(missing))}")
    now = datetime.now(UTC)
    refused = {d.identifier: reason for d in chosen if (reason := d.replay_refusal(now, cfg.billing.provider_dedup_window))}
    for identifier, reason in refused.items():
        err_console.print(f"[red]{'checking at the provider' if force else 'refused'}[/] {identifier}: {reason}")
    if not force:
        chosen = [d for d in chosen if d.identifier not in refused]
    if dry_run or not chosen:
        for d in chosen:
            console.print(f"{d.identifier}  {d.kind}  {d.tenant_id}/{d.customer_id}/{d.meter}  {d.window_start:%Y-%m-%d %H:%M:%S}  {d.status}: {d.last_error or ''}")
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

    from sinks.billing import Dead
    from sinks.delivery import Deliverer
    from sinks.ledger_async import AsyncPostgresLedger
    from sinks.stripe_provider import StripeMeterEvents

    ledger, provider = AsyncPostgresLedger(cfg, f"replay-{_uuid.uuid4().hex[:12]}", connections=1), StripeMeterEvents(cfg)
    deliverer = Deliverer(cfg, provider, ledger, clock=time.time, sleep=asyncio.sleep)
    counts: dict[str, int] = defaultdict(int)
    columns = (TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=err_console, disable=not err_console.is_terminal) as progress:
            task = progress.add_task("replay", total=len(identifiers))
            for identifier in identifiers:
                outcome = await deliverer.deliver(identifier, replay=True)
                counts[type(outcome).__name__.lower()] += 1
                if isinstance(outcome, Dead):
                    err_console.print(f"[red]still dead[/] {identifier}: {outcome.reason}")
                progress.advance(task)
    finally:
        await ledger.close()
        await provider.close()
    return counts


@billing.group("customers")
def billing_customers() -> None:
    """Which provider customer each tenant's customer is billed as."""


@billing_customers.command("set")
@click.argument("tenant_id")
@click.argument("customer_id")
@click.argument("provider_customer_id")
@pass_ctx
def billing_customers_set(ctx: Context, tenant_id: str, customer_id: str, provider_customer_id: str) -> None:
    """Map TENANT_ID/CUSTOMER_ID to the provider's customer (e.g. a Stripe cus_... id)."""
    from sinks.ledger import map_customer

    map_customer(ctx.cfg, tenant_id, customer_id, provider_customer_id)
    err_console.print(f"{tenant_id}/{customer_id} -> {ctx.cfg.billing.provider} {provider_customer_id}")


@billing_customers.command("import")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_ctx
def billing_customers_import(ctx: Context, csv_file: Path) -> None:
    """Map many customers from a CSV with the header tenant_id,customer_id,provider_customer_id.

    Nothing is written if any row is invalid; every problem is listed (exit code 2).
    """
    from sinks.billing import parse_customer_csv
    from sinks.ledger import map_customers

    mappings, problems = parse_customer_csv(csv_file.read_text())
    for problem in problems:
        err_console.print(f"[red]{csv_file}: {problem}[/]")
    if problems:
        sys.exit(2)
    map_customers(ctx.cfg, mappings)
    err_console.print(f"{len(mappings)} customers mapped to {ctx.cfg.billing.provider}")


@billing_customers.command("list")
@pass_ctx
def billing_customers_list(ctx: Context) -> None:
    """Print every customer mapping."""
    from sinks.ledger import fetch_customers

    table = Table("tenant", "customer", "provider", "provider customer")
    for row in fetch_customers(ctx.cfg):
        table.add_row(*row)
    console.print(table)


@cli.command()
@click.option("--period", type=click.Choice(["day", "month"]), default="month", show_default=True, help="Billing period to total per customer.")
@click.option("--tenant", default=None, help="Only this tenant.")
@click.option("--since", default=None, help="Only windows starting at or after this (ISO-8601, UTC), e.g. when billing was switched on.")
@click.option("--until", default=None, help="Only windows starting before this (ISO-8601, UTC).")
@click.option("--grace", default="2m", show_default=True, help="Windows finalised more recently than this may still be in flight and are skipped.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_ctx
def reconcile(ctx: Context, period: str, tenant: str | None, since: str | None, until: str | None, grace: str, fmt: str) -> None:
    """Compare final windows in Postgres with what the ledger says the provider accepted.

    A window counts as billed with its own meter event plus its corrections (a changed final
    value is billed as the difference); every correction is listed. Exits 1 and lists every
    discrepancy (window not billed, billed with another quantity, billed without a final window);
    exits 0 when they agree.
    """
    from sinks.ledger import fetch_reconciliation_input
    from sinks.reconcile import corrections_of
    from sinks.reconcile import reconcile as compare

    try:
        lower, upper = (datetime.fromisoformat(v).astimezone(UTC).replace(tzinfo=None) if v else None for v in (since, until))
    except ValueError as e:
        raise click.BadParameter(f"--since/--until must be ISO-8601 times: {e}") from e
    finals, ledger = fetch_reconciliation_input(ctx.cfg, parse_duration(grace))

    def chosen(w: object) -> bool:
        return (tenant is None or w.tenant_id == tenant) and (lower is None or w.window_start >= lower) and (upper is None or w.window_start < upper)

    finals, ledger = [w for w in finals if chosen(w)], [d for d in ledger if chosen(d)]
    totals, discrepancies = compare(finals, ledger, period)  # type: ignore[arg-type]
    corrections = corrections_of(ledger)
    if fmt == "json":
        report = {"periods": [t.__dict__ for t in totals], "corrections": [c.__dict__ for c in corrections], "discrepancies": [d.__dict__ for d in discrepancies]}
        console.print_json(json.dumps(report, default=str))
    else:
        table = Table("tenant", "customer", "meter", "period", "windows", "corrections", "final quantity", "billed quantity", "agrees")
        for t in totals:
            table.add_row(t.tenant_id, t.customer_id, t.meter, t.period, str(t.windows), str(t.corrections), _fmt_qty(t.final_quantity), _fmt_qty(t.billed_quantity), "yes" if t.agrees else "[red]no[/]")
        console.print(table)
        if corrections:
            fixes = Table("tenant", "customer", "meter", "dimensions", "window (UTC)", "revision", "correction", "status", title="corrections (changed final values, billed as the difference)")
            for c in corrections:
                fixes.add_row(c.tenant_id, c.customer_id, c.meter, c.dimensions_key, f"{c.window_start:%Y-%m-%d %H:%M:%S}", str(c.revision), _fmt_qty(c.quantity), c.status)
            console.print(fixes)
        if discrepancies:
            issues = Table("kind", "tenant", "customer", "meter", "dimensions", "window (UTC)", "final", "billed", "detail")
            for d in discrepancies:
                q = [("" if v is None else _fmt_qty(v)) for v in (d.final_quantity, d.billed_quantity)]
                issues.add_row(d.kind, d.tenant_id, d.customer_id, d.meter, d.dimensions_key, f"{d.window_start:%Y-%m-%d %H:%M:%S}", *q, d.detail)
            console.print(issues)
    if discrepancies:
        err_console.print(f"[red]{len(discrepancies)} discrepancies[/] between final windows and the billing ledger")
        sys.exit(1)
    err_console.print(f"final windows and the billing ledger agree ({sum(t.windows for t in totals)} windows)")


# ---------------------------------------------------------------- late-audit


@cli.command("late-audit")
@click.option("--tenant", default=None, help="Only this tenant.")
@click.option("--since", default=None, help="Only events with event_time >= this (ISO-8601, UTC).")
@click.option("--until", default=None, help="Only events with event_time < this (ISO-8601, UTC).")
@click.option("--by", "group_by", type=click.Choice(["window", "customer", "tenant"]), default="window", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--histogram", type=click.Path(dir_okay=False), default=None, help="Also write a PNG histogram of lateness here.")
@click.option("--topic", default=None, help="Late-events topic (default kafka.late_events_topic).")
@pass_ctx
def late_audit(ctx: Context, tenant: str | None, since: str | None, until: str | None, group_by: str, fmt: str, histogram: str | None, topic: str | None) -> None:
    """Audit the late-events topic: count, quantity and lateness per tenant/customer/meter/window.

    Reads committed records only (read_committed), from the beginning of the topic.
    """
    import io as _io

    import fastavro

    from connectors.avro_types import load_schema
    from connectors.kafka_reader import read_committed
    from jobs.plan import LATE_EVENT_SCHEMA
    from meterflow.late_audit import select, summarize, to_csv, to_json, write_histogram

    cfg = ctx.cfg
    schema = fastavro.parse_schema(load_schema(LATE_EVENT_SCHEMA))
    topic = topic or cfg.kafka.late_events_topic
    columns = (TextColumn("reading late events"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("read", total=None)
        records = list(
            read_committed(
                cfg.kafka.bootstrap_servers,
                topic,
                lambda v: fastavro.schemaless_reader(_io.BytesIO(v), schema),
                on_progress=lambda n, total: progress.update(task, completed=n, total=total),
            )
        )
    bound = {k: datetime.fromisoformat(v).astimezone(UTC).replace(tzinfo=None) if v else None for k, v in (("since", since), ("until", until))}
    chosen = select(records, tenant=tenant, since=bound["since"], until=bound["until"])
    rows = summarize(chosen, by=group_by)  # type: ignore[arg-type]
    if fmt == "csv":
        click.echo(to_csv(rows), nl=False)
    elif fmt == "json":
        click.echo(to_json(rows))
    else:
        table = Table("tenant", "customer", "meter", "window start (UTC)", "late events", "quantity", "p50 ms", "p90 ms", "max ms", title=f"late events in {topic}")
        for r in rows:
            table.add_row(r.tenant_id, r.customer_id, r.meter, r.window_start, str(r.count), format(r.quantity, "f"), str(r.lateness_p50_ms), str(r.lateness_p90_ms), str(r.lateness_max_ms))
        console.print(table)
    err_console.print(f"{len(chosen)} late events selected of {len(records)} in {topic}")
    if histogram:
        if not chosen:
            err_console.print("no late events: no histogram written")
        else:
            write_histogram([int(r["lateness_ms"]) for r in chosen], histogram)
            err_console.print(f"histogram written to {histogram}")


# ---------------------------------------------------------------- demo


@cli.command()
@click.option("--count", default=3000, show_default=True, help="Sample events to produce.")
@click.option("--timeout", default=180, show_default=True, help="Seconds to wait for the windows in Postgres.")
@pass_ctx
def demo(ctx: Context, count: int, timeout: int) -> None:
    """From nothing: stack up, submit the jobs, produce a sample, wait for its windows, print them, then their billing."""
    from jobs.windowing import window_bounds
    from meterflow.producer import SyntheticSpec, synthetic_events
    from sinks.postgres import fetch_usage

    cfg = stack_up(ctx)
    _submit_jobs(ctx)
    size = cfg.event_time.window_size
    run = uuid.uuid4().hex[:6]
    start, span = _demo_event_time_range(cfg, size)
    spec = SyntheticSpec(count=count, tenants=2, customers=3, start=start, span=span, seed=int(run, 16))
    events = [dict(e, tenant_id=f"demo-{run}-{e['tenant_id']}") for e in synthetic_events(spec)]
    if cfg.billing.enabled:
        from sinks.ledger import map_customer

        for tenant, customer in sorted({(e["tenant_id"], e["customer_id"]) for e in events}):
            map_customer(cfg, tenant, customer, f"cus_demo{run}{tenant[-1]}{customer[-1]}")
    _send_with_progress(cfg, cfg.kafka.usage_events_topic, events, 0)
    # Independent oracle: the windows that the watermark (max event time - delay) has closed.
    watermark = max(e["event_time"] for e in events) - cfg.event_time.watermark_delay
    expected: dict[tuple, list] = defaultdict(lambda: [Decimal(0), 0])
    for e in events:
        start, end = window_bounds(e["event_time"], size)
        if end - timedelta(milliseconds=1) <= watermark:
            acc = expected[(e["tenant_id"], e["customer_id"], e["meter"], start.replace(tzinfo=None))]
            acc[0] += e["quantity"]
            acc[1] += 1
    err_console.print(f"produced {len(events)} events for tenants demo-{run}-*; waiting for {len(expected)} closed windows in Postgres ...")
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in fetch_usage(cfg.postgres) if r.tenant_id.startswith(f"demo-{run}-")]
        got = {(r.tenant_id, r.customer_id, r.meter, r.window_start): [r.quantity, r.event_count] for r in rows}
        if got == dict(expected) and all(r.is_final for r in rows):
            break
        if time.monotonic() > deadline:
            _print_usage(rows)
            err_console.print(f"[red]Postgres does not match the expected totals after {timeout}s ({len(got)} of {len(expected)} windows)[/]")
            sys.exit(1)
        time.sleep(1)
    _print_usage(rows)
    open_windows = len({window_bounds(e["event_time"], size)[0] for e in events}) - len({k[3] for k in expected})
    console.print(
        f"[green]{len(rows)} closed window rows, all final, match the totals computed from the {len(events)} produced events.[/] "
        f"{open_windows} newer window(s) stay open until later events move the watermark past their end."
    )
    if cfg.billing.enabled:
        _demo_billing(cfg, f"demo-{run}-", len(rows), deadline)


def _demo_billing(cfg: JobConfig, tenant_prefix: str, windows: int, deadline: float) -> None:
    """Wait until every closed demo window is accepted by the billing API, then reconcile them."""
    from sinks.ledger import fetch_deliveries, fetch_reconciliation_input
    from sinks.reconcile import reconcile as compare

    err_console.print(f"waiting for {windows} meter events at {cfg.stripe.api_base or 'Stripe'} ...")
    while True:
        ours = [d for d in fetch_deliveries(cfg) if d.tenant_id.startswith(tenant_prefix)]
        if len(ours) >= windows and all(d.status in ("sent", "dead") for d in ours):
            break
        if time.monotonic() > deadline:
            err_console.print(f"[red]only {sum(d.status == 'sent' for d in ours)} of {windows} windows were billed in time[/]")
            sys.exit(1)
        time.sleep(1)
    finals, ledger = fetch_reconciliation_input(cfg, timedelta(0))
    _, discrepancies = compare([w for w in finals if w.tenant_id.startswith(tenant_prefix)], [d for d in ledger if d.tenant_id.startswith(tenant_prefix)])
    sent = [d for d in ours if d.status == "sent"]
    table = Table("identifier", "customer", "event_name", "value", "window start (UTC)", "response")
    for d in sent[:8]:
        table.add_row(d.identifier[:40] + "...", d.provider_customer_id or "", d.event_name, d.value or "", f"{d.window_start:%H:%M:%S}", d.provider_response_id or "")
    console.print(table)
    if discrepancies or len(sent) != len(ours):
        err_console.print(f"[red]billing: {len(sent)} of {len(ours)} sent, {len(discrepancies)} discrepancies; see `meterflow billing status --dead`[/]")
        sys.exit(1)
    console.print(f"[green]{len(sent)} meter events accepted (one per closed window, first 8 shown); the ledger reconciles with Postgres.[/]")


def _demo_event_time_range(cfg: JobConfig, size: timedelta) -> tuple[datetime, timedelta]:
    """Where the demo's sample goes in event time: up to six whole windows ending now.

    It starts after the newest window already in Postgres, so a repeated demo never sends events
    the running job has already closed the windows for (they would, correctly, be late). Events
    are never dated in the future; if too little event time has passed since the last demo, wait.
    """
    from jobs.windowing import window_bounds
    from sinks.postgres import fetch_usage

    newest_end = max((r.window_end for r in fetch_usage(cfg.postgres)), default=None)
    while True:
        now = datetime.now(UTC)
        start, _ = window_bounds(now - 6 * size, size)
        if newest_end is not None:
            # The previous sample's last window may still be open: start one window after it.
            start = max(start, newest_end.replace(tzinfo=UTC) + size)
        windows = int((now - start) / size)
        if windows >= 2:
            return start, min(windows, 6) * size
        wait = start + 2 * size - now
        err_console.print(f"event time is still inside the previous demo's windows; waiting {wait.total_seconds():.0f}s")
        time.sleep(wait.total_seconds() + 1)


def main() -> None:
    """Entry point: turn MeterflowError into a clear message and exit code 1."""
    try:
        cli(standalone_mode=True)
    except MeterflowError as e:
        err_console.print(f"[red]error:[/] {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
