"""`meterflow tune`: recommend event_time.watermark_delay and allowed_lateness from the input topic (meterflow/tune.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import click
from rich.table import Table

from meterflow.commands.root import Context, cli, console, err_console, pass_ctx
from meterflow.config_values import format_duration, parse_duration


def _ms(value: str) -> int:
    return int(datetime.fromisoformat(value).astimezone(UTC).timestamp() * 1000)


@cli.command()
@click.option(
    "--since",
    default=None,
    help="Scan records written at or after this (ISO-8601, Kafka timestamp; default --until minus --span).",
)
@click.option("--until", default=None, help="Scan records written before this (ISO-8601; default now).")
@click.option("--span", default="1d", show_default=True, help="Scanned time range when --since is not given.")
@click.option(
    "--target",
    "targets",
    type=click.FloatRange(0, 1, min_open=True),
    multiple=True,
    default=(0.999, 0.9999),
    show_default=True,
    help="Share of events to count on time (repeatable).",
)
@click.option(
    "--first-share",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.99,
    show_default=True,
    help="Share of events watermark_delay alone should put in their window's first result.",
)
@click.option(
    "--chart",
    type=click.Path(dir_okay=False),
    default="tune.png",
    show_default=True,
    help="PNG of the on-time share against watermark_delay + allowed_lateness.",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--topic", default=None, help="Usage-events topic (default kafka.usage_events_topic).")
@pass_ctx
def tune(
    ctx: Context,
    since: str | None,
    until: str | None,
    span: str,
    targets: tuple[float, ...],
    first_share: float,
    chart: str,
    fmt: str,
    topic: str | None,
) -> None:
    """Recommend event_time.watermark_delay and allowed_lateness for target shares of events counted on time.

    Scans the usage-events topic over a time range, replays the job's watermark per partition, and
    shows for each target the settings, the share they count, the share counted only by a re-fire,
    and the freshness cost: how long after its end a window's first result and final value come.
    Also counts the late events the running job wrote to the late-events topic in the same range.
    """
    from connectors.avro_codec import decode_usage_event
    from connectors.kafka_reader import read_range
    from meterflow.tune import Sample, evaluate, recommend, replay_needs, write_chart

    cfg = ctx.cfg
    et = cfg.event_time
    until_ms = _ms(until) if until else int(datetime.now(UTC).timestamp() * 1000)
    since_ms = _ms(since) if since else until_ms - int(parse_duration(span) / timedelta(milliseconds=1))
    topic = topic or cfg.kafka.usage_events_topic
    samples, undecodable = [], 0
    for partition, ts, value in read_range(cfg.kafka.bootstrap_servers, topic, since_ms, until_ms):
        try:
            event = decode_usage_event(value)
        except (ValueError, EOFError, TypeError, KeyError, IndexError):
            undecodable += 1  # a dead letter for the job too
            continue
        samples.append(Sample(partition, int(event["event_time"].timestamp() * 1000), ts))
    needs = replay_needs(
        samples, int(et.window_size / timedelta(milliseconds=1)), int(et.max_event_ahead / timedelta(milliseconds=1))
    )
    if not needs:
        err_console.print(f"no usage events in {topic} between {_iso(since_ms)} and {_iso(until_ms)}")
        raise SystemExit(1)
    late_written = sum(
        1 for _ in read_range(cfg.kafka.bootstrap_servers, cfg.kafka.late_events_topic, since_ms, until_ms)
    )
    choices = [
        evaluate(needs, "current", et.watermark_delay, et.allowed_lateness),
        *recommend(needs, list(targets), first_share=first_share),
    ]
    write_chart(needs, choices, chart)
    if fmt == "json":
        rows = [
            {
                "label": c.label,
                "watermark_delay": format_duration(c.watermark_delay),
                "allowed_lateness": format_duration(c.allowed_lateness),
                "on_time_share": c.on_time_share,
                "late_events": c.late_events,
                "refire_share": c.refire_share,
                "first_result_after": format_duration(c.first_result_after),
                "final_after": format_duration(c.final_after),
            }
            for c in choices
        ]
        click.echo(
            json.dumps(
                {
                    "events": len(needs),
                    "undecodable": undecodable,
                    "late_events_written": late_written,
                    "choices": rows,
                },
                indent=2,
            )
        )
    else:
        table = Table(
            "setting",
            "watermark_delay",
            "allowed_lateness",
            "counted on time",
            "late",
            "via re-fire",
            "first result after",
            "final after",
            title=f"{len(needs)} events in {topic}, {_iso(since_ms)} to {_iso(until_ms)}",
        )
        for c in choices:
            table.add_row(
                c.label,
                format_duration(c.watermark_delay),
                format_duration(c.allowed_lateness),
                f"{c.on_time_share:.4%}",
                str(c.late_events),
                f"{c.refire_share:.4%}",
                format_duration(c.first_result_after),
                format_duration(c.final_after),
            )
        console.print(table)
    err_console.print(
        f"{undecodable} undecodable records skipped; the job wrote {late_written} late events to {cfg.kafka.late_events_topic} in the range; chart written to {chart}"
    )


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")
