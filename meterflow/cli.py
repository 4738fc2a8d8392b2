"""The ``meterflow`` command line: local stack, producer, job submission, usage and the demo."""

from __future__ import annotations

import json
import sys
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
    from meterflow.local.stack import LocalStack, ensure_secrets

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
    from meterflow.local.stack import LocalStack

    LocalStack(ctx.cfg).down()
    err_console.print("stack is down")


@stack.command("status")
@pass_ctx
def stack_status(ctx: Context) -> None:
    """Show which parts of the stack are running; exit 1 if any is not."""
    if not _print_status(ctx.cfg):
        sys.exit(1)


def _print_status(cfg: JobConfig) -> bool:
    from meterflow.local.stack import LocalStack

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
    from meterflow.local import flink_jobs

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
    from meterflow.local import flink_jobs

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
    from meterflow.local import flink_jobs

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


# The billing commands (billing status/replay/customers, reconcile) and the demo live in their own
# modules; importing them registers them on the group above.
from meterflow import cli_billing, cli_demo, cli_tune  # noqa: E402, F401


def main() -> None:
    """Entry point: turn MeterflowError into a clear message and exit code 1."""
    try:
        cli(standalone_mode=True)
    except MeterflowError as e:
        err_console.print(f"[red]error:[/] {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
