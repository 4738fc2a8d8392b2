"""The billing job's metrics: which counters a delivery outcome increments (corrections among them), and the backlog query."""

from __future__ import annotations

import pytest

from billing.deliveries import Dead, Deferred, Retry, Sent, Skipped
from billing.identifiers import WindowKey, derive_correction_identifier, derive_identifier
from jobs.billing_operator import backlog_sql, is_correction, outcome_metrics
from meterflow.window_row import from_epoch_ms

KEY = WindowKey(
    "tenant-1", "cust-1", "api_calls", "", from_epoch_ms(1_700_000_000_000), from_epoch_ms(1_700_000_060_000)
)


@pytest.mark.parametrize("prefix", ["mf", "meterflow-prod", "x" * 30])
def test_corrections_are_told_from_window_events_by_identifier(prefix):
    window = derive_identifier(KEY, prefix)
    assert not is_correction(window)
    assert is_correction(derive_correction_identifier(window, 2))
    assert is_correction(derive_correction_identifier(window, 17))


def test_a_hashed_correction_identifier_is_a_correction():
    """A window identifier of 100 characters leaves no room for ``-r<revision>``: the correction's is hashed."""
    window = derive_identifier(KEY, "p" * 40)
    assert len(window) == 100 and not is_correction(window)
    hashed = derive_correction_identifier(window, 3)
    assert "-c-" in hashed and is_correction(hashed)


def test_outcome_metrics():
    window = derive_identifier(KEY)
    correction = derive_correction_identifier(window, 2)
    assert outcome_metrics(Sent(window, "mev_1", 1)) == ("sent",)
    assert outcome_metrics(Sent(correction, "mev_2", 1)) == ("sent", "corrections")
    assert outcome_metrics(Retry(correction, 1.0, 1, "503")) == ("failed",)
    assert outcome_metrics(Dead(correction, "rejected", 3)) == ("dead",)
    assert outcome_metrics(Skipped(correction, "sent")) == ("skipped",)
    assert outcome_metrics(Deferred(window, 12.0)) == ("deferred",)


def test_backlog_sql_counts_pending_and_failed_at_every_destination():
    sql = backlog_sql("billing_deliveries")
    assert "FROM billing_deliveries WHERE provider = ANY(%(destinations)s::text[])" in sql
    assert "count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'failed')" in sql
    with pytest.raises(ValueError):
        backlog_sql("deliveries; DROP TABLE x")
