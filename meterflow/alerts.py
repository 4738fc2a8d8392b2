"""Threshold alerts as plain rules: a tenant's rule, when a customer's usage crosses it, the crossing's
identifier, the webhook's body, and the retry policy of its delivery.

A rule (meter, threshold, period, basis) holds for every customer of its tenant. Its period is the
customer's billing period or local day (meterflow/billing_cycle.py). Its basis is ``provisional``
(every window counted so far) or ``final`` (final windows only). A crossing is recorded once per
rule, customer and period: its identifier is derived from those three, and the ledger's primary
key refuses a second, so a re-evaluation (a window committed again after a restore, a second
service) records nothing new. The webhook carries that identifier as ``webhook-id``: a receiver that
got it before (a delivery whose answer was lost is sent again) knows it is the same alert.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from base64 import b64encode
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from meterflow.billing_cycle import BillingCycle

AlertPeriod = Literal["billing_period", "day"]
Basis = Literal["provisional", "final"]
PERIODS: tuple[str, ...] = ("billing_period", "day")
BASES: tuple[str, ...] = ("provisional", "final")
STATUSES: tuple[str, ...] = ("pending", "failed", "sent", "dead")
EVENT_TYPE = "usage.threshold.crossed"
_RULE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class AlertRule:
    rule_id: str
    tenant_id: str
    meter: str
    threshold: Decimal
    period: AlertPeriod
    basis: Basis

    def __post_init__(self) -> None:
        if not _RULE_ID.match(self.rule_id):
            msg = f"a rule id is 1-64 letters, digits or _.:-, got {self.rule_id!r}"
            raise ValueError(msg)
        if not self.threshold.is_finite() or self.threshold <= 0:
            msg = f"a threshold is a positive decimal, got {self.threshold}"
            raise ValueError(msg)
        if self.period not in PERIODS or self.basis not in BASES:
            msg = f"period is one of {PERIODS}, basis one of {BASES}"
            raise ValueError(msg)


def spans(rule: AlertRule, cycle: BillingCycle, since: datetime, until: datetime) -> list[tuple[datetime, datetime]]:
    """The rule's periods (naive UTC) that overlap ``[since, until]``: where changed usage may have crossed."""
    end = until + timedelta(microseconds=1)
    return cycle.periods(since, end) if rule.period == "billing_period" else cycle.days(since, end)


def crossed(rule: AlertRule, provisional_total: Decimal, final_total: Decimal) -> Decimal | None:
    """The total that reached the rule's threshold on its basis, or None."""
    total = final_total if rule.basis == "final" else provisional_total
    return total if total >= rule.threshold else None


def crossing_id(rule_id: str, tenant_id: str, customer_id: str, period_start: datetime) -> str:
    """One identifier per rule, customer and period: the ledger's key and the webhook's ``webhook-id``."""
    text = "\x1f".join((tenant_id, rule_id, customer_id, period_start.isoformat()))
    return "xing_" + hashlib.sha256(text.encode()).hexdigest()[:40]


def retry_delay(attempts: int, base: timedelta, cap: timedelta) -> timedelta:
    """The wait after the ``attempts``-th failed attempt: ``base`` doubled each time, at most ``cap``."""
    return min(base * (2 ** max(attempts - 1, 0)), cap)


def is_delivered(status_code: int) -> bool:
    """Standard Webhooks: any 2xx answer is a delivery; anything else is tried again."""
    return 200 <= status_code < 300


def new_signing_secret() -> str:
    """A Standard Webhooks signing secret (``whsec_`` + base64 of 32 random bytes)."""
    return "whsec_" + b64encode(secrets.token_bytes(32)).decode()


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds") + "Z"


@dataclass(frozen=True)
class Crossing:
    crossing_id: str
    rule_id: str
    tenant_id: str
    customer_id: str
    meter: str
    period: str
    basis: str
    period_start: datetime
    period_end: datetime
    threshold: Decimal
    total: Decimal
    crossed_at: datetime

    def body(self) -> dict[str, object]:
        """The webhook's JSON body, as Standard Webhooks lays it out (type, timestamp, data)."""
        return {
            "type": EVENT_TYPE,
            "timestamp": _iso(self.crossed_at),
            "data": {
                "crossing_id": self.crossing_id,
                "rule_id": self.rule_id,
                "tenant_id": self.tenant_id,
                "customer_id": self.customer_id,
                "meter": self.meter,
                "period": self.period,
                "basis": self.basis,
                "period_start": _iso(self.period_start),
                "period_end": _iso(self.period_end),
                "threshold": format(self.threshold.normalize(), "f"),
                "total": format(self.total.normalize(), "f"),
            },
        }
