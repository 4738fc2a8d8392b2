"""``meterflow submit/jobs/stop``: the usage and billing jobs on the Flink session cluster."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from meterflow.commands.root import Context, cli, console, err_console, pass_ctx
from meterflow.config import JobConfig
from meterflow.handover import Handover, handover_refusal, plan_handover, read_below, read_handover, write_handover
from meterflow.retained_state import RetainedState, StartPoint


@cli.command()
@click.option(
    "--savepoint",
    default=None,
    help="Start the usage job from this savepoint or retained checkpoint (default: its newest one).",
)
@click.option(
    "--billing-savepoint",
    default=None,
    help="Start the billing job from this savepoint or retained checkpoint (default: its newest one).",
)
@click.option(
    "--fresh",
    is_flag=True,
    help="Start from empty state: a retained checkpoint or savepoint is set aside, not restored (says what is forgotten).",
)
@click.option("--force", is_flag=True, help="Submit even if a job with the same name is running.")
@click.option(
    "--handover-from",
    metavar="GROUP",
    default=None,
    help="Start the two-stage graph where the SQL graph, reading with consumer group GROUP, stopped (its savepoint): "
    "its closed windows stay closed, its open ones are counted again whole, its dedup ids are kept "
    "(docs/operations.md, Switching graphs).",
)
@pass_ctx
def submit(
    ctx: Context,
    savepoint: str | None,
    billing_savepoint: str | None,
    fresh: bool,
    force: bool,
    handover_from: str | None,
) -> None:
    """Submit the usage job and, with billing.enabled, the billing job; wait until they run.

    Each job resumes from the newest checkpoint or savepoint it left under
    flink.checkpoint_dir/<job name> (after a cancel, a failure or a lost JobManager), never from
    empty state while one exists, unless --fresh. A usage job state made with another window size,
    window aggregate or meter dimensions is refused. A job already running under its name is left alone. The usage job
    is refused when its input topic is not LogAppendTime or not sized as kafka.max_message_bytes, or
    the dead-letter topic cannot hold a dead letter of the largest input; both jobs are refused when
    the cluster has fewer task slots than their parallelisms add up to, or the brokers' transaction
    timeout is below kafka.transaction_timeout; the error says what to change. With --handover-from,
    the usage job starts from empty state (add --fresh where it left state) and reads the usage
    events again from the handover's start; every later submit that restores its state does the same.
    """
    submit_jobs(
        ctx,
        savepoint=savepoint,
        billing_savepoint=billing_savepoint,
        fresh=fresh,
        force=force,
        handover_from=handover_from,
    )


def submit_jobs(
    ctx: Context,
    *,
    savepoint: str | None = None,
    billing_savepoint: str | None = None,
    fresh: bool = False,
    force: bool = False,
    handover_from: str | None = None,
) -> None:
    """Submit this config's jobs that are not running yet (all of them with ``force``); print their ids.

    Every check and every start point is decided before any job is submitted: a refusal leaves nothing half done.
    """
    from jobs.plan import quantity_expr
    from meterflow import retained_state
    from meterflow.errors import JobSubmissionError
    from meterflow.local import flink_jobs

    cfg = ctx.cfg
    if fresh and force:
        msg = "--fresh sets a job's state aside, which a running job of that name still writes to: stop it first, not --force"
        raise JobSubmissionError(msg)
    if handover_from and force:
        msg = "--handover-from starts from the position of a stopped job: stop the job first, not --force"
        raise JobSubmissionError(msg)
    flink_jobs.check_slots(cfg)  # jobs that can never all run are refused before any is submitted
    flink_jobs.check_transaction_timeout(cfg)
    # (job name, how it is submitted, a savepoint given for it, the settings its state is made with)
    plan: list[tuple[str, Callable[..., str], str | None, dict[str, Any] | None]] = [
        (cfg.flink.job_name, flink_jobs.submit, savepoint, retained_state.job_settings(cfg, quantity_expr(cfg)))
    ]
    if cfg.billing.enabled:
        plan.append((cfg.billing_job_name, flink_jobs.submit_billing, billing_savepoint, None))
    root = retained_state.checkpoint_root(cfg)
    legacy = tuple(retained_state.legacy_checkpoints(root)) if root is not None else ()
    starts = []
    for name, submit_job, explicit, settings in plan:
        existing = flink_jobs.running_jobs(cfg, name)
        if existing and handover_from and name == cfg.flink.job_name:
            msg = f"job {name} is running ({existing[0]['jid']}): stop it first (`meterflow stop --savepoint`): --handover-from starts where it left off"
            raise JobSubmissionError(msg)
        if existing and not force:
            err_console.print(f"job {name} already running: {existing[0]['jid']} (use --force to submit another)")
            continue
        if name == cfg.flink.job_name:
            flink_jobs.check_input_topics(cfg)  # the topics' configs first: a wrong one is refused, with the fix
        job_dir = retained_state.job_state_dir(cfg, name)
        newest = retained_state.newest_retained(job_dir) if job_dir else None
        # The settings of the state restored: beside an explicit savepoint, else this job's directory.
        recorded = (
            retained_state.settings_beside(explicit)
            if explicit
            else (retained_state.read_job_settings(job_dir) if job_dir else None)
        )
        start = retained_state.plan_start(
            name,
            explicit=explicit,
            fresh=fresh,
            state_uri=cfg.job_state_uri(name),
            listable=job_dir is not None,
            newest=newest,
            recorded=recorded,
            settings=settings,
            legacy=legacy,
        )
        handover = None
        if name == cfg.flink.job_name:
            handover = usage_job_handover(cfg, handover_from, job_dir, start, newest, recorded, settings)
        starts.append((name, submit_job, settings, job_dir, start, handover))
    for name, submit_job, settings, job_dir, start, handover in starts:
        # A handover planned now keeps what the empty start's notes say is forgotten: its own line below says what.
        for note in () if name == cfg.flink.job_name and handover_from is not None else start.notes:
            err_console.print(note)
        if job_dir is not None and start.forget:
            err_console.print(
                f"{name}: its retained state is kept at {retained_state.forget(job_dir, datetime.now(UTC))}"
            )
        extra = {}
        if handover is not None and job_dir is not None:
            # Written after the state was set aside, beside the state the job writes from now on
            # (a start that keeps its state writes back the handover it started with).
            extra["handover"] = write_handover(job_dir, handover)
            err_console.print(f"{name}: {_describe_handover(handover)}")
        with err_console.status(f"submitting {name} ..."):
            job_id = submit_job(cfg, ctx.resolved_path, savepoint=start.restore, **extra)
        if job_dir is not None and settings is not None:
            retained_state.write_job_settings(job_dir, settings)  # what the state this job now writes is made with
        err_console.print(f"{name} submitted")
        console.print(job_id)
    _start_corrections_follower(ctx)


def usage_job_handover(
    cfg: JobConfig,
    handover_from: str | None,
    job_dir: Path | None,
    start: StartPoint,
    newest: RetainedState | None = None,
    recorded: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> Handover | None:
    """The usage job's handover: planned now from the savepoint ``newest`` that the SQL job of group
    ``handover_from`` stopped with, and the usage table's last final window; or the handover this job
    started with, for every start that keeps its state (a restore, or a first start again before any
    checkpoint)."""
    from connectors.kafka_admin import committed_offsets
    from meterflow.errors import JobSubmissionError
    from meterflow.local.savepoints import stopped_at
    from sinks.postgres import last_final_end

    if handover_from is None:
        return None if start.forget else read_handover(job_dir)
    if job_dir is None:
        msg = "--handover-from keeps the handover beside the job's state: flink.checkpoint_dir must be a local or mounted directory"
        raise JobSubmissionError(msg)
    savepoint = newest.path if newest is not None and newest.kind == "savepoint" else None
    refusal = handover_refusal(cfg.flink.job_name, start.restore, savepoint, recorded, settings or {})
    if refusal or savepoint is None:  # no savepoint is always a refusal
        raise JobSubmissionError(refusal)
    if recorded is None:
        err_console.print(
            f"{cfg.flink.job_name}: no settings are recorded beside {savepoint}: not compared with this config"
        )
    topic = cfg.kafka.usage_events_topic
    stopped = stopped_at(savepoint, topic)
    below = read_below(committed_offsets(cfg.kafka.bootstrap_servers, handover_from, topic), stopped)
    return plan_handover(cfg, handover_from, below, last_final_end(cfg.postgres), stopped)


def _describe_handover(h: Handover) -> str:
    since = datetime.fromtimestamp(h.replay_from_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    closed = (
        "no window was final yet"
        if h.watermark_ms is None
        else f"windows closed by {datetime.fromtimestamp(h.watermark_ms / 1000, UTC):%Y-%m-%d %H:%M:%S} UTC stay closed"
    )
    return (
        f"handing over from consumer group {h.from_group}: reading the usage events again from {since} UTC, "
        f"{closed}; records it read ({len(h.read_below)} partitions) route nothing again: they mark their ids "
        "or count in windows it left open"
    )


def _start_corrections_follower(ctx: Context) -> None:
    """On the local stack, the corrections follower of this config runs from now on (started again if it ended)."""
    from meterflow.local.corrections_follower import CorrectionsFollower
    from meterflow.local.flink import FlinkCluster

    if not FlinkCluster(ctx.cfg).jobmanager_pids():
        err_console.print(
            "late events become corrections only while `meterflow corrections apply --follow` runs: run it under your process supervisor (docker-compose and ops/k8s do)"
        )
        return
    follower = CorrectionsFollower(ctx.cfg, ctx.resolved_path)
    if follower.start():
        err_console.print(f"corrections follower started (log {follower.log})")


@cli.command()
@pass_ctx
def jobs(ctx: Context) -> None:
    """List the cluster's jobs; this config's usage and billing jobs are marked."""
    from meterflow.local import flink_jobs

    cfg = ctx.cfg
    roles = {cfg.flink.job_name: "usage", cfg.billing_job_name: "billing"}
    table = Table("job id", "name", "role", "state", "started")
    for j in flink_jobs.list_jobs(cfg):
        table.add_row(
            j["jid"],
            j["name"],
            roles.get(j["name"], ""),
            j["state"],
            datetime.fromtimestamp(j["start-time"] / 1000, UTC).isoformat(timespec="seconds"),
        )
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
