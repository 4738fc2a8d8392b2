"""The async ledger's connection pool (sinks/ledger_async.py) when Postgres is away: a connection
that cannot be opened fails its caller and the next caller opens one; the pool never waits forever."""

from __future__ import annotations

import asyncio

import pytest

from meterflow.config import JobConfig
from meterflow.errors import SinkError
from sinks.ledger_async import AsyncPostgresLedger


class FakeConnection:
    closed = broken = False


def test_a_pool_that_could_not_open_its_connections_opens_them_once_postgres_is_back(monkeypatch):
    ledger = AsyncPostgresLedger(JobConfig.model_validate({"billing": {"enabled": True}}), "w1", connections=2)
    away = {"on": True}
    opened: list[FakeConnection] = []

    async def connect() -> FakeConnection:
        if away["on"]:
            raise SinkError("cannot connect to Postgres")
        opened.append(FakeConnection())
        return opened[-1]

    monkeypatch.setattr(ledger, "_connect", connect)

    async def use() -> FakeConnection:
        async with ledger._conn() as conn:
            await asyncio.sleep(0.01)
            return conn

    async def scenario() -> None:
        for _ in range(3):
            with pytest.raises(SinkError):
                await asyncio.wait_for(use(), timeout=1)
        away["on"] = False
        both = await asyncio.wait_for(asyncio.gather(use(), use(), use()), timeout=1)
        assert len(opened) == 2, "never more than the pool's size"
        assert set(map(id, both)) == set(map(id, opened)), "the third caller waited for one of the two"

    asyncio.run(scenario())
