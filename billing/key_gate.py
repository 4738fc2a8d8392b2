"""Per-key turns and backoff for the deliverer (billing/delivery.py), in one worker's memory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field


@dataclass
class KeyGate:
    """Per-key serialisation and backoff: at most one delivery of a key runs, and a failing key waits."""

    locks: dict[Hashable, asyncio.Lock] = field(default_factory=dict)
    users: dict[Hashable, int] = field(default_factory=dict)
    not_before: dict[Hashable, float] = field(default_factory=dict)
    slots: dict[Hashable, float] = field(default_factory=dict)  # per key: the last turn handed to a parked delivery
    # Where a key's calls run at once (not one_call_per_key): its calls between send and outcome, and
    # who waits for none to be left (a check of the provider's totals, which holds the key's lock).
    calling: dict[Hashable, int] = field(default_factory=dict)
    drain_waiters: dict[Hashable, list[asyncio.Future]] = field(default_factory=dict)

    def lock(self, key: Hashable) -> _KeyLock:
        return _KeyLock(self, key)

    @contextlib.asynccontextmanager
    async def call(self, key: Hashable) -> AsyncIterator[None]:
        """One of a key's concurrent calls, from send to recorded outcome. It starts only while no
        check holds the key's lock, so the check reads the provider and the ledger with nothing of
        the key in between."""
        while not self.start_call(key):
            async with self.lock(key):
                pass
        try:
            yield
        finally:
            self.end_call(key)

    def start_call(self, key: Hashable) -> bool:
        """Start one of a key's calls at once (as :meth:`call`), unless a check holds the key: False."""
        if (held := self.locks.get(key)) is not None and held.locked():
            return False
        self.calling[key] = self.calling.get(key, 0) + 1
        return True

    def end_call(self, key: Hashable) -> None:
        """A call :meth:`start_call` started has its outcome recorded."""
        self.calling[key] -= 1
        if not self.calling[key]:
            del self.calling[key]
            for waiter in self.drain_waiters.pop(key, []):
                if not waiter.done():
                    waiter.set_result(None)

    def busy(self, key: Hashable) -> bool:
        """Whether anyone holds or waits for the key's lock."""
        return key in self.users

    async def drained(self, key: Hashable) -> None:
        """Wait until none of the key's calls is between send and outcome (hold the key's lock first)."""
        while self.calling.get(key):
            waiter = asyncio.get_running_loop().create_future()
            self.drain_waiters.setdefault(key, []).append(waiter)
            await waiter

    def crowded(self, key: Hashable, limit: int) -> bool:
        """Whether the key already holds ``limit`` deliveries (calling or waiting for its lock)."""
        return self.users.get(key, 0) >= limit

    def next_turn(self, key: Hashable, now: float, pace: float) -> float:
        """When a delivery parked now should come back: after those holding the key and those parked
        before it, one call's time (``pace``) each, so a burst returns spread out, not all at once."""
        start = max(self.slots.get(key, 0.0), now + self.users.get(key, 0) * pace)
        self.slots[key] = start + pace
        for stale in [k for k, t in self.slots.items() if t < now]:
            del self.slots[stale]
        return self.slots[key]

    def backing_off(self, key: Hashable, now: float) -> float | None:
        """Until when the key backs off, or None."""
        until = self.not_before.get(key)
        if until is not None and until <= now:
            del self.not_before[key]
            return None
        return until

    def back_off(self, key: Hashable, until: float) -> None:
        self.not_before[key] = max(until, self.not_before.get(key, 0.0))

    def recovered(self, key: Hashable) -> None:
        self.not_before.pop(key, None)


class _KeyLock:
    """``async with gate.lock(key)``: the key's lock, forgotten when nobody holds or waits for it."""

    def __init__(self, gate: KeyGate, key: Hashable) -> None:
        self.gate, self.key = gate, key

    async def __aenter__(self) -> None:
        gate = self.gate
        gate.users[self.key] = gate.users.get(self.key, 0) + 1
        try:
            await gate.locks.setdefault(self.key, asyncio.Lock()).acquire()
        except BaseException:  # cancelled while waiting: no longer a user of the key
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.gate.locks[self.key].release()
        self._leave()

    def _leave(self) -> None:
        gate = self.gate
        gate.users[self.key] -= 1
        if not gate.users[self.key]:
            del gate.users[self.key], gate.locks[self.key]
