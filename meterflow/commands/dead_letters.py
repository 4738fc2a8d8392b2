"""The ``meterflow dead-letters`` commands: list the dead-letter topic, re-send chosen dead letters (connectors/dead_letters.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from connectors.dead_letters import (
    CONFIRM_ABOVE,
    TABLE_COLUMNS,
    Criteria,
    DeadLetter,
    Unreadable,
    counts_by_kind,
    decode_all,
    parse_time,
    replay_key,
    replayable,
    select,
    start_offsets,
    table_row,
    to_json,
)
from meterflow.commands.root import Context, cli, console, err_console, pass_ctx
from meterflow.config import JobConfig
from meterflow.input_contract import DEAD_LETTER_HEADROOM_BYTES


class _Time(click.ParamType):
    """ISO-8601 (a time without a zone is UTC) or epoch milliseconds, as an aware UTC datetime."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_time(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


def selection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options both commands choose dead letters with (connectors/dead_letters.py ``Criteria``)."""
    options = [
        click.option(
            "--reason-contains",
            "reason_contains",
            multiple=True,
            help="Reason contains this text, case-insensitive (repeat: any of them).",
        ),
        click.option(
            "--kind",
            "kinds",
            multiple=True,
            metavar="KIND",
            help="Reason kind: its text before the first colon as the job's metrics name it, e.g. unknown_meter, malformed_avro, contract (repeat: any).",
        ),
        click.option(
            "--since",
            type=_Time(),
            default=None,
            help="seen_at >= this (ISO-8601 or epoch ms; a time without a zone is UTC).",
        ),
        click.option(
            "--until",
            type=_Time(),
            default=None,
            help="seen_at < this (ISO-8601 or epoch ms; a time without a zone is UTC).",
        ),
        click.option(
            "--partition",
            type=click.IntRange(min=0),
            metavar="N",
            default=None,
            help="Only this partition of the dead-letter topic.",
        ),
        click.option(
            "--from-offset",
            type=click.IntRange(min=0),
            metavar="OFFSET",
            default=None,
            help="Dead-letter topic offset >= this, in every partition read.",
        ),
        click.option(
            "--to-offset",
            type=click.IntRange(min=0),
            metavar="OFFSET",
            default=None,
            help="Dead-letter topic offset <= this, in every partition read.",
        ),
        click.option(
            "--limit",
            type=click.IntRange(min=0),
            metavar="N",
            default=None,
            help="At most this many, oldest seen_at first.",
        ),
        click.option("--topic", default=None, help="Dead-letter topic (default kafka.dead_letter_topic)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _criteria(
    reason_contains: tuple[str, ...],
    kinds: tuple[str, ...],
    since: datetime | None,
    until: datetime | None,
    partition: int | None,
    from_offset: int | None,
    to_offset: int | None,
    limit: int | None,
) -> Criteria:
    return Criteria(
        reason_contains=reason_contains,
        kinds=kinds,
        since=since,
        until=until,
        partition=partition,
        from_offset=from_offset,
        to_offset=to_offset,
        limit=limit,
    )


def read_dead_letters(cfg: JobConfig, topic: str, criteria: Criteria) -> tuple[list[DeadLetter], list[Unreadable]]:
    """The committed records of ``topic`` from ``criteria.from_offset`` to the end offsets seen at the
    start (a snapshot: what is written while reading, e.g. a replay's own rejections, is not read)."""
    from connectors.kafka_reader import read_from

    with err_console.status(f"reading {topic}"):
        return decode_all(read_from(cfg.kafka.bootstrap_servers, topic, start_offsets(criteria)))


def _print_table(chosen: list[DeadLetter], title: str) -> None:
    table = Table(*TABLE_COLUMNS, title=title)
    for d in chosen:
        table.add_row(*(Text(cell) for cell in table_row(d)))  # Text: a reason is never read as markup
    console.print(table)


def _print_summary(topic: str, read: int, chosen: list[DeadLetter], unreadable: list[Unreadable]) -> None:
    kinds = Table("kind", "dead letters", title="selected per kind")
    for kind, count in counts_by_kind(chosen):
        kinds.add_row(Text(kind), str(count))
    if chosen:
        console.print(kinds)
    for u in unreadable:
        err_console.print(Text(f"{topic} {u.partition}/{u.offset} skipped: {u.error}", style="yellow"), soft_wrap=True)
    err_console.print(f"{len(chosen)} dead letters selected of {read} read from {topic}", soft_wrap=True)


@cli.group("dead-letters")
def dead_letters() -> None:
    """The dead-letter topic: list, and re-send chosen dead letters after a fix (README, "Replaying dead letters")."""


@dead_letters.command("list")
@selection_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (whole reasons, payloads in base64).")
@pass_ctx
def dead_letters_list(ctx: Context, topic: str | None, as_json: bool, **selection: Any) -> None:
    """List dead letters (read_committed) with their reasons, and how many of each kind."""
    cfg = ctx.cfg
    topic = topic or cfg.kafka.dead_letter_topic
    criteria = _criteria(**selection)
    letters, unreadable = read_dead_letters(cfg, topic, criteria)
    chosen = select(letters, criteria)
    if as_json:
        click.echo(to_json(topic, len(letters), chosen, unreadable))
        return
    _print_table(chosen, f"dead letters in {topic}")
    _print_summary(topic, len(letters), chosen, unreadable)


@dead_letters.command("replay")
@selection_options
@click.option("--to-topic", default=None, help="Send to this topic (default kafka.usage_events_topic).")
@click.option("--dry-run", is_flag=True, help="Show what would be re-sent; send nothing.")
@click.option("--yes", is_flag=True, help=f"Do not ask before re-sending more than {CONFIRM_ABOVE}.")
@pass_ctx
def dead_letters_replay(
    ctx: Context, topic: str | None, to_topic: str | None, dry_run: bool, yes: bool, **selection: Any
) -> None:
    """Re-send the chosen dead letters' payloads, unchanged, to the usage-events topic.

    Reads the dead-letter topic up to its end offsets at the start, so dead letters written while
    replaying (a payload rejected again) are never replayed by the same run. Idempotent producer,
    acks=all; a payload that is a usage event is keyed tenant_id/customer_id like `meterflow produce`,
    another is sent unkeyed. A dead letter whose payload the job cut (its reason says so) is not
    sent. Replaying twice counts nothing twice: the job deduplicates on (tenant_id, event_id) for
    event_time.dedup_horizon.
    """
    from connectors.kafka_writer import send_values

    cfg = ctx.cfg
    topic = topic or cfg.kafka.dead_letter_topic
    to_topic = to_topic or cfg.kafka.usage_events_topic
    if to_topic == topic:
        msg = f"--to-topic is the dead-letter topic {topic}: replay sends dead letters back to the job's input"
        raise click.UsageError(msg)
    criteria = _criteria(**selection)
    letters, unreadable = read_dead_letters(cfg, topic, criteria)
    selected = select(letters, criteria)
    chosen, cut = replayable(selected)
    if dry_run:
        _print_table(chosen, f"dead letters that would be replayed to {to_topic} (dry run)")
    _print_summary(topic, len(letters), selected, unreadable)
    if cut:
        places = ", ".join(f"{d.partition}/{d.offset}" for d in cut[:10]) + (", ..." if len(cut) > 10 else "")
        err_console.print(
            Text(
                f"{len(cut)} selected dead letters not replayed: the job kept only the start of their message ({places})",
                style="yellow",
            ),
            soft_wrap=True,
        )
    if dry_run or not chosen:
        err_console.print(
            f"{'dry run: would replay' if dry_run else 'replayed'} {len(chosen)} dead letters to {to_topic}",
            soft_wrap=True,
        )
        return
    if len(chosen) > CONFIRM_ABOVE and not yes:
        click.confirm(f"Replay {len(chosen)} dead letters to {to_topic}?", abort=True, err=True)
    records = [(replay_key(d.payload), d.payload) for d in chosen]
    columns = (TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=False, disable=not err_console.is_terminal) as progress:
        task = progress.add_task("replay", total=len(records))
        sent = send_values(
            cfg.kafka.bootstrap_servers,
            to_topic,
            records,
            max_request_size=cfg.kafka.max_message_bytes + DEAD_LETTER_HEADROOM_BYTES,
            on_sent=lambda n: progress.advance(task, n),
        )
    keyed = sum(1 for key, _ in records if key is not None)
    err_console.print(
        f"replayed {sent} dead letters to {to_topic} ({keyed} keyed tenant_id/customer_id, {sent - keyed} unkeyed)",
        soft_wrap=True,
    )
