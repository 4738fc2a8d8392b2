"""Threshold alert rules without Postgres: a rule's limits one past each, when a total crosses on each
basis, one identifier per rule, customer and period, the periods a change is checked in, the
webhook's body and the retry policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from meterflow.alerts import (
    AlertRule,
    Crossing,
    crossed,
    crossing_id,
    is_delivered,
    new_signing_secret,
    retry_delay,
    spans,
)
from meterflow.billing_cycle import BillingCycle


def _rule(**kw: object) -> AlertRule:
    fields: dict = dict(
        rule_id="r1", tenant_id="t", meter="api_calls", threshold=Decimal(100), period="billing_period", basis="final"
    )
    return AlertRule(**{**fields, **kw})


@pytest.mark.parametrize(
    "kw",
    [
        {"rule_id": "r" * 65},
        {"rule_id": "a b"},
        {"threshold": Decimal(0)},
        {"threshold": Decimal("NaN")},
        {"period": "week"},
        {"basis": "maybe"},
    ],
)
def test_a_rule_past_its_limits_is_refused(kw):
    with pytest.raises(ValueError):
        _rule(**kw)


def test_a_rule_at_its_limits_is_taken():
    assert _rule(rule_id="r" * 64, threshold=Decimal("0.000000001")).rule_id == "r" * 64


def test_a_total_crosses_on_its_rules_basis_only():
    assert crossed(_rule(), provisional_total=Decimal(150), final_total=Decimal(99)) is None
    assert crossed(_rule(), Decimal(150), Decimal(100)) == Decimal(100)
    assert crossed(_rule(basis="provisional"), Decimal(100), Decimal(0)) == Decimal(100)


def test_one_identifier_per_rule_customer_and_period():
    at = datetime(2026, 12, 1)
    ident = crossing_id("r1", "t", "c", at)
    assert ident == crossing_id("r1", "t", "c", at) and ident.startswith("xing_")
    others = {
        crossing_id("r2", "t", "c", at),
        crossing_id("r1", "t2", "c", at),
        crossing_id("r1", "t", "c2", at),
        crossing_id("r1", "t", "c", at + timedelta(days=31)),
    }
    assert ident not in others and len(others) == 4


def test_a_change_is_checked_in_the_periods_it_falls_in():
    cycle = BillingCycle(15, "Europe/Paris")
    changed = (datetime(2026, 12, 14, 22), datetime(2026, 12, 14, 23, 30))  # across the period's start
    assert spans(_rule(), cycle, *changed) == [
        (datetime(2026, 11, 14, 23), datetime(2026, 12, 14, 23)),
        (datetime(2026, 12, 14, 23), datetime(2027, 1, 14, 23)),
    ]
    assert len(spans(_rule(period="day"), cycle, *changed)) == 2


def test_the_retry_policy_doubles_up_to_its_cap():
    base, cap = timedelta(seconds=2), timedelta(minutes=1)
    assert [retry_delay(n, base, cap).total_seconds() for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]
    assert [is_delivered(s) for s in (200, 204, 299, 300, 410, 500)] == [True, True, True, False, False, False]


def test_the_webhook_body_is_exact_and_verifies_with_its_secret():
    xing = Crossing(
        "xing_1",
        "r1",
        "t",
        "c",
        "api_calls",
        "billing_period",
        "final",
        datetime(2026, 12, 1),
        datetime(2027, 1, 1),
        Decimal("100.000000000"),
        Decimal("100.500000000"),
        datetime(2026, 12, 7, 18),
    )
    body = xing.body()
    assert (
        body["type"] == "usage.threshold.crossed"
        and body["data"]["total"] == "100.5"
        and body["data"]["threshold"] == "100"
    )
    secret = new_signing_secret()
    assert secret.startswith("whsec_") and secret != new_signing_secret()
    payload = b'{"a":1}'

    def headers(at: datetime) -> dict[str, str]:
        signature = Webhook(secret).sign("xing_1", at, payload)
        return {"webhook-id": "xing_1", "webhook-timestamp": str(int(at.timestamp())), "webhook-signature": signature}

    assert Webhook(secret).verify(payload, headers(datetime.now(UTC))) == {"a": 1}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_signing_secret()).verify(payload, headers(datetime.now(UTC)))  # another secret
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(payload, headers(datetime(2020, 1, 1, tzinfo=UTC)))  # signed long ago: replayed


def test_the_alerts_metrics_are_the_catalogs():
    from prometheus_client import CollectorRegistry

    from meterflow.config import JobConfig
    from meterflow.metrics_catalog import ALERTS_METRICS
    from meterflow.serve.alerts_worker import AlertWorker

    registry = CollectorRegistry()
    worker = AlertWorker(JobConfig(), connection=lambda: None, registry=registry)  # type: ignore[arg-type,return-value]
    worker.deliveries.labels("sent")
    worker.backlog.labels("dead")
    names = {s.name for m in registry.collect() for s in m.samples if not s.name.endswith("_created")}
    assert names == ALERTS_METRICS, "the names ops/alerts.yml may read"
