"""Which final windows `meterflow billing republish` publishes again: those billing never saw at their final revision."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import fastavro

from billing.reconcile import LedgerWindow, unpublished
from connectors.avro_codec import encode_closed_window
from connectors.avro_types import AVRO_DIR, load_schema

START = datetime(2026, 12, 5, 10, 0)


def _key(customer: str) -> tuple:
    return ("t", customer, "tokens", "{}", START, START + timedelta(minutes=1))


def _delivery(
    customer: str, revision: int, kind: str = "window", status: str = "sent", correction_id: str | None = None
) -> LedgerWindow:
    return LedgerWindow(
        "t",
        customer,
        "tokens",
        "{}",
        START,
        START + timedelta(minutes=1),
        Decimal(1),
        status,
        None,
        kind,
        revision,
        correction_id,
    )


def test_missing_and_older_revisions_are_republished_and_nothing_else():
    finals = [
        (_key("a"), 3, Decimal(3)),
        (_key("b"), 5, Decimal(5)),
        (_key("c"), 5, Decimal(5)),
        (_key("d"), 4, Decimal(1)),
        (_key("e"), 2, Decimal(2)),
        (_key("f"), 6, Decimal(1)),
    ]
    ledger = [
        _delivery("b", 3),  # billed at 3 (quantity 1), final is 5: the newer close never reached billing
        _delivery("c", 3),
        _delivery("c", 5, kind="correction"),  # the newer close was billed as a correction
        _delivery("d", 4, status="dead"),  # billing has it (dead: `billing replay`, not a republish)
        _delivery("e", 1),
        _delivery(
            "e", 9, kind="correction", correction_id="late-1"
        ),  # a late-event correction says nothing of the final
        _delivery("f", 2),  # closed again with zero-quantity events: same total, nothing to bill, not chosen again
    ]
    assert unpublished(finals, ledger) == [_key("a"), _key("b"), _key("e")]
    assert unpublished([], ledger) == []


def test_a_republished_record_is_the_usage_jobs_closed_window():
    window = {
        "tenant_id": "t",
        "customer_id": "c",
        "meter": "tokens",
        "dimensions_key": "{}",
        "window_start": START.replace(tzinfo=UTC),
        "window_end": datetime(2026, 12, 5, 10, 1, tzinfo=UTC),
        "quantity": Decimal("1.250000000"),
        "event_count": 3,
        "revision": 3,
    }
    schema = fastavro.parse_schema(load_schema(AVRO_DIR / "closed_window.avsc"))
    assert fastavro.schemaless_reader(io.BytesIO(encode_closed_window(window)), schema) == window
