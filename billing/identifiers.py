"""Deterministic identifiers for billing deliveries (pure).

The same closed window always yields the same identifier, so a replay after a failover is
deduplicated by the provider instead of billed twice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal
from typing import Literal

from meterflow.window_row import epoch_ms

MAX_IDENTIFIER_LENGTH = 100  # Stripe meter event `identifier`
Rounding = Literal["carry", "decimal", "exact", "half_up", "ceil", "floor"]
_ROUNDING = {"half_up": ROUND_HALF_UP, "ceil": ROUND_CEILING, "floor": ROUND_FLOOR}


@dataclass(frozen=True)
class WindowKey:
    """Identity of one closed usage window: its key and its span (start and end, so its size)."""

    tenant_id: str
    customer_id: str
    meter: str
    dimensions_key: str
    window_start: datetime  # naive UTC
    window_end: datetime


def derive_identifier(key: WindowKey, prefix: str = "mf") -> str:
    """``<prefix>-<window start ms>-<sha256 of the key>``, at most 100 characters.

    The fields are joined with a separator that cannot occur in them (NUL), so distinct keys can
    never collide by concatenation. The window's end is hashed too: windows of two sizes that start
    together (a changed ``event_time.window_size``) have different identifiers.

    A window billed before identifiers held the end keeps the identifier it was first recorded
    with: the ledger finds a window's delivery by its key and span, not by this string.
    """
    canonical = "\x00".join(
        [
            key.tenant_id,
            key.customer_id,
            key.meter,
            key.dimensions_key,
            str(epoch_ms(key.window_start)),
            str(epoch_ms(key.window_end)),
        ]
    )
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    identifier = f"{prefix}-{epoch_ms(key.window_start)}-{digest}"
    return identifier[:MAX_IDENTIFIER_LENGTH]


def format_meter_value(quantity: Decimal, rounding: Rounding = "exact") -> str:
    """The provider's string value: the exact decimal, or a whole number rounded as configured.

    ``decimal`` keeps every digit (trailing zeros dropped, never an exponent); ``exact`` refuses a
    fractional quantity rather than rounding it silently.
    """
    if rounding == "decimal":
        if quantity == quantity.to_integral_value():
            return format(quantity.to_integral_value(), "f")
        return format(quantity.normalize(), "f")
    if rounding == "exact":
        if quantity != quantity.to_integral_value():
            msg = f"quantity {quantity} is not a whole number; configure a rounding for this meter"
            raise ValueError(msg)
        return format(quantity.to_integral_value(), "f")
    if rounding not in _ROUNDING:  # carry: the value depends on the month's running total, fixed by the ledger
        msg = f"a {rounding!r} meter's value is fixed by the ledger (billing/whole_values.py), not rounded per window"
        raise ValueError(msg)
    return format(quantity.quantize(Decimal(1), rounding=_ROUNDING[rounding]), "f")


def derive_correction_identifier(window_identifier: str, revision: int) -> str:
    """A correction's identifier: ``<window identifier>-r<revision>``, hashed when that would exceed 100 characters.

    Deterministic from the window and the revision that made the correction necessary, so a
    correction resent after a failover is deduplicated like the window's own event.
    """
    identifier = f"{window_identifier}-r{revision}"
    if len(identifier) <= MAX_IDENTIFIER_LENGTH:
        return identifier
    digest = hashlib.sha256(identifier.encode()).hexdigest()
    return f"{window_identifier.split('-', 1)[0]}-c-{digest}"[:MAX_IDENTIFIER_LENGTH]


def derive_late_correction_identifier(window_identifier: str, correction_id: str) -> str:
    """A correction from late events: ``<window identifier>-l<16 hex of the correction id's hash>``.

    Deterministic from the window and the correction (itself derived from the window and its late
    events), so a re-run of ``corrections apply`` or a failover resends the same identifier. The
    ``-l`` form never collides with a changed final's ``-r<revision>``.
    """
    digest = hashlib.sha256(correction_id.encode()).hexdigest()
    identifier = f"{window_identifier}-l{digest[:16]}"
    if len(identifier) <= MAX_IDENTIFIER_LENGTH:
        return identifier
    combined = hashlib.sha256(f"{window_identifier}\x00{correction_id}".encode()).hexdigest()
    return f"{window_identifier.split('-', 1)[0]}-c-{combined}"[:MAX_IDENTIFIER_LENGTH]
