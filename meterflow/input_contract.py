"""The input contract: what a usage event may contain, with every limit, checked before anything is stored.

The job enforces it in the JVM, in the Kafka source's format (jvm/ ``dev.meterflow.format.InputContract``),
before a record is deduplicated, keyed or written anywhere; ``meterflow produce`` checks the same rules
before it sends (``contract_violation``). tests/unit/test_input_contract.py keeps the two in step.

Every limit sits well below the first downstream limit it protects:

* Postgres btree index rows (2,704 bytes): the usage and ledger keys are ``tenant_id`` + ``customer_id``
  + ``meter`` + the group-by key (at most ``MAX_GROUP_BY`` dimensions, each JSON-escaped) + a
  timestamp, at most ``max_window_key_bytes()`` bytes.
* Postgres text (no NUL) and every log and terminal: no control characters anywhere.
* The window sink's checkpoint serializer (65,535 bytes per string) and Kafka records: a valid event
  is at most a few KB whatever its content.
* ``numeric(38, 9)``: a single quantity is at most ``MAX_ABS_QUANTITY``; a window whose sum of
  ``|quantity|`` would pass ``MAX_WINDOW_ABS_SUM`` refuses the event that would take it there.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

# UTF-8 byte lengths of the identifying strings, at most (an empty or blank one is a "missing field"):
MAX_ID_BYTES = {"event_id": 128, "tenant_id": 64, "customer_id": 128, "meter": 64}
MAX_DIMENSIONS = 16
MAX_DIMENSION_KEY_BYTES = 64
MAX_DIMENSION_VALUE_BYTES = 128
# Dimensions a meter may group by (each adds one JSON-escaped key and value to the window key).
MAX_GROUP_BY = 4
# |quantity| of one event; with 9 fractional digits, 24 significant digits at most.
MAX_ABS_QUANTITY = Decimal(10) ** 15
# The largest decimal(38, 9): a window's sum of |quantity| per (tenant, customer, meter) stays within it.
# Written out: Decimal arithmetic rounds to 28 digits, so 10**29 - 1e-9 would come out as 10**29.
MAX_WINDOW_ABS_SUM = Decimal("99999999999999999999999999999.999999999")
POSTGRES_BTREE_MAX_BYTES = 2704


def control_character(text: str) -> int | None:
    """Index of the first Unicode control character (C0, DEL or C1: category Cc), else None."""
    for i, ch in enumerate(text):
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return i
    return None


def _check_text(name: str, value: str, low: int, high: int) -> str | None:
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as e:
        # Only a Python str can hold one (JSON "\ud800"); it has no UTF-8 form, so Avro cannot carry it.
        return f"contract: {name} has lone surrogate U+{ord(value[e.start]):04X} at character {e.start}"
    if size < low or size > high:
        return (
            f"contract: {name} is {size} bytes, at most {high}"
            if size > high
            else f"contract: {name} is {size} bytes, at least {low}"
        )
    at = control_character(value)
    if at is not None:
        return f"contract: {name} has control character U+{ord(value[at]):04X} at character {at}"
    return None


def contract_violation(event: Mapping[str, Any]) -> str | None:
    """Why ``event`` breaks the input contract, in the job's words, or None when it keeps it."""
    for name, limit in MAX_ID_BYTES.items():
        reason = _check_text(name, event[name], 0, limit)
        if reason:
            return reason
    dimensions = event.get("dimensions") or {}
    if len(dimensions) > MAX_DIMENSIONS:
        return f"contract: {len(dimensions)} dimensions, at most {MAX_DIMENSIONS}"
    for key, value in dimensions.items():
        reason = _check_text("dimension key", key, 1, MAX_DIMENSION_KEY_BYTES) or _check_text(
            f"dimension {key[:64]!r}", value, 0, MAX_DIMENSION_VALUE_BYTES
        )
        if reason:
            return reason
    quantity = Decimal(event["quantity"])
    if abs(quantity) > MAX_ABS_QUANTITY:
        return f"contract: |quantity| exceeds {MAX_ABS_QUANTITY:f}"
    return None


def max_window_key_bytes() -> int:
    """The largest usage/ledger key a valid event can make, in bytes (JSON escaping doubles at most)."""
    ids = MAX_ID_BYTES["tenant_id"] + MAX_ID_BYTES["customer_id"] + MAX_ID_BYTES["meter"]
    per_dimension = 2 * MAX_DIMENSION_KEY_BYTES + 2 * MAX_DIMENSION_VALUE_BYTES + 6  # "k":"v", escaped
    return ids + 2 + MAX_GROUP_BY * per_dimension + 8 + 64  # braces, timestamp, tuple overhead


# A dead letter is the input message (at most kafka.max_message_bytes), a reason cut to
# MAX_REASON_CHARS characters, its coordinates and Avro and Kafka record overhead: the dead-letter
# topic and its writer allow this much more than the input topic, so every input record fits.
MAX_REASON_CHARS = 1000
DEAD_LETTER_HEADROOM_BYTES = 65_536
