"""Deliveries gathered into provider requests of many events: the batching the batch APIs share.

The deliverer (billing/delivery.py) hands over one delivery at a time, with its retries. A provider
that takes many events per request (Stripe's v2 stream, Metronome, Chargebee) gathers the
deliveries in flight together into one request: at most ``batch_size``, waiting at most ``linger``
for more. Each caller gets its own event's outcome: the request's id, or a ProviderError (the
request's, or the one the answer gave that event). The client-side rate limit paces requests, not
deliveries: one reservation per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar, cast

from billing.retry import RateReservations
from meterflow.errors import ProviderError

Event = TypeVar("Event")
# One request: each event's answer (the request id, or that event's refusal), in the events' order.
Post = Callable[[list[Event]], Awaitable[list[str | ProviderError]]]


class RequestBatches(Generic[Event]):
    """Events gathered into requests made with ``post``; create it inside the event loop that uses it."""

    def __init__(self, post: Post[Event], batch_size: int, linger_s: float) -> None:
        self._post = post
        self._batch_size = batch_size
        self._linger = linger_s
        self._pending: list[tuple[Event, asyncio.Future[str]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._requests: set[asyncio.Task] = set()
        self._rate: RateReservations | None = None
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._slot_wait: asyncio.Task | None = None  # the next request, waiting for its rate slot

    def pace(self, rate: RateReservations, sleep: Callable[[float], Awaitable[None]]) -> None:
        """Reserve one of ``rate``'s slots per request."""
        self._rate, self._sleep = rate, sleep

    async def send(self, event: Event) -> str:
        [answer] = self.enqueue([event])
        return await answer

    async def send_all(self, events: Sequence[Event]) -> list[str | ProviderError]:
        """The events in the next requests: every answer, or its ProviderError."""
        results = await asyncio.gather(*self.enqueue(events), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ProviderError):
                raise result
        return cast("list[str | ProviderError]", results)

    def enqueue(self, events: Sequence[Event]) -> list[asyncio.Future[str]]:
        """The events into the next requests (at once when a request is full, else after the linger): their answers."""
        loop = asyncio.get_running_loop()
        answers: list[asyncio.Future[str]] = [loop.create_future() for _ in events]
        self._pending.extend(zip(events, answers, strict=True))
        if len(self._pending) >= self._batch_size:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._linger, self.flush)
        return answers

    def flush(self) -> None:
        """Send what is pending, in requests of at most the batch size, each in a rate slot of its own.

        A request that must wait for its slot is cut when the slot comes, not before: what arrives
        meanwhile rides in it instead of taking further slots in small requests of its own.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending and self._slot_wait is None:
            wait = self._rate.reserve() if self._rate is not None else 0.0
            if wait > 0:
                self._slot_wait = self._track(self._cut_after(wait))
                return
            self._cut()

    async def _cut_after(self, wait: float) -> None:
        try:
            await self._sleep(wait)
        except BaseException as e:  # cancelled with the worker: no caller is left waiting
            self._slot_wait = None
            _answer(self._pending, error=e)
            self._pending = []
            raise
        self._slot_wait = None
        if self._pending:
            self._cut()
        self.flush()  # the rest, each in the next slot

    def _cut(self) -> None:
        batch, self._pending = self._pending[: self._batch_size], self._pending[self._batch_size :]
        self._track(self._send_batch(batch))

    def _track(self, work: Awaitable[None]) -> asyncio.Task:
        task = asyncio.ensure_future(work)
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)
        return task

    async def _send_batch(self, batch: list[tuple[Event, asyncio.Future[str]]]) -> None:
        try:
            answers = await self._post([e for e, _ in batch])
            if len(answers) != len(batch):
                msg = f"a request of {len(batch)} events came back with {len(answers)} answers"
                raise RuntimeError(msg)
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    if isinstance(answer, ProviderError):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        except BaseException as e:  # a provider error, and also a bug or a cancellation: no caller is left waiting
            _answer(batch, error=e)
            if not isinstance(e, ProviderError):
                raise

    async def close(self) -> None:
        """Send what is pending and wait for every request, those waiting for their slot too."""
        self.flush()
        while self._requests:
            await asyncio.gather(*list(self._requests), return_exceptions=True)


def _answer(batch: list[tuple[Event, asyncio.Future[str]]], error: BaseException) -> None:
    for _, answer in batch:
        if not answer.done():
            answer.set_exception(error)


class SendsInBatches:
    """The Provider side of a sender whose deliveries ride in ``self._batches``' requests."""

    _batches: RequestBatches[Any]

    def pace_requests(self, rate: RateReservations, sleep: Callable[[float], Awaitable[None]]) -> bool:
        """Reserve one of ``rate``'s slots per request, not per delivery: a request carries many."""
        self._batches.pace(rate, sleep)
        return True

    async def send(self, event: Any) -> str:
        return await self._batches.send(event)

    async def send_all(self, events: Sequence[Any]) -> list[str | ProviderError]:
        """The events in the next requests, as :meth:`send` sends each: every answer, or its ProviderError."""
        return await self._batches.send_all(events)
