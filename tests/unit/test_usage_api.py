"""The usage API without Postgres: the query's rules and limits one past each, when a total is
final, corrections added to the totals they fall in, and the route on a recording source (keys,
the tenant's own customers only, the current period by default) and the usage page."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from fastapi.testclient import TestClient

from meterflow.billing_cycle import BillingCycle
from meterflow.config import JobConfig
from meterflow.serve.app import KeyCache, create_app
from meterflow.serve.ingest import RequestRefusedError, hash_api_key, new_api_key
from meterflow.serve.usage import (
    MAX_DAYS,
    MAX_LISTED_CORRECTIONS,
    MAX_PERIODS,
    CountedCorrection,
    Total,
    UsageQuery,
    UsageRead,
    answer,
    check_query,
    plain,
    status_of,
    sum_corrections,
)

NOW = datetime(2026, 12, 7, 18, 0)
KEY_A, KEY_B = new_api_key(), new_api_key()
TENANTS = {hash_api_key(KEY_A): "tenant-a", hash_api_key(KEY_B): "tenant-b"}


def test_without_from_the_query_is_the_customers_current_period_per_day():
    q = check_query("c", BillingCycle(15, "Europe/Paris"), NOW)
    assert (q.since, q.until) == (datetime(2026, 11, 14, 23), datetime(2026, 12, 14, 23))
    assert len(q.spans) == 30 and q.spans[0] == (datetime(2026, 11, 14, 23), datetime(2026, 11, 15, 23))


def test_from_alone_reads_to_the_end_of_its_period_and_spans_are_whole():
    q = check_query("c", BillingCycle(), NOW, since="2026-10-10T05:00:00+02:00", granularity="period")
    assert q.spans == ((datetime(2026, 10, 1), datetime(2026, 11, 1)),)
    q = check_query(
        "c", BillingCycle(), NOW, since="2026-10-10T12:00:00Z", until="2026-10-10T12:30:00Z", granularity="window"
    )
    assert (q.since, q.until, q.spans) == (datetime(2026, 10, 10, 12), datetime(2026, 10, 10, 12, 30), ())


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"granularity": "hour"}, "granularity is one of"),
        ({"since": "yesterday"}, "from is not an ISO-8601"),
        ({"since": "2026-10-10T00:00:00Z", "until": "2026-10-10T00:00:00Z"}, "to must be later"),
        ({"group_by": "a,b,c,d,e"}, "at most 4 dimensions"),
        ({"meter": "m" * 65}, "meter must be 1-64 bytes"),
        ({"meter": "bad\nmeter"}, "meter must be"),
        (
            {"since": "2025-11-01T00:00:00Z", "until": "2026-12-01T00:00:01Z", "granularity": "period"},
            f"at most {MAX_PERIODS} periods",
        ),
        (
            {"since": "2025-01-01T00:00:00Z", "until": "2026-02-05T00:00:01Z", "granularity": "day"},
            f"at most {MAX_DAYS} days",
        ),
    ],
)
def test_a_query_past_a_limit_is_refused_with_its_reason(params, reason):
    with pytest.raises(RequestRefusedError) as refused:
        check_query("c", BillingCycle(), NOW, **params)
    assert refused.value.status == 400 and reason in refused.value.reason


def test_the_limits_themselves_are_taken():
    assert (
        len(
            check_query(
                "c",
                BillingCycle(),
                NOW,
                since="2025-12-01T00:00:00Z",
                until="2026-12-31T00:00:00Z",
                granularity="period",
            ).spans
        )
        == MAX_PERIODS
    )
    assert check_query("c", BillingCycle(), NOW, group_by="a,b,c,d", meter="m" * 64).group_by == ("a", "b", "c", "d")
    assert check_query("c", BillingCycle(), NOW, since="2025-01-01T00:00:00Z", until="2026-02-05T00:00:00Z").spans


def test_a_total_is_final_only_when_all_its_windows_are_and_its_end_is_closed():
    end = datetime(2026, 12, 2)
    assert status_of(10, 10, end, datetime(2026, 12, 2)) == "final"
    assert status_of(10, 9, end, datetime(2026, 12, 3)) == "provisional"
    assert status_of(10, 10, end, datetime(2026, 12, 1, 23, 59)) == "provisional"
    assert status_of(0, 0, end, None) == "provisional"


def test_corrections_count_in_the_total_their_window_starts_in_and_in_its_group():
    q = check_query(
        "c", BillingCycle(), NOW, since="2026-12-01T00:00:00Z", until="2026-12-03T00:00:00Z", group_by="region"
    )
    day1, day2 = q.spans
    totals = [
        Total("tokens", {"region": "eu"}, *day1, Decimal("10.500000000"), 3, 2, 2, 4),
        Total("tokens", {"region": "us"}, *day1, Decimal("1"), 1, 1, 1, 1),
        Total("tokens", {"region": "eu"}, *day2, Decimal("2"), 1, 1, 0, 1),
    ]
    fix = CountedCorrection(
        "corr-1",
        "tokens",
        '{"region":"eu"}',
        datetime(2026, 12, 1, 23, 59),
        datetime(2026, 12, 2),
        Decimal("-0.5"),
        "applied",
        NOW,
    )
    read = UsageRead(BillingCycle(), q, totals, sum_corrections(q, [fix]), [fix], datetime(2026, 12, 2, 12))
    body = answer(read, "tenant-a")
    rows = body["usage"]
    assert [(r["group"]["region"], r["quantity"], r["corrected_quantity"], r["status"]) for r in rows] == [
        ("eu", "10.5", "10", "final"),
        ("eu", "2", "2", "provisional"),
        ("us", "1", "1", "final"),
    ]
    assert body["corrections"][0]["delta"] == "-0.5" and body["final_through"] == "2026-12-02T12:00:00.000Z"


def test_every_correction_counts_and_the_first_are_listed_one_past_the_limit():
    """One more correction than are listed: all count in the total and in corrections_count, the earliest
    windows' are listed (the reader reads them in that order)."""
    q = check_query("c", BillingCycle(), NOW, since="2026-12-01T00:00:00Z", until="2026-12-02T00:00:00Z")
    fixes = [
        CountedCorrection(
            f"corr-{i:05d}",
            "tokens",
            "{}",
            datetime(2026, 12, 1) + timedelta(minutes=i),
            datetime(2026, 12, 1) + timedelta(minutes=i + 1),
            Decimal("0.001"),
            "applied",
            NOW,
        )
        for i in range(MAX_LISTED_CORRECTIONS + 1)
    ]
    total = Total("tokens", {}, *q.spans[0], Decimal("5"), 9, 9, 9, 9)
    [summed] = sum_corrections(q, fixes)
    assert (summed.count, summed.delta) == (MAX_LISTED_CORRECTIONS + 1, Decimal("1.001"))
    body = answer(UsageRead(BillingCycle(), q, [total], [summed], fixes, NOW), "t")
    assert body["usage"][0]["corrected_quantity"] == "6.001"
    assert body["corrections_count"] == MAX_LISTED_CORRECTIONS + 1
    assert (
        len(body["corrections"]) == MAX_LISTED_CORRECTIONS and body["corrections"][-1]["correction_id"] == "corr-00999"
    )


def test_a_correction_of_a_span_without_windows_counts_in_a_total_of_zero():
    q = check_query("c", BillingCycle(), NOW, since="2026-12-01T00:00:00Z", until="2026-12-03T00:00:00Z")
    late_only = CountedCorrection(
        "corr-2", "gauge", "{}", datetime(2026, 12, 2, 8), datetime(2026, 12, 2, 8, 1), Decimal("4"), "applied", NOW
    )
    read = UsageRead(BillingCycle(), q, [], sum_corrections(q, [late_only]), [late_only], datetime(2026, 12, 3))
    [row] = answer(read, "t")["usage"]
    assert (row["meter"], row["start"], row["quantity"], row["corrected_quantity"], row["status"]) == (
        "gauge",
        "2026-12-02T00:00:00.000Z",
        "0",
        "4",
        "final",
    )


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"since": "1999-12-31T23:59:59Z"}, "from must lie in [2000, 2200)"),
        ({"since": "9999-12-15T00:00:00Z"}, "from must lie in"),
        ({"since": "0001-01-01T00:00:00+05:00"}, "from is not an ISO-8601"),
        (
            {"since": "2026-12-01T00:00:00Z", "until": "2026-12-08T00:00:01Z", "granularity": "window"},
            "at most 7 days of windows",
        ),
        ({"since": "0001-02-01T00:00:00Z", "until": "9999-11-01T00:00:00Z", "granularity": "period"}, "must lie in"),
        (
            {"since": "2001-01-01T00:00:00Z", "until": "2199-11-01T00:00:00Z", "granularity": "period"},
            "at most 13 periods",
        ),
    ],
)
def test_far_and_wide_ranges_are_refused_before_anything_is_listed(params, reason):
    with pytest.raises(RequestRefusedError) as refused:
        check_query("c", BillingCycle(), NOW, **params)
    assert reason in refused.value.reason
    assert check_query(
        "c", BillingCycle(), NOW, since="2026-12-01T00:00:00Z", until="2026-12-08T00:00:00Z", granularity="window"
    )


def test_plain_decimals_never_take_an_exponent():
    assert [plain(Decimal(v)) for v in ("0E-9", "100.000000000", "1E+3", "-0.000000001")] == [
        "0",
        "100",
        "1000",
        "-0.000000001",
    ]


class RecordingSource:
    def __init__(self) -> None:
        self.reads: list[tuple[str, UsageQuery]] = []
        self.customers = {("tenant-a", "cust-1"): BillingCycle(1, "America/New_York")}
        self.cycles_asked: list[str] = []

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        self.closed = True

    async def usage(
        self, tenant_id: str, customer_id: str, ask: Callable[[BillingCycle], UsageQuery]
    ) -> UsageRead | None:
        self.cycles_asked.append(customer_id)
        cycle = self.customers.get((tenant_id, customer_id))
        if cycle is None:
            return None
        query = ask(cycle)
        self.reads.append((tenant_id, query))
        start, end = query.spans[0]
        totals = [Total("api_calls", {}, start, end, Decimal("7.25"), 3, 3, 3, 3)]
        return UsageRead(cycle, query, totals, [], [], datetime(2027, 1, 1))


class NoWriter:
    def write(self, events: object, timeout_s: float) -> list:
        raise AssertionError("the usage API wrote events")


def _client(source: RecordingSource) -> TestClient:
    app = create_app(JobConfig(), NoWriter(), KeyCache(TENANTS.get, 30.0), source, now=lambda: NOW)
    return TestClient(app)


def test_the_route_reads_the_keys_tenant_only_and_answers_its_current_period():
    source = RecordingSource()
    c = _client(source)
    got = c.get("/v1/customers/cust-1/usage?granularity=period", headers={"Authorization": f"Bearer {KEY_A}"})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["cycle"] == {"anchor": "anniversary", "anchor_day": 1, "timezone": "America/New_York"}
    assert body["from"] == "2026-12-01T05:00:00.000Z" and body["usage"][0]["quantity"] == "7.25"
    assert source.reads[0][0] == "tenant-a"
    # Tenant b's key: the same customer id is not one of its customers.
    other = c.get("/v1/customers/cust-1/usage", headers={"Authorization": f"Bearer {KEY_B}"})
    assert other.status_code == 404 and len(source.reads) == 1
    assert c.get("/v1/customers/cust-1/usage").status_code == 401
    bad = c.get("/v1/customers/cust-1/usage?granularity=hour", headers={"Authorization": f"Bearer {KEY_A}"})
    assert bad.status_code == 400 and "granularity" in bad.json()["error"]
    # A customer id outside the input contract never reaches the source.
    control = c.get("/v1/customers/c%00x/usage", headers={"Authorization": f"Bearer {KEY_A}"})
    assert control.status_code == 400 and len(source.reads) == 1 and "c\x00x" not in source.cycles_asked
    metrics = c.get("/metrics").text
    assert 'meterflow_usage_requests_total{code="200"} 1.0' in metrics
    assert 'meterflow_usage_requests_total{code="404"} 1.0' in metrics


def test_the_source_is_opened_and_closed_with_the_service():
    """The reader's pool is opened in the service's event loop when it starts, and closed when it stops."""
    source = RecordingSource()
    with _client(source) as c:
        assert source.opened and not hasattr(source, "closed")
        assert c.get("/v1/customers/cust-1/usage", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
    assert source.closed


def test_postgres_unreachable_is_a_503_to_retry():
    class Down(RecordingSource):
        async def usage(
            self, tenant_id: str, customer_id: str, ask: Callable[[BillingCycle], UsageQuery]
        ) -> UsageRead | None:
            raise RequestRefusedError(503, "usage is unavailable for a moment (PoolTimeout): retry")

    got = _client(Down()).get("/v1/customers/cust-1/usage", headers={"Authorization": f"Bearer {KEY_A}"})
    assert got.status_code == 503 and got.headers["retry-after"] == "1" and "retry" in got.json()["error"]


def test_the_usage_page_is_served_without_the_key_and_reads_it_from_the_fragment():
    page = _client(RecordingSource()).get("/usage/cust-1")
    assert page.status_code == 200 and page.headers["referrer-policy"] == "no-referrer"
    assert "location.hash" in page.text and "const refreshMs = 15000;" in page.text


def test_the_openapi_document_describes_the_usage_api():
    spec = _client(RecordingSource()).get("/openapi.json").json()
    params = {p["name"] for p in spec["paths"]["/v1/customers/{customer_id}/usage"]["get"]["parameters"]}
    assert {"customer_id", "meter", "from", "to", "granularity", "group_by"} <= params


def test_the_services_metrics_are_the_catalogs():
    from meterflow.metrics_catalog import SERVE_METRICS

    c = _client(RecordingSource())
    c.get("/v1/customers/cust-1/usage", headers={"Authorization": f"Bearer {KEY_A}"})
    c.post("/v1/events", json={}, headers={"Authorization": f"Bearer {KEY_A}"})
    text = c.get("/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert {n for n in names if not n.endswith("_created")} == SERVE_METRICS, "the names ops/alerts.yml may read"


def test_days_and_periods_are_bisected_by_their_bounds():
    """The spans of a day or period query follow one another: their bounds are the starts and the last end."""
    q = check_query("cust-1", BillingCycle(15, "Europe/Paris"), NOW, granularity="period", since="2026-10-01T00:00:00Z")
    assert q.bounds == (*(s for s, _ in q.spans), q.spans[-1][1]) and len(q.bounds) == len(q.spans) + 1
    days = check_query("cust-1", BillingCycle(None, "America/New_York"), NOW)
    assert all(a < b for a, b in zip(days.bounds, days.bounds[1:], strict=False))
    gap = UsageQuery(
        "c",
        "day",
        NOW,
        NOW,
        None,
        (),
        ((datetime(2026, 1, 1), datetime(2026, 1, 2)), (datetime(2026, 1, 3), datetime(2026, 1, 4))),
    )
    with pytest.raises(ValueError, match="follow one another"):
        gap.bounds  # noqa: B018


def test_a_kept_key_answer_is_had_without_a_lookup():
    looked_up: list[str] = []
    clock = [0.0]

    def lookup(digest: str) -> str | None:
        looked_up.append(digest)
        return TENANTS.get(digest)

    keys = KeyCache(lookup, 30.0, clock=lambda: clock[0])
    assert keys.cached(KEY_A) == (False, None) and keys.cached(None) == (True, None)
    assert keys.tenant(KEY_A) == "tenant-a" and keys.cached(KEY_A) == (True, "tenant-a") and len(looked_up) == 1
    clock[0] = 31.0
    assert keys.cached(KEY_A) == (False, None)
