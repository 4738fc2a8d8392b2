"""The delivery ledger on Postgres for the async deliverer (psycopg's asyncio connections).

Thin over sinks/ledger_schema.py. Every write is committed before its caller goes on, never held
for a Flink checkpoint: the ledger records what happened at the provider, which no checkpoint can
roll back. The writes of concurrent deliveries are batched into one transaction each
(:class:`StatementBatches`): the commit, not the statement, is most of a write's cost. The hot
statements (claim, carry, sent) are set-based, so a batch writes each of them once for all its
callers (:class:`SetStatement`): per statement, most of the cost is in the client and the server's
round of parse, plan and execute, not in the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import operator
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

import psycopg

from billing.deliveries import ClosedWindow, Delivery, LedgerEntry, MeterEvent, window_delivery
from meterflow.config import JobConfig
from meterflow.destinations import STRIPE
from meterflow.errors import SinkError
from meterflow.window_row import epoch_ms, from_epoch_ms
from sinks.carry_schema import carry_value_sql
from sinks.ledger_schema import (
    CLAIM_KEY,
    CLAIM_ROW_PARAMS,
    SENT_ROW_PARAMS,
    WINDOW_CLAIM_KEY,
    accepted_total_sql,
    claim_existing_sql,
    claim_new_sql,
    defer_sql,
    delivery_state_sql,
    delivery_value_sql,
    delivery_window_sql,
    due_retries_sql,
    hold_sql,
    mark_sent_sql,
    mark_sql,
    record_check_sql,
    release_leases_sql,
    reported_dead_sql,
    window_state_sql,
)
from sinks.routing_schema import delivery_destinations_sql, recorded_elsewhere_sql, window_destinations_sql


@dataclass(frozen=True)
class SetStatement:
    """A set-based statement: one execution serves every caller of a batch.

    ``sql`` takes each name of ``per_row`` as an array, one element per caller, and every other
    parameter as one value its callers share (callers that differ there are written apart). Each
    answer row ends with the columns of ``key``, in that order: a caller gets the row whose key is
    its own parameters', without those columns, or None. Callers with the same key are written
    apart too (Postgres changes a row once per statement).
    """

    sql: str
    per_row: tuple[str, ...]
    key: tuple[str, ...]

    # Asked once or twice per delivery: the names' lookups are built once.
    @functools.cached_property
    def _row_names(self) -> frozenset[str]:
        return frozenset(self.per_row)

    @functools.cached_property
    def _key_getter(self) -> Callable[[dict], Any]:
        return operator.itemgetter(*self.key)

    def caller_key(self, params: dict) -> tuple:
        """The key of a caller's parameters (see the class docstring)."""
        key = self._key_getter(params)
        return key if len(self.key) > 1 else (key,)

    def shared(self, params: dict) -> Hashable:
        rows = self._row_names
        return tuple(sorted((name, value) for name, value in params.items() if name not in rows))

    def params_of(self, callers: list[dict]) -> dict:
        rows = self._row_names
        shared = {name: value for name, value in callers[0].items() if name not in rows}
        return shared | {name: [p[name] for p in callers] for name in self.per_row}

    def answers(self, rows: list[tuple], callers: list[dict]) -> list[tuple | None]:
        n = len(self.key)
        found = {tuple(row[-n:]): tuple(row[:-n]) for row in rows}
        return [found.get(self.caller_key(p)) for p in callers]


Statement = str | SetStatement


class StatementBatches:
    """Ledger statements of concurrent deliveries, written together: one transaction, one round trip.

    Each delivery's ledger call is one statement. Calls that arrive while earlier batches are being
    written wait and go out as one batch: one transaction in pipeline mode, so one commit and one
    network round trip for all of them instead of one each (the ledger's cost per delivery is mostly
    commits). Every caller still gets its own statement's row once the batch has committed, so a
    caller never reads ``sent`` before it is durable. A batch that fails is written again statement
    by statement, so a bad statement fails only its own caller.
    """

    def __init__(
        self, connection: Callable[[], contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection]], writers: int
    ) -> None:
        """``writers``: batches written at once (on their own connections); more calls wait for the next batch."""
        self._connection, self._writers = connection, writers
        self._pending: list[tuple[Statement, dict, asyncio.Future]] = []
        self._running: set[asyncio.Task] = set()
        self.batches = self.statements = self.executions = self.written_apart = 0

    async def fetchone(self, sql: Statement, params: dict) -> tuple | None:
        """Run ``sql`` in the next batch; its first row (None without one or without RETURNING), or
        for a :class:`SetStatement` the row of this caller."""
        return await self.submit(sql, params)

    def submit(self, sql: Statement, params: dict) -> asyncio.Future[tuple | None]:
        """:meth:`fetchone` without a coroutine: the answer's future (many callers' at once, cheaply)."""
        answer: asyncio.Future[tuple | None] = asyncio.get_running_loop().create_future()
        self._pending.append((sql, params, answer))
        self._start_writer()
        return answer

    def _start_writer(self) -> None:
        if self._pending and len(self._running) < self._writers:
            task = asyncio.ensure_future(self._write_next())
            self._running.add(task)
            task.add_done_callback(self._writer_done)

    def _writer_done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._start_writer()

    async def _write_next(self) -> None:
        # One turn of the event loop first: every delivery started together joins this batch.
        await asyncio.sleep(0)
        batch, self._pending = self._pending, []
        if not batch:
            return
        self.batches, self.statements = self.batches + 1, self.statements + len(batch)
        try:
            async with self._connection() as conn:
                rows, executions = await _write_batch(conn, [(sql, params) for sql, params, _ in batch])
            self.executions += executions
        except psycopg.Error:
            self.written_apart += 1
            await self._write_one_by_one(batch)
            return
        except BaseException as e:
            for _, _, answer in batch:
                if not answer.done():
                    answer.set_exception(e)
            raise
        for (_, _, answer), row in zip(batch, rows, strict=True):
            if not answer.done():
                answer.set_result(row)

    async def _write_one_by_one(self, batch: list[tuple[Statement, dict, asyncio.Future]]) -> None:
        for sql, params, answer in batch:
            try:
                async with self._connection() as conn:
                    [row], _ = await _write_batch(conn, [(sql, params)])
            except Exception as e:  # noqa: BLE001 - handed to the caller, whose statement it was
                if not answer.done():
                    answer.set_exception(e)
            else:
                if not answer.done():
                    answer.set_result(row)


def _executions(statements: list[tuple[Statement, dict]]) -> list[tuple[Statement, list[int]]]:
    """The statements of a batch as executions: each set-based statement once for its callers."""
    executions: list[tuple[Statement, list[int]]] = []
    open_sets: dict[tuple[SetStatement, Hashable], tuple[list[int], set[tuple]]] = {}
    for i, (sql, params) in enumerate(statements):
        if isinstance(sql, str):
            executions.append((sql, [i]))
            continue
        shared = (sql, sql.shared(params))
        group = open_sets.get(shared)
        key = sql.caller_key(params)
        if group is None or key in group[1]:
            group = ([], set())
            open_sets[shared] = group
            executions.append((sql, group[0]))
        group[0].append(i)
        group[1].add(key)
    return executions


async def _write_batch(
    conn: psycopg.AsyncConnection, statements: list[tuple[Statement, dict]]
) -> tuple[list[tuple | None], int]:
    """Run statements in one transaction (pipeline mode when more than one execution): each one's
    first row or None, and how many executions that took."""
    executions = _executions(statements)

    async def run(sql: Statement, callers: list[int]) -> psycopg.AsyncCursor:
        if isinstance(sql, str):
            return await conn.execute(sql, statements[callers[0]][1])
        return await conn.execute(sql.sql, sql.params_of([statements[i][1] for i in callers]))

    if len(executions) == 1:
        cursors = [await run(*executions[0])]
    else:
        async with conn.transaction(), conn.pipeline():
            cursors = [await run(sql, callers) for sql, callers in executions]
    answers: list[tuple | None] = [None] * len(statements)
    for (sql, callers), cur in zip(executions, cursors, strict=True):
        rows = await cur.fetchall() if cur.description else []
        if isinstance(sql, str):
            answers[callers[0]] = rows[0] if rows else None
        elif cur.description:
            for i, row in zip(callers, sql.answers(rows, [statements[i][1] for i in callers]), strict=True):
                answers[i] = row
    return answers, len(executions)


class AsyncPostgresLedger:
    """The Ledger of billing/delivery.py; ``worker`` names this worker's claims (unique per run)."""

    def __init__(self, cfg: JobConfig, worker: str, connections: int = 2, *, provider: str | None = None) -> None:
        """``connections``: batches written at once, each on its own connection; ``provider``: the
        destination whose accepted totals it reads (Stripe by default)."""
        self.table, self.customers, self.carry, self.worker = (
            cfg.billing.ledger_table,
            cfg.billing.customers_table,
            cfg.billing.carry_table,
            worker,
        )
        self.cycles = cfg.billing.cycles_table
        self.lease_s = cfg.billing.retry_lease.total_seconds()
        self.provider = provider or cfg.billing.provider
        self.destinations = list(cfg.billing.destination_names())
        self.prefix = cfg.billing.identifier_prefix
        self._pg = cfg.postgres
        self._size = connections
        self._idle: asyncio.Queue[psycopg.AsyncConnection] | None = None
        self._unopened = connections
        self._all: list[psycopg.AsyncConnection] = []
        self.batches = StatementBatches(self._conn, writers=connections)
        # Built once: the hot statements are asked for per delivery.
        self._claim_window, self._claim_correction = (
            SetStatement(
                claim_new_sql(self.table, self.customers, window=window),
                CLAIM_ROW_PARAMS,
                WINDOW_CLAIM_KEY if window else CLAIM_KEY,
            )
            for window in (True, False)
        )
        self._carry_value = SetStatement(
            carry_value_sql(self.table, self.carry, self.cycles), ("identifier",), ("identifier",)
        )
        self._mark_sent = SetStatement(mark_sent_sql(self.table), SENT_ROW_PARAMS, ("identifier",))

    async def _connect(self) -> psycopg.AsyncConnection:
        password = self._pg.password.get_secret_value() if self._pg.password else None
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._pg.conninfo(), password=password, connect_timeout=5, autocommit=True
            )
        except psycopg.OperationalError as e:
            msg = f"cannot connect to Postgres at {self._pg.host}:{self._pg.port}/{self._pg.database}: {e}"
            raise SinkError(msg) from e
        self._all.append(conn)
        return conn

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[psycopg.AsyncConnection]:
        # Opened on demand, up to the pool's size: a connection that cannot be opened (Postgres away)
        # fails its caller and leaves its place for the next one, never a pool that waits forever.
        if self._idle is None:
            self._idle, self._unopened = asyncio.Queue(), self._size
        if self._idle.empty() and self._unopened > 0:
            self._unopened -= 1
            try:
                conn = await self._connect()
            except BaseException:
                self._unopened += 1
                raise
        else:
            conn = await self._idle.get()
        try:
            if conn.closed or conn.broken:
                # Once only: should the new connection fail too (Postgres still away), the broken
                # one goes back to the pool and the next caller tries again.
                if conn in self._all:
                    self._all.remove(conn)
                conn = await self._connect()
            yield conn
        finally:
            self._idle.put_nowait(conn)

    async def _fetchone(self, sql: Statement, params: dict) -> tuple | None:
        return await self.batches.fetchone(sql, params)

    async def _execute(self, sql: Statement, params: dict) -> None:
        await self.batches.fetchone(sql, params)

    async def close(self) -> None:
        for conn in self._all:
            await conn.close()
        self._all.clear()
        self._idle = None

    # -- routing (billing/routing.py Routes) -------------------------------------------------------
    async def _fetchall(self, sql: str, params: dict) -> list[tuple]:
        async with self._conn() as conn:
            return await (await conn.execute(sql, params)).fetchall()

    async def destinations_of(self, windows: Sequence[ClosedWindow]) -> list[str]:
        params = {
            "identifier": [window_delivery(w, self.prefix).identifier for w in windows],
            "tenant_id": [w.tenant_id for w in windows],
            "customer_id": [w.customer_id for w in windows],
            "meter": [w.meter for w in windows],
            "dimensions_key": [w.dimensions_key for w in windows],
            "window_start_ms": [epoch_ms(w.window_start) for w in windows],
            "window_end_ms": [epoch_ms(w.window_end) for w in windows],
            "destinations": self.destinations,
            "default": STRIPE,
        }
        return [r[0] for r in await self._fetchall(window_destinations_sql(self.table, self.customers), params)]

    async def recorded_elsewhere(self) -> bool:
        rows = await self._fetchall(recorded_elsewhere_sql(self.table), {"destinations": self.destinations})
        return bool(rows[0][0])

    async def destinations_of_deliveries(self, identifiers: Sequence[str]) -> dict[str, str]:
        rows = await self._fetchall(delivery_destinations_sql(self.table), {"identifier": list(identifiers)})
        return {identifier: destination for identifier, destination in rows}

    # -- the Ledger protocol ---------------------------------------------------------------------
    def _claim_params(self, delivery: Delivery, provider: str, event_name: str, *, retry: bool) -> dict:
        w = delivery.window
        return {
            "identifier": delivery.identifier,
            "provider": provider,
            "kind": delivery.kind,
            "window_identifier": delivery.window_identifier,
            "tenant_id": w.tenant_id,
            "customer_id": w.customer_id,
            "meter": w.meter,
            "dimensions_key": w.dimensions_key,
            "window_start_ms": epoch_ms(w.window_start),
            "window_end_ms": epoch_ms(w.window_end),
            "quantity": delivery.quantity,
            "event_count": w.event_count,
            "revision": delivery.revision,
            "event_name": event_name,
            "lease_s": self.lease_s,
            "worker": self.worker,
            "retry": retry,
        }

    async def claim(self, delivery: Delivery, provider: str, event_name: str, *, retry: bool) -> LedgerEntry:
        params = self._claim_params(delivery, provider, event_name, retry=retry)
        window = delivery.kind == "window" and not retry
        if retry:
            row = await self._fetchone(claim_existing_sql(self.table, self.customers), params)
        else:
            row = await self._fetchone(self._claim_window if window else self._claim_correction, params)
        if row is not None:
            return _entry(row, claimed=True)
        row = await self._fetchone(
            window_state_sql(self.table, self.customers) if window else delivery_state_sql(self.table, self.customers),
            params,
        )
        if row is None:
            msg = f"delivery {delivery.identifier} vanished from the ledger"
            raise SinkError(msg)
        return _entry(row, claimed=False)

    async def claim_windows(
        self, deliveries: Sequence[Delivery], provider: str, event_names: Sequence[str]
    ) -> list[LedgerEntry]:
        if any(d.kind != "window" for d in deliveries):
            msg = "claim_windows takes windows' own deliveries only"
            raise ValueError(msg)
        params = [
            self._claim_params(d, provider, name, retry=False) for d, name in zip(deliveries, event_names, strict=True)
        ]
        rows = await asyncio.gather(*(self.batches.submit(self._claim_window, p) for p in params))
        unclaimed = [i for i, row in enumerate(rows) if row is None]
        states = await asyncio.gather(
            *(self.batches.submit(window_state_sql(self.table, self.customers), params[i]) for i in unclaimed)
        )
        entries = [_entry(row, claimed=True) if row is not None else None for row in rows]
        for i, state in zip(unclaimed, states, strict=True):
            if state is None:
                msg = f"delivery {deliveries[i].identifier} vanished from the ledger"
                raise SinkError(msg)
            entries[i] = _entry(state, claimed=False)
        return cast("list[LedgerEntry]", entries)

    async def delivery(self, identifier: str) -> Delivery | None:
        row = await self._fetchone(delivery_window_sql(self.table), {"identifier": identifier})
        if row is None:
            return None
        ident, kind, parent, tenant, customer, meter, dims, start, end, quantity, count, revision = row
        window = ClosedWindow(
            tenant, customer, meter, dims, from_epoch_ms(int(start)), from_epoch_ms(int(end)), quantity, count, revision
        )
        return Delivery(ident, kind, parent, window, quantity, revision)

    async def mark_sent(self, identifier: str, event: MeterEvent, response_id: str, attempts: int) -> None:
        await self._execute(self._mark_sent, _sent_params(identifier, event, response_id, attempts))

    async def mark_all_sent(self, sent: Sequence[tuple[str, MeterEvent, str, int]]) -> None:
        await asyncio.gather(*(self.batches.submit(self._mark_sent, _sent_params(*each)) for each in sent))

    async def mark_failed(self, identifier: str, attempts: int, error: str, delay: float) -> None:
        await self._execute(
            mark_sql(self.table, "failed"),
            {"identifier": identifier, "attempts": attempts, "error": error, "delay_s": delay},
        )

    async def mark_dead(self, identifier: str, attempts: int, reason: str) -> None:
        await self._execute(
            mark_sql(self.table, "dead"), {"identifier": identifier, "attempts": attempts, "error": reason}
        )

    async def mark_rejected(self, identifier: str, reason: str) -> None:
        await self._execute(mark_sql(self.table, "rejected"), {"identifier": identifier, "error": reason})

    async def defer(self, identifier: str, until: float) -> None:
        await self._execute(defer_sql(self.table), {"identifier": identifier, "until": until, "worker": self.worker})

    async def hold(self, identifier: str, until: float) -> None:
        await self._execute(hold_sql(self.table), {"identifier": identifier, "until": until, "worker": self.worker})

    async def record_check(self, identifier: str, decision: str, *, resend: bool) -> None:
        await self._execute(
            record_check_sql(self.table), {"identifier": identifier, "decision": decision, "resend": resend}
        )

    async def accepted_total(
        self, identifier: str, provider_customer_id: str, event_name: str, start: int, end: int
    ) -> Decimal:
        params = {
            "identifier": identifier,
            "provider": self.provider,
            "provider_customer_id": provider_customer_id,
            "event_name": event_name,
            "start": start,
            "end": end,
        }
        row = await self._fetchone(accepted_total_sql(self.table), params)
        return Decimal(row[0]) if row else Decimal(0)

    async def carry_value(self, identifier: str) -> Decimal:
        row = await self._fetchone(self._carry_value, {"identifier": identifier})
        if row is None:  # fixed already, by an attempt before this one
            row = await self._fetchone(delivery_value_sql(self.table), {"identifier": identifier})
        if row is None or row[0] is None:
            msg = f"delivery {identifier} has no value in the ledger"
            raise SinkError(msg)
        return Decimal(row[0])

    async def carry_values(self, identifiers: Sequence[str]) -> list[Decimal]:
        rows = await asyncio.gather(*(self.batches.submit(self._carry_value, {"identifier": i}) for i in identifiers))
        fixed_before = [i for i, row in zip(identifiers, rows, strict=True) if row is None]
        earlier = await asyncio.gather(
            *(self.batches.submit(delivery_value_sql(self.table), {"identifier": i}) for i in fixed_before)
        )
        found = dict(zip(identifiers, rows, strict=True)) | dict(zip(fixed_before, earlier, strict=True))
        values = []
        for identifier in identifiers:
            row = found[identifier]
            if row is None or row[0] is None:
                msg = f"delivery {identifier} has no value in the ledger"
                raise SinkError(msg)
            values.append(Decimal(row[0]))
        return values


def _sent_params(identifier: str, event: MeterEvent, response_id: str, attempts: int) -> dict:
    """The parameters of one delivery's ``sent`` outcome (mark_sent_sql: SENT_ROW_PARAMS)."""
    return {
        "identifier": identifier,
        "attempts": attempts,
        "value": event.value,
        "provider_customer_id": event.provider_customer_id,
        "response_id": response_id,
    }


def _entry(row: tuple, *, claimed: bool) -> LedgerEntry:
    """A state row (ledger_schema's state columns: LedgerEntry's first eight fields, then the
    window's corrections total and revision, then the fixed value) as an entry."""
    state = cast("tuple[Any, Any, Any, Any, Any, Any, Any, Any]", row[:8])
    corrections_total, corrections_revision, value = row[8:]
    return LedgerEntry(*state, Decimal(corrections_total), int(corrections_revision), claimed, value)


def due_retries(conn: psycopg.Connection, cfg: JobConfig, limit: int, scanner: str = "retry-scan") -> list[tuple]:
    """(identifier, tenant, customer, meter, dimensions_key, window start ms, window end ms) of every delivery due for a retry, leased by ``scanner``."""
    params = {
        "destinations": list(cfg.billing.destination_names()),
        "lease_s": cfg.billing.retry_lease.total_seconds(),
        "limit": limit,
        "scanner": scanner,
    }
    return conn.execute(due_retries_sql(cfg.billing.ledger_table), params).fetchall()


def release_leases(conn: psycopg.Connection, cfg: JobConfig, prefix: str, worker: str) -> list[str]:
    """Make due at once what earlier runs named ``<prefix>*`` (not ``worker``) held leased; their identifiers."""
    params = {"destinations": list(cfg.billing.destination_names()), "prefix": f"{prefix}%", "worker": worker}
    return [r[0] for r in conn.execute(release_leases_sql(cfg.billing.ledger_table), params).fetchall()]


def mark_reported(conn: psycopg.Connection, cfg: JobConfig, request_id: str, reason: str) -> list[str]:
    """Mark dead the sent deliveries of a request the provider reported errors for; their identifiers."""
    params = {"provider": cfg.billing.provider, "request_id": request_id, "reason": reason}
    return [r[0] for r in conn.execute(reported_dead_sql(cfg.billing.ledger_table), params).fetchall()]
