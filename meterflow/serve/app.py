"""The ASGI app of ``meterflow serve`` (FastAPI): ``POST /v1/events``, ``GET /v1/customers/{id}/usage``,
the usage page ``GET /usage/{id}``, ``GET /v1/health``, ``GET /metrics``.

Wiring only: the rules are meterflow/serve/ingest.py's and usage.py's; the writer
(connectors/event_writer.py), the key lookup (sinks/api_keys.py), the usage reader
(usage_reader.py) and the clock are injected, so the tests run the app on fakes too.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Literal, Protocol

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel

from connectors.avro_codec import UsageEvent
from meterflow.billing_cycle import BillingCycle
from meterflow.config import JobConfig
from meterflow.serve.ingest import RequestRefusedError, bearer_key, check_batch, hash_api_key
from meterflow.serve.usage import UsageQuery, UsageRead, answer, check_customer, check_query


class EventWriter(Protocol):
    def write(self, events: Sequence[UsageEvent], timeout_s: float) -> list[str | None]:
        """Each event's error, or None once Kafka acknowledged it."""


class UsageSource(Protocol):
    async def open(self) -> None:
        """Ready to read (in the service's event loop)."""

    async def close(self) -> None: ...

    async def usage(
        self, tenant_id: str, customer_id: str, ask: Callable[[BillingCycle], UsageQuery]
    ) -> UsageRead | None:
        """The customer's cycle, the query ``ask`` makes of it and what it reads (one snapshot), or None
        when the tenant has no such customer."""


class EventOutcome(BaseModel):
    index: int
    event_id: str | None
    status: Literal["accepted", "rejected", "duplicate", "failed"]
    reason: str | None = None


class IngestAnswer(BaseModel):
    """Every event's result, in the request's order."""

    accepted: int
    rejected: int
    duplicates: int
    failed: int
    results: list[EventOutcome]


class KeyCache:
    """Key hash -> tenant (None: unknown or revoked), each answer kept ``ttl_s``."""

    def __init__(
        self,
        lookup: Callable[[str], str | None],
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10_000,
    ) -> None:
        self.lookup, self.ttl_s, self.clock = lookup, ttl_s, clock
        self._known: dict[str, tuple[str | None, float]] = {}
        self.max_entries = max_entries
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Answers kept now (at most ``max_entries``)."""
        return len(self._known)

    def cached(self, key: str | None) -> tuple[bool, str | None]:
        """(True, the key's tenant) when the answer is kept (no key: no tenant), else (False, None): no lookup."""
        if key is None:
            return True, None
        with self._lock:
            known = self._known.get(hash_api_key(key))
        if known is not None and known[1] > self.clock():
            return True, known[0]
        return False, None

    def tenant(self, key: str | None) -> str | None:
        found, tenant = self.cached(key)
        if found or key is None:
            return tenant
        digest = hash_api_key(key)
        now = self.clock()
        tenant = self.lookup(digest)
        with self._lock:
            if len(self._known) >= self.max_entries:
                # Bounded whatever the keys sent: expired answers go first, then the oldest.
                self._known = {d: k for d, k in self._known.items() if k[1] > now}
                while len(self._known) >= self.max_entries:
                    del self._known[next(iter(self._known))]
            self._known[digest] = (tenant, now + self.ttl_s)
        return tenant


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def create_app(
    cfg: JobConfig,
    writer: EventWriter,
    keys: KeyCache,
    usage: UsageSource,
    now: Callable[[], datetime] = _utc_now,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """The service, with its writer, key lookup, usage reader and clock; its metrics in ``registry``
    (shared with the alerts worker) or one of its own."""
    serve = cfg.serve

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # The usage reader's pool belongs to the event loop the service runs in.
        await usage.open()
        try:
            yield
        finally:
            await usage.close()

    app = FastAPI(
        title="meterflow", summary="Usage events in over HTTP, as the usage job reads them.", lifespan=lifespan
    )
    registry = registry if registry is not None else CollectorRegistry()
    events_total = Counter(
        "meterflow_ingest_events", "Events of ingest requests, by result.", ["status"], registry=registry
    )
    requests_total = Counter(
        "meterflow_ingest_requests", "Ingest requests, by HTTP status.", ["code"], registry=registry
    )
    usage_requests = Counter(
        "meterflow_usage_requests", "Usage API requests, by HTTP status.", ["code"], registry=registry
    )
    usage_seconds = Histogram(
        "meterflow_usage_request_seconds",
        "Time to answer a usage API request that was answered 200.",
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        registry=registry,
    )
    in_flight = asyncio.Semaphore(serve.max_requests_in_flight)
    page = (
        resources.files("meterflow.serve")
        .joinpath("usage_page.html")
        .read_text("utf-8")
        .replace("__REFRESH_MS__", str(int(serve.usage_page_refresh.total_seconds() * 1000)))
    )

    async def _tenant(request: Request) -> str | None:
        """The key's tenant: a kept answer without leaving the event loop, else looked up on a worker thread."""
        key = bearer_key(request.headers.get("authorization"))
        known, tenant = keys.cached(key)
        return tenant if known else await run_in_threadpool(keys.tenant, key)

    def answered(response: Response) -> Response:
        requests_total.labels(str(response.status_code)).inc()
        return response

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/events",
        status_code=202,
        response_model=IngestAnswer,
        responses={
            400: {"description": "not one event nor a batch"},
            401: {"description": "no valid API key"},
            413: {"description": "too many events, or too large a body"},
            429: {"description": "too many requests in flight: retry after Retry-After"},
            503: {"description": "Kafka did not acknowledge every event: retry the request after Retry-After"},
        },
    )
    async def ingest(request: Request) -> Response:
        """One event (a JSON object) or a batch (``{"events": [...]}``); 202 once Kafka acknowledged every
        event it accepted, with each event's result. Authorization: ``Bearer <tenant API key>``."""
        tenant = await _tenant(request)
        if tenant is None:
            return answered(
                _error(401, "a valid API key is required: Authorization: Bearer mf_...", {"WWW-Authenticate": "Bearer"})
            )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > serve.max_body_bytes:
            return answered(_error(413, f"the body is larger than {serve.max_body_bytes} bytes"))
        if in_flight.locked():
            return answered(_error(429, "too many requests in flight", {"Retry-After": "1"}))
        async with in_flight:
            # Read up to the limit, never more: a body without Content-Length is cut off there too.
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > serve.max_body_bytes:
                    return answered(_error(413, f"the body is larger than {serve.max_body_bytes} bytes"))
                chunks.append(chunk)
            raw = b"".join(chunks)
            try:
                checked = check_batch(json.loads(raw), tenant, serve.max_batch)
            except ValueError:
                return answered(_error(400, "the body is not JSON"))
            except RequestRefusedError as e:
                return answered(_error(e.status, e.reason))
            timeout = serve.kafka_ack_timeout.total_seconds()
            errors = (
                await run_in_threadpool(writer.write, [e for _, e in checked.to_send], timeout)
                if checked.to_send
                else []
            )
        outcomes = [EventOutcome(**r.__dict__) for r in checked.results]
        for (index, event), error in zip(checked.to_send, errors, strict=True):
            status: Any = "accepted" if error is None else "failed"
            outcomes.append(EventOutcome(index=index, event_id=event["event_id"], status=status, reason=error))
        outcomes.sort(key=lambda o: o.index)
        counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("accepted", "rejected", "duplicate", "failed")}
        for s, n in counts.items():
            if n:
                events_total.labels(s).inc(n)
        answer = IngestAnswer(
            accepted=counts["accepted"],
            rejected=counts["rejected"],
            duplicates=counts["duplicate"],
            failed=counts["failed"],
            results=outcomes,
        )
        if counts["failed"]:
            # Nothing is lost by sending the whole request again: the usage job keeps one event per id.
            return answered(JSONResponse(answer.model_dump(), status_code=503, headers={"Retry-After": "1"}))
        return answered(JSONResponse(answer.model_dump(), status_code=202))

    @app.get(
        "/v1/customers/{customer_id}/usage",
        responses={
            400: {"description": "a parameter is not valid, or the range is too wide"},
            401: {"description": "no valid API key"},
            404: {"description": "the key's tenant has no such customer"},
            503: {"description": "Postgres is unreachable or busy: retry after Retry-After"},
        },
    )
    async def customer_usage(
        customer_id: str,
        request: Request,
        meter: str | None = None,
        since: str | None = Query(None, alias="from", description="ISO-8601; default the current period's start."),
        until: str | None = Query(None, alias="to", description="ISO-8601; default the end of from's period."),
        granularity: str = Query("day", description="window, day (the customer's local days) or period."),
        group_by: str | None = Query(None, description="Comma-separated dimensions to split totals by."),
    ) -> Response:
        """A customer's usage per window, day or billing period, each total provisional or final with its
        revision, and the corrections that count. Authorization: ``Bearer <tenant API key>``."""
        started = time.perf_counter()

        def done(response: Response) -> Response:
            usage_requests.labels(str(response.status_code)).inc()
            if response.status_code == 200:
                usage_seconds.observe(time.perf_counter() - started)
            return response

        tenant = await _tenant(request)
        if tenant is None:
            return done(
                _error(401, "a valid API key is required: Authorization: Bearer mf_...", {"WWW-Authenticate": "Bearer"})
            )
        at = now()

        def ask(cycle: BillingCycle) -> UsageQuery:
            return check_query(
                customer_id,
                cycle,
                at,
                meter=meter,
                since=since,
                until=until,
                granularity=granularity,
                group_by=group_by,
            )

        try:
            check_customer(customer_id)  # before anything reaches Postgres
            found = await usage.usage(tenant, customer_id, ask)
        except RequestRefusedError as e:
            retry = {"Retry-After": "1"} if e.status == 503 else None
            return done(_error(e.status, e.reason, retry))
        if found is None:
            return done(_error(404, f"no customer {customer_id!r} for this key's tenant"))
        return done(JSONResponse(answer(found, tenant)))

    @app.get("/usage/{customer_id}", response_class=HTMLResponse, include_in_schema=False)
    def usage_page(customer_id: str) -> HTMLResponse:
        """The customer's usage page; it reads the API with the key in the address's fragment (#key=...)."""
        return HTMLResponse(page, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})

    return app
