"""The provider fakes' common part (tests/support/fake_stripe.py, tests/support/fake_destinations.py):
their loopback HTTP server and the faults they inject.

A fake takes a schedule of faults, one per request in order, or fails every request for a while:
429 with Retry-After and 5xx (rejected), slow answers (accepted, answered after the client gave
up), dropped connections (accepted, no answer) and held requests (accepted, no answer until
released: "between the API call and the checkpoint").
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Fault:
    """What the fake does with one request: ``status`` (reject), ``slow``, ``drop``, ``hold`` or ``pass``."""

    kind: str
    status: int = 500
    retry_after: float | None = None
    delay: float = 0.0


def reject(status: int, retry_after: float | None = None) -> Fault:
    return Fault("status", status=status, retry_after=retry_after)


# The outcome recorded for a request a fault lets through without its answer.
FAULT_OUTCOMES = {"slow": "slow", "drop": "dropped", "hold": "held"}
PASS = Fault("pass")  # no fault for this request: lets a schedule place a fault later
SLOW = Fault("slow", delay=4.0)
DROP = Fault("drop")
HOLD = Fault("hold")


@dataclass
class FaultInjection:
    """The schedule of a fake; the fake answers with ``_answer(handler, status, body, headers)``."""

    clock: Callable[[], float] = time.time
    held: threading.Event = field(default_factory=threading.Event)
    _faults: deque[Fault] = field(default_factory=deque)
    _fail_until: float = 0.0
    _fail_pending: float | None = None
    _fail_status: int = 429
    _fail_retry_after: float | None = None
    _release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    in_flight: int = 0  # requests received and not answered yet

    def _handle_in_flight(self, latency: float, handle: Callable[[], None]) -> None:
        """Handle a request after ``latency`` seconds, counted in :attr:`in_flight` until answered."""
        with self._lock:
            self.in_flight += 1
        try:
            if latency:
                time.sleep(latency)
            handle()
        finally:
            with self._lock:
                self.in_flight -= 1

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _serve(
        self, handler: type[BaseHTTPRequestHandler], port: int, name: str, server: type[ThreadingHTTPServer]
    ) -> None:
        """Serve ``handler`` on loopback (``port`` 0: a free one) in a daemon thread."""
        self._server = server(("127.0.0.1", port), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name=name, daemon=True).start()

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def inject(self, *faults: Fault) -> None:
        """Apply these faults to the next requests, one each, in order."""
        with self._lock:
            self._faults.extend(faults)

    def fail_for(self, seconds: float, status: int = 429, retry_after: float | None = 1.0) -> None:
        """Answer every request with ``status`` for ``seconds``, counted from the next request."""
        with self._lock:
            self._fail_pending, self._fail_status, self._fail_retry_after = seconds, status, retry_after

    def release(self) -> None:
        """Let a held request go (its connection is dropped)."""
        self._release.set()

    def _next_fault(self) -> Fault | None:
        with self._lock:
            if self._fail_pending is not None:
                self._fail_until, self._fail_pending = self.clock() + self._fail_pending, None
            if self.clock() < self._fail_until:
                return reject(self._fail_status, self._fail_retry_after)
            fault = self._faults.popleft() if self._faults else None
            return None if fault is not None and fault.kind == "pass" else fault

    def _finish(
        self,
        handler: BaseHTTPRequestHandler,
        fault: Fault | None,
        status: int,
        body: Any,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer an accepted request as its fault says: at once, after a delay, or never (the
        connection dropped at once, or once a held request is released)."""
        if fault is None:
            return self._answer(handler, status, body, headers)
        if fault.kind == "slow":
            time.sleep(fault.delay)
            return self._answer(handler, status, body, headers)
        if fault.kind == "hold":
            self.held.set()
            self._release.wait(timeout=600)
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)
        return None

    def _answer(
        self, handler: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> None:
        raise NotImplementedError
