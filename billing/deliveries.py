"""Billing deliveries of closed windows (pure core): what to send, and what each answer leads to.

A closed window is one meter event at the provider; a window published again with another final
value adds a *correction*, a meter event for the difference. Every delivery's identifier is
derived from the window (and, for a correction, the revision), so every retry, replay or failover
re-sends the *same* event and the provider deduplicates it, for as long as it deduplicates
(``billing.provider_dedup_window``, 24 h at Stripe). Past that, a resend is decided by asking the
provider what it holds (:func:`judge_provider_totals`).

No I/O here: the async driver (billing/delivery.py) injects the provider, the ledger, the clock and
the sleep; the Flink job, the replay command and the tests drive the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Literal

from billing.identifiers import (
    WindowKey,
    derive_correction_identifier,
    derive_identifier,
    derive_late_correction_identifier,
    format_meter_value,
)
from billing.whole_values import STRIPE_DECIMALS, STRIPE_WHOLE, value_refusal
from meterflow.config import MeterConfig
from meterflow.config_values import format_duration
from meterflow.errors import DeliveryRejected
from meterflow.window_row import epoch_ms, from_epoch_ms
from meterflow.windowing import outside_provider_window

DeliveryStatus = Literal["pending", "sent", "failed", "dead"]
DeliveryKind = Literal["window", "correction"]


@dataclass(frozen=True)
class ClosedWindow:
    """A window that can no longer change, with its final value."""

    tenant_id: str
    customer_id: str
    meter: str
    dimensions_key: str
    window_start: datetime  # naive UTC, the one form of window times in Python
    window_end: datetime  # exclusive
    quantity: Decimal
    event_count: int
    revision: int

    @property
    def key(self) -> WindowKey:
        """The window's identity, from which the identifier is derived."""
        return WindowKey(
            self.tenant_id, self.customer_id, self.meter, self.dimensions_key, self.window_start, self.window_end
        )

    @classmethod
    def from_fields(cls, fields: tuple) -> ClosedWindow:
        """From a closed-window row of the bridge: times as epoch ms, quantity as an exact decimal string."""
        tenant, customer, meter, dims, start, end, quantity, count, revision = fields
        try:
            exact = Decimal(quantity)
        except InvalidOperation as e:
            msg = f"window quantity {quantity!r} is not a decimal"
            raise DeliveryRejected(msg) from e
        return cls(
            tenant,
            customer,
            meter,
            dims,
            from_epoch_ms(int(start)),
            from_epoch_ms(int(end)),
            exact,
            int(count),
            int(revision),
        )


@dataclass(frozen=True)
class Delivery:
    """One meter event owed to the provider: a window's value, or a correction of it."""

    identifier: str
    kind: DeliveryKind
    window_identifier: str
    window: ClosedWindow
    quantity: Decimal  # the event's quantity: the window's value, or the difference a correction adds
    revision: int


# The start of the refusal of a delivery whose customer has no mapping (sinks/routing_schema.py rehomes them).
NO_CUSTOMER = "no billing customer mapped"


@dataclass(frozen=True)
class DeliveryLimits:
    """What the deliverer enforces for one destination: its time window, its dedup horizon and its pace."""

    max_age: timedelta
    max_ahead: timedelta
    dedup_window: timedelta
    calls_per_second: float


@dataclass(frozen=True)
class MeterEvent:
    """What the provider receives for one delivery."""

    identifier: str
    event_name: str
    provider_customer_id: str
    value: str
    timestamp: int  # unix seconds: the window start, so the usage falls in the period the window began in


@dataclass(frozen=True)
class LedgerEntry:
    """A delivery's row as the ledger holds it, with what the deliverer needs around it."""

    identifier: str
    kind: DeliveryKind
    status: DeliveryStatus
    attempts: int
    quantity: Decimal
    revision: int
    first_attempt_at: float | None  # unix s of the first call (or of the resend after a provider check)
    provider_customer_id: str | None  # from the customer mapping, at the time of reading
    corrections_total: Decimal = Decimal(0)  # window rows: sum of the window's correction rows
    corrections_revision: int = 0  # window rows: the highest revision of those corrections
    claimed: bool = True  # False: the row exists but was not handed to this attempt (final, or scheduled)
    value: str | None = None  # the value fixed when it was first attempted (carried meters), else None


@dataclass(frozen=True)
class Sent:
    identifier: str
    response_id: str
    attempts: int


@dataclass(frozen=True)
class Retry:
    identifier: str
    delay: float
    attempts: int
    error: str


@dataclass(frozen=True)
class Dead:
    identifier: str
    reason: str
    attempts: int


@dataclass(frozen=True)
class Skipped:
    """Nothing to send: the ledger already holds a final outcome, or the retry scan owns the delivery."""

    identifier: str
    status: str


@dataclass(frozen=True)
class Deferred:
    """Not attempted now: the (customer, meter) is backing off; the retry scan picks it up at ``until``."""

    identifier: str
    until: float


Outcome = Sent | Retry | Dead | Skipped | Deferred


def window_identifier(window: ClosedWindow, prefix: str) -> str:
    """The window's deterministic identifier (also its Idempotency-Key)."""
    return derive_identifier(window.key, prefix)


def window_delivery(window: ClosedWindow, prefix: str) -> Delivery:
    """The delivery of a window's value."""
    identifier = window_identifier(window, prefix)
    return Delivery(identifier, "window", identifier, window, window.quantity, window.revision)


def as_recorded(delivery: Delivery, entry: LedgerEntry) -> Delivery:
    """The delivery as the ledger first recorded it: an identifier is always sent with the value it
    was first claimed with, so a window published again with another final (a republish, a re-fire)
    retries the recorded value and the difference goes out as a correction. The identifier is the
    recorded one too: a window first billed under an identifier of an earlier form keeps it."""
    if (delivery.identifier, delivery.quantity, delivery.revision) == (
        entry.identifier,
        entry.quantity,
        entry.revision,
    ):
        return delivery
    window = replace(delivery.window, quantity=entry.quantity, revision=entry.revision)
    identifier = entry.identifier if delivery.kind == "window" else delivery.identifier
    parent = identifier if delivery.kind == "window" else delivery.window_identifier
    return replace(
        delivery,
        identifier=identifier,
        window_identifier=parent,
        window=window,
        quantity=entry.quantity,
        revision=entry.revision,
    )


def correction_needed(window: ClosedWindow, entry: LedgerEntry) -> Delivery | None:
    """A correction when a newer final of the window differs from everything recorded for it, else None.

    Recorded = the window row's value plus every correction, whatever their status: each is owed
    to the provider and will get there (retries, replay). A final with a revision the ledger has
    already seen is a replay of an old publication, never a correction.
    """
    recorded = entry.quantity + entry.corrections_total
    newest = max(entry.revision, entry.corrections_revision)
    if window.revision <= newest or window.quantity == recorded:
        return None
    parent = entry.identifier  # the window's recorded identifier, whatever form it was derived in
    identifier = derive_correction_identifier(parent, window.revision)
    return Delivery(identifier, "correction", parent, window, window.quantity - recorded, window.revision)


def late_correction_delivery(window: ClosedWindow, correction_id: str, prefix: str) -> Delivery:
    """The delivery of a correction from late events: a correction of ``window`` by its delta.

    ``window`` carries the delta as its quantity and the corrected events as its count; revision 0,
    as late events make no new final (the ledger tells these corrections apart by their
    ``correction_id``). Dated like the window's own event: in the original window.
    """
    parent = window_identifier(window, prefix)
    return Delivery(
        derive_late_correction_identifier(parent, correction_id), "correction", parent, window, window.quantity, 0
    )


def delivery_refusal(
    delivery: Delivery,
    meter: MeterConfig | None,
    provider_customer_id: str | None,
    now: datetime,
    max_age: timedelta,
    max_ahead: timedelta,
) -> str | None:
    """Why a delivery must not be sent whatever its value (no meter, no customer, outside the provider's window), or None."""
    window = delivery.window
    if meter is None:
        return f"meter {window.meter!r} is not configured for billing"
    if provider_customer_id is None:
        return f"{NO_CUSTOMER} for tenant {window.tenant_id!r}, customer {window.customer_id!r}"
    return outside_provider_window(window.window_start, now, max_age, max_ahead)


def build_meter_event(
    delivery: Delivery, meter: MeterConfig, provider_customer_id: str, carried: Decimal | None = None
) -> MeterEvent:
    """The provider's meter event for a delivery that :func:`delivery_refusal` let through, or
    DeliveryRejected when its value breaks the provider's rules.

    ``carried``: a carried meter's value, fixed by the ledger (billing/whole_values.py); other meters'
    values come from the delivery's quantity and the meter's rounding.
    """
    if meter.billing_rounding == "carry":
        if carried is None:
            msg = f"delivery {delivery.identifier}: a carried meter's value must be fixed by the ledger first"
            raise ValueError(msg)
        value, rules = format(carried, "f"), STRIPE_WHOLE
    else:
        try:
            value = format_meter_value(delivery.quantity, meter.billing_rounding)
        except ValueError as e:
            raise DeliveryRejected(str(e)) from e
        rules = STRIPE_DECIMALS if meter.billing_rounding == "decimal" else STRIPE_WHOLE
    refused = value_refusal(value, rules)
    if refused:
        raise DeliveryRejected(refused)
    return MeterEvent(
        delivery.identifier,
        meter.event_name,
        provider_customer_id,
        value,
        epoch_ms(delivery.window.window_start) // 1000,
    )


def beyond_dedup_window(first_attempt_at: float | None, now: float, dedup_window: timedelta) -> bool:
    """Whether the provider may have forgotten the identifier of a delivery first sent at ``first_attempt_at``."""
    return first_attempt_at is not None and now - first_attempt_at >= dedup_window.total_seconds()


def replay_refusal(first_attempt_at: datetime | None, now: datetime, dedup_window: timedelta) -> str | None:
    """Why a replay must not re-send a delivery first sent at ``first_attempt_at`` without ``--force``, or None."""
    if first_attempt_at is None or now - first_attempt_at < dedup_window:
        return None
    return (
        f"first sent {first_attempt_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC, more than {format_duration(dedup_window)} ago: the provider "
        "no longer deduplicates its identifier, so a resend could bill it twice; with --force the provider's totals are checked "
        "first and it is re-sent only if the provider does not have it"
    )


@dataclass(frozen=True)
class ProviderTotals:
    """What the provider's meter summary and the ledger say about one customer, meter and time range."""

    start: int  # unix s, inclusive, on a minute boundary (the provider's summary granularity)
    end: int  # unix s, exclusive
    provider_total: Decimal  # the provider's aggregated value for the range
    ledger_accepted: Decimal  # what the ledger has as sent in the range, this delivery excluded
    value: Decimal  # this delivery's value


ProviderVerdict = Literal["found", "absent", "ambiguous"]
# The summary's aggregated value is a JSON number (a binary float at the provider): compare with a
# tolerance far below any billed unit, never with float equality.
SUMMARY_TOLERANCE = Decimal("0.000001")


def judge_provider_totals(t: ProviderTotals) -> tuple[ProviderVerdict, str]:
    """Whether the provider already holds this delivery, judged from its totals.

    ``found``: the provider's total includes this value on top of what the ledger knows was
    accepted; ``absent``: it equals what the ledger knows without it (a resend is safe);
    ``ambiguous``: neither, and a person must look (another event in the range, or a summary that
    is not up to date yet).
    """

    def near(a: Decimal, b: Decimal) -> bool:
        return abs(a - b) <= SUMMARY_TOLERANCE

    with_it = t.ledger_accepted + t.value
    described = f"provider total {t.provider_total} for [{datetime.fromtimestamp(t.start, UTC):%Y-%m-%d %H:%M}, {datetime.fromtimestamp(t.end, UTC):%H:%M}) UTC, ledger {t.ledger_accepted} without this event, value {t.value}"
    if near(t.provider_total, with_it) and not near(t.value, Decimal(0)):
        return "found", f"found at the provider ({described}): marked sent, not re-sent"
    if near(t.provider_total, t.ledger_accepted):
        return "absent", f"not at the provider ({described}): re-sent"
    return "ambiguous", f"provider and ledger disagree ({described}): not re-sent, check the provider's dashboard"


def summary_range(window: ClosedWindow) -> tuple[int, int]:
    """The minute-aligned range (unix s) around a window's event timestamp for the provider's summary.

    Events are timestamped at the window start, so the range covers [start, start + 1 s) rounded
    out to whole minutes: the provider's summaries start and end on minute boundaries.
    """
    start = epoch_ms(window.window_start) // 1000
    return start - start % 60, start - start % 60 + 60


@dataclass(frozen=True)
class CustomerMapping:
    """One row of a customer mapping import: a tenant's customer and the provider's customer id."""

    tenant_id: str
    customer_id: str
    provider_customer_id: str


def parse_customer_csv(text: str) -> tuple[list[CustomerMapping], list[str]]:
    """Parse ``tenant_id,customer_id,provider_customer_id`` CSV (header required); bad rows come back as reasons."""
    import csv
    import io

    reader = csv.DictReader(io.StringIO(text))
    wanted = ("tenant_id", "customer_id", "provider_customer_id")
    missing = [c for c in wanted if c not in (reader.fieldnames or [])]
    if missing:
        return [], [f"header must name {', '.join(wanted)}; missing {', '.join(missing)}"]
    mappings: list[CustomerMapping] = []
    problems: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    for line, row in enumerate(reader, start=2):
        values = [(row.get(c) or "").strip() for c in wanted]
        if not all(values):
            problems.append(f"line {line}: every column needs a value")
            continue
        mapping = CustomerMapping(*values)
        key = (mapping.tenant_id, mapping.customer_id)
        if key in seen and seen[key] != mapping.provider_customer_id:
            problems.append(
                f"line {line}: {key[0]}/{key[1]} is mapped twice, to {seen[key]} and {mapping.provider_customer_id}"
            )
            continue
        seen[key] = mapping.provider_customer_id
        mappings.append(mapping)
    return mappings, problems
