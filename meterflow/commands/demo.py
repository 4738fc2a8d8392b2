"""``meterflow demo``: from nothing to final usage windows and their reconciled meter events."""

from __future__ import annotations

import sys
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import click
from rich.table import Table

from meterflow.commands.job import submit_jobs
from meterflow.commands.produce import send_with_progress
from meterflow.commands.root import Context, cli, console, err_console, pass_ctx
from meterflow.commands.stack import stack_up
from meterflow.commands.usage import print_usage
from meterflow.config import JobConfig


@cli.command()
@click.option("--count", default=3000, show_default=True, help="Sample events to produce.")
@click.option("--timeout", default=180, show_default=True, help="Seconds to wait for the windows in Postgres.")
@click.option(
    "--fresh",
    is_flag=True,
    help="Submit jobs that are not running from empty state (as `meterflow submit --fresh`), not from their retained state.",
)
@pass_ctx
def demo(ctx: Context, count: int, timeout: int, fresh: bool) -> None:
    """From nothing: stack up, submit the jobs, produce a sample, wait for its windows, print them, then their billing.

    Jobs not running resume from their retained state as with `meterflow submit` (or start empty with --fresh).
    """
    from connectors.avro_codec import UsageEvent
    from connectors.producer import SyntheticSpec, synthetic_events
    from meterflow.windowing import is_window_closed, window_bounds
    from sinks.postgres import fetch_usage

    cfg = stack_up(ctx)
    submit_jobs(ctx, fresh=fresh)
    size = cfg.event_time.window_size
    run = uuid.uuid4().hex[:6]
    start, span = _demo_event_time_range(cfg, size)
    spec = SyntheticSpec(count=count, tenants=2, customers=3, start=start, span=span, seed=int(run, 16))
    events: list[UsageEvent] = [{**e, "tenant_id": f"demo-{run}-{e['tenant_id']}"} for e in synthetic_events(spec)]
    if cfg.billing.enabled:
        from sinks.ledger import map_customer

        for tenant, customer in sorted({(e["tenant_id"], e["customer_id"]) for e in events}):
            map_customer(cfg, tenant, customer, f"cus_demo{run}{tenant[-1]}{customer[-1]}")
    send_with_progress(cfg, cfg.kafka.usage_events_topic, events, 0)
    # Independent oracle: the windows that the watermark (max event time - delay) has closed, by the
    # job's own close rule (allowed lateness included): only those have final rows.
    watermark_ms = int((max(e["event_time"] for e in events) - cfg.event_time.watermark_delay).timestamp() * 1000)
    lateness_ms = int(cfg.event_time.allowed_lateness / timedelta(milliseconds=1))
    expected: dict[tuple, list] = defaultdict(lambda: [Decimal(0), 0])
    for e in events:
        start, end = window_bounds(e["event_time"], size)
        if is_window_closed(int(end.timestamp() * 1000), watermark_ms, lateness_ms):
            acc = expected[(e["tenant_id"], e["customer_id"], e["meter"], start.replace(tzinfo=None))]
            acc[0] += e["quantity"]
            acc[1] += 1
    err_console.print(
        f"produced {len(events)} events for tenants demo-{run}-*; waiting for {len(expected)} closed windows in Postgres ..."
    )
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in fetch_usage(cfg.postgres) if r.tenant_id.startswith(f"demo-{run}-")]
        # The closed windows, final: windows the watermark fired but lateness keeps open have rows too.
        got = {
            (r.tenant_id, r.customer_id, r.meter, r.window_start): [r.quantity, r.event_count]
            for r in rows
            if r.is_final
        }
        if got == dict(expected):
            break
        if time.monotonic() > deadline:
            print_usage(rows)
            err_console.print(
                f"[red]Postgres does not match the expected totals after {timeout}s ({len(got)} of {len(expected)} windows)[/]"
            )
            sys.exit(1)
        time.sleep(1)
    print_usage(rows)
    open_windows = len({window_bounds(e["event_time"], size)[0] for e in events}) - len({k[3] for k in expected})
    console.print(
        f"[green]{len(rows)} closed window rows, all final, match the totals computed from the {len(events)} produced events.[/] "
        f"{open_windows} newer window(s) stay open until later events move the watermark past their end."
    )
    _demo_http(
        ctx,
        cfg,
        rows[0].tenant_id,
        rows[0].customer_id,
        [r for r in rows if r.customer_id == rows[0].customer_id and r.tenant_id == rows[0].tenant_id],
    )
    if cfg.billing.enabled:
        _demo_billing(cfg, f"demo-{run}-", len(rows), deadline)


def _demo_http(ctx: Context, cfg: JobConfig, tenant: str, customer: str, rows: list) -> None:
    """The usage API and page of ``meterflow serve`` (started by ``stack up``) for one demo customer, checked against Postgres."""
    import httpx

    from meterflow.commands.stack import config_file
    from meterflow.serve.ingest import hash_api_key, new_api_key
    from sinks.api_keys import create_key

    if config_file(ctx) is None:
        err_console.print("no config file, so `stack up` started no HTTP service: skipping the usage API")
        return
    key = new_api_key()
    create_key(cfg, hash_api_key(key), tenant, "demo")
    # The key goes in a header file only its owner reads, never on a command line.
    header = cfg.state_dir / "serve" / f"{tenant}.header"
    header.parent.mkdir(parents=True, exist_ok=True)
    header.touch(mode=0o600)
    header.write_text(f"Authorization: Bearer {key}\n")
    base = f"http://{cfg.serve.host}:{cfg.serve.port}"
    since = min(r.window_start for r in rows).isoformat() + "Z"
    until = max(r.window_end for r in rows).isoformat() + "Z"
    path = f"/v1/customers/{customer}/usage?granularity=period&from={since}&to={until}"
    answer = httpx.get(base + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    # Plain lines: a command and an address to copy whole, never wrapped.
    click.echo(f"\nThe usage API (meterflow serve, started by `stack up`):\n  curl -s -H @{header} '{base}{path}'")
    if answer.status_code != 200:
        err_console.print(f"[red]the usage API answered {answer.status_code}: {answer.text}[/]")
        sys.exit(1)
    body = answer.json()
    console.print_json(data={**body, "corrections": body["corrections"][:3]})
    served: dict[str, Decimal] = defaultdict(Decimal)
    for u in body["usage"]:  # a demo run across a month's start covers two periods
        served[u["meter"]] += Decimal(u["quantity"])
    stored: dict[str, Decimal] = defaultdict(Decimal)
    for r in rows:
        stored[r.meter] += r.quantity
    if dict(served) != dict(stored):
        err_console.print(f"[red]the usage API's period totals {dict(served)} differ from Postgres {dict(stored)}[/]")
        sys.exit(1)
    page = httpx.get(f"{base}/usage/{customer}", timeout=10)
    if page.status_code != 200:
        err_console.print(f"[red]the usage page answered {page.status_code}[/]")
        sys.exit(1)
    console.print("[green]The period totals served equal the customer's rows in Postgres.[/]")
    click.echo(f"The customer's usage page: {base}/usage/{customer}#key=<the key in {header}>")
    click.echo("(the key goes in the address's fragment, which a browser never sends to a server)")


def _demo_billing(cfg: JobConfig, tenant_prefix: str, windows: int, deadline: float) -> None:
    """Wait until every closed demo window is accepted by the billing API, then reconcile them."""
    from billing.reconcile import reconcile as compare
    from sinks.ledger import fetch_deliveries, fetch_reconciliation_input

    err_console.print(f"waiting for {windows} meter events at {cfg.stripe.api_base or 'Stripe'} ...")
    while True:
        ours = [d for d in fetch_deliveries(cfg) if d.tenant_id.startswith(tenant_prefix)]
        if len(ours) >= windows and all(d.status in ("sent", "dead") for d in ours):
            break
        if time.monotonic() > deadline:
            err_console.print(
                f"[red]only {sum(d.status == 'sent' for d in ours)} of {windows} windows were billed in time[/]"
            )
            sys.exit(1)
        time.sleep(1)
    found = fetch_reconciliation_input(cfg, timedelta(0))

    def ours_only(rows: list) -> list:
        return [r for r in rows if r.tenant_id.startswith(tenant_prefix)]

    _, discrepancies = compare(
        ours_only(found.finals), ours_only(found.ledger), late_corrections=ours_only(found.late_corrections)
    )
    sent = [d for d in ours if d.status == "sent"]
    table = Table("identifier", "customer", "event_name", "value", "window start (UTC)", "response")
    for d in sent[:8]:
        table.add_row(
            d.identifier[:40] + "...",
            d.provider_customer_id or "",
            d.event_name,
            d.value or "",
            f"{d.window_start:%H:%M:%S}",
            d.provider_response_id or "",
        )
    console.print(table)
    if discrepancies or len(sent) != len(ours):
        err_console.print(
            f"[red]billing: {len(sent)} of {len(ours)} sent, {len(discrepancies)} discrepancies; see `meterflow billing status --dead`[/]"
        )
        sys.exit(1)
    console.print(
        f"[green]{len(sent)} meter events accepted (one per closed window, first 8 shown); the ledger reconciles with Postgres.[/]"
    )


def _demo_event_time_range(cfg: JobConfig, size: timedelta) -> tuple[datetime, timedelta]:
    """Where the demo's sample goes in event time: up to six whole windows ending now.

    It starts after the newest window already in Postgres, so a repeated demo never sends events
    the running job has already closed the windows for (they would, correctly, be late). Events
    are never dated in the future; if too little event time has passed since the last demo, wait.
    """
    from meterflow.windowing import window_bounds
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
        err_console.print(
            f"event time is still inside the previous demo's windows; waiting {wait.total_seconds():.0f}s"
        )
        time.sleep(wait.total_seconds() + 1)
