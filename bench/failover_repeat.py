"""Repeat one failure scenario of the end-to-end suite N times and print a Markdown table of the runs.

    .venv/bin/python -m bench.failover_repeat --runs 5 --scenario tmkill

Each run is a fresh pytest process on a fresh private stack; the test itself asserts exactly-once
(see tests/e2e/test_billing_semantics.py) and prints one ``FAILOVER`` line of figures when it passes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
TESTS = {
    "tmkill": "test_taskmanager_killed_mid_stream",
    "kafkarestart": "test_kafka_broker_restarted_mid_stream",
    "pgrestart": "test_postgres_restarted_mid_stream",
    "savepoint": "test_stop_with_savepoint_and_resume",
    "rescale1": "test_savepoint_and_resume_at_another_parallelism[1]",
    "rescale4": "test_savepoint_and_resume_at_another_parallelism[4]",
}
_FIGURES = re.compile(r"^FAILOVER (.*)$", re.M)


def run_once(scenario: str) -> dict[str, str]:
    """One pytest run of the scenario: its figures, duration and outcome."""
    started = time.monotonic()
    test = f"tests/e2e/test_billing_semantics.py::{TESTS[scenario]}"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", test],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    out = {
        "outcome": "passed" if r.returncode == 0 else f"FAILED (exit {r.returncode})",
        "seconds": f"{time.monotonic() - started:.0f}",
    }
    match = _FIGURES.search(r.stdout)
    if match:
        out.update(dict(pair.split("=", 1) for pair in match.group(1).split()))
    if r.returncode:
        failure = [ln for ln in r.stdout.splitlines() if ln.startswith("E ")]
        out["error"] = failure[0][2:].strip()[:160] if failure else r.stdout.strip().splitlines()[-1][:160]
    return out


@click.command()
@click.option("--runs", default=5, show_default=True)
@click.option("--scenario", type=click.Choice(sorted(TESTS)), default="tmkill", show_default=True)
def main(runs: int, scenario: str) -> None:
    """Run the scenario ``runs`` times; print one table row per run as it finishes."""
    columns = [
        "run",
        "outcome",
        "seconds",
        "restarts",
        "restored_checkpoint",
        "checkpoints_failed",
        "checkpoint_held_back",
        "sent",
        "counted",
        "late",
        "boundary",
        "duplicates",
        "dead_letters",
        "windows",
        "error",
    ]
    click.echo("| " + " | ".join(columns) + " |")
    click.echo("|" + "---|" * len(columns))
    failed = 0
    for i in range(1, runs + 1):
        row = {"run": str(i), **run_once(scenario)}
        failed += row["outcome"] != "passed"
        click.echo("| " + " | ".join(row.get(c, "") for c in columns) + " |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
