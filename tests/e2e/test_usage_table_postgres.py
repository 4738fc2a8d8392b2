"""The usage table's guard on the real Postgres: what a commit of the window sink may change.

Batches are committed again after a restore, and the window closer may close a window a second time
with more events (a source partition that rejoined behind the others): Postgres must then hold the
same final value billing bills in total (the first value plus the correction), never an older
revision, and nothing but a newer final row may change a final row.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

import pytest

from sinks.postgres import connect, fetch_usage
from sinks.postgres_schema import USAGE_WRITE_COLUMNS, usage_table_ddl, usage_upsert_sql

pytestmark = [pytest.mark.e2e]

START = datetime(2026, 12, 5, 10, 0)
END = datetime(2026, 12, 5, 10, 1)


@pytest.fixture
def usage_cfg(e2e_stack):
    cfg, _ = e2e_stack.config(
        f"usage-guard-{uuid.uuid4().hex[:6]}", postgres={"usage_table": f"usage_guard_{uuid.uuid4().hex[:6]}"}
    )
    with connect(cfg.postgres) as conn:
        for statement in usage_table_ddl(cfg.postgres.usage_table):
            conn.execute(statement)
    return cfg


def _commit(cfg, quantity: str, revision: int, final: bool) -> None:
    """One window row as the window sink's committer writes it (its statement, JDBC marks as psycopg's)."""
    row = dict(
        tenant_id="t",
        customer_id="c",
        meter="tokens",
        dimensions_key="{}",
        window_start=START,
        window_end=END,
        quantity=Decimal(quantity),
        event_count=revision,
        revision=revision,
        is_final=final,
    )
    with connect(cfg.postgres) as conn:
        conn.execute(
            usage_upsert_sql(cfg.postgres.usage_table).replace("?", "%s"), [row[c] for c in USAGE_WRITE_COLUMNS]
        )


def _row(cfg):
    rows = [r for r in fetch_usage(cfg.postgres)]
    assert len(rows) == 1
    return rows[0].quantity, rows[0].revision, rows[0].is_final


def test_a_window_closed_again_with_more_events_keeps_the_newer_final(usage_cfg):
    cfg = usage_cfg
    _commit(cfg, "3", 3, False)
    _commit(cfg, "2", 2, False)  # an older batch committed again after a restore
    assert _row(cfg) == (Decimal("3"), 3, False)
    _commit(cfg, "5", 5, True)  # the closer's final row
    _commit(cfg, "5", 5, True)  # the same batch again
    assert _row(cfg) == (Decimal("5"), 5, True)
    _commit(cfg, "7", 7, False)  # the window operator re-fires after a late partition rejoined: not final
    assert _row(cfg) == (Decimal("5"), 5, True)
    _commit(cfg, "7", 7, True)  # the closer closes it again: billing bills 5, then a correction of 2
    assert _row(cfg) == (Decimal("7"), 7, True)
    _commit(cfg, "6", 6, True)  # an older final never wins
    _commit(cfg, "8", 8, False)  # nor a newer row that is not final
    assert _row(cfg) == (Decimal("7"), 7, True)
