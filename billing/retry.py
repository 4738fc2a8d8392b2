"""Retry policy and rate limiting for provider calls (pure: the clock and randomness are injected)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential backoff with full jitter, honouring Retry-After, with a bounded number of attempts."""

    max_attempts: int = 8
    initial_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0

    def is_retryable(self, status: int | None) -> bool:
        """Timeouts and dropped connections (no status), 429 and 5xx are retried; other 4xx are final."""
        return status is None or status in RETRYABLE_STATUS

    def next_delay(
        self, attempt: int, retry_after: float | None = None, rng: Callable[[], float] = random.random
    ) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` (attempts count from 1), or None to give up."""
        if attempt >= self.max_attempts:
            return None
        ceiling = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1))
        delay = ceiling * rng()
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_delay))
        return delay


@dataclass
class TokenBucket:
    """Client-side rate limit: ``rate`` calls per second with bursts up to ``capacity``."""

    rate: float
    capacity: float
    clock: Callable[[], float]
    _tokens: float = field(init=False)
    _updated: float = field(init=False)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.capacity < 1:
            msg = "rate must be positive and capacity at least 1"
            raise ValueError(msg)
        self._tokens, self._updated = self.capacity, self.clock()

    def wait_time(self) -> float:
        """Seconds until a call may be made (0 when it may be made now); takes a token when 0."""
        now = self.clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


@dataclass
class RateReservations:
    """Client-side rate limit for concurrent callers: each reservation gets its own slot.

    Unlike :class:`TokenBucket`, a caller that must wait is given the moment of *its* slot and the
    slot is taken at once, so many coroutines waiting together never stampede the same token.
    """

    rate: float
    capacity: float
    clock: Callable[[], float]
    _next_free: float = field(init=False)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.capacity < 1:
            msg = "rate must be positive and capacity at least 1"
            raise ValueError(msg)
        # A full bucket: ``capacity`` calls may go at once.
        self._next_free = self.clock() - (self.capacity - 1) / self.rate

    def reserve(self) -> float:
        """Seconds to wait before making the call just reserved (0 when it may go now)."""
        now = self.clock()
        earliest = now - (self.capacity - 1) / self.rate  # bursts never exceed the capacity
        slot = max(self._next_free, earliest)
        self._next_free = slot + 1 / self.rate
        return max(0.0, slot - now)
