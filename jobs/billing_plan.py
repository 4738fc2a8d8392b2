"""Pure SQL for the billing branch: where the forwarder's outcome rows end.

The forwarder records every outcome in the Postgres ledger itself (it must, before the next
checkpoint); its output stream only has to reach a sink so the branch is part of the job.
"""

from __future__ import annotations

BILLING_OUTCOMES_VIEW = "billing_outcomes"
BILLING_OUTCOMES_SINK_TABLE = "billing_outcomes_sink"


def billing_outcomes_sink_ddl() -> str:
    """A discarding sink for the outcome rows (the ledger is their record)."""
    return (
        f"CREATE TABLE `{BILLING_OUTCOMES_SINK_TABLE}` (\n"
        "  `identifier` STRING, `status` STRING, `attempts` INT, `detail` STRING\n"
        ") WITH ('connector' = 'blackhole')"
    )


def billing_outcomes_insert() -> str:
    """Every outcome row into the discarding sink."""
    return f"INSERT INTO `{BILLING_OUTCOMES_SINK_TABLE}` SELECT `identifier`, `status`, `attempts`, `detail` FROM `{BILLING_OUTCOMES_VIEW}`"
