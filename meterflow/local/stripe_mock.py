"""The local stack's stand-in for Stripe: stripe-mock (Stripe's official API mock) on loopback."""

from __future__ import annotations

import subprocess

from meterflow.config import JobConfig
from meterflow.errors import StackError
from meterflow.local.base import (
    REPO_ROOT,
    ComponentStatus,
    free_ports,
    pid_alive,
    port_open,
    require_free,
    stop_pid,
    wait_until,
)

STRIPE_MOCK_BIN = REPO_ROOT / "third_party" / "bin" / "stripe-mock"


class StripeMock:
    """Stripe's official API mock: validates every billing request against Stripe's API specification.

    Stateless (no deduplication, no rate limits): the local stand-in for Stripe's test mode. Started
    only when billing is enabled and ``stripe.api_base`` points at this machine's ``stack.stripe_mock_port``.
    """

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.state_dir / "stripe-mock"
        self.port = cfg.stack.stripe_mock_port
        self.pid_file = self.dir / "stripe-mock.pid"
        self.log = self.dir / "stripe-mock.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def wanted(self) -> bool:
        """Whether the config bills through this local mock."""
        return self.cfg.billing.enabled and (self.cfg.stripe.api_base or "").rstrip("/") == self.url

    def running(self) -> bool:
        return pid_alive(self.pid_file) is not None and port_open("127.0.0.1", self.port)

    def up(self) -> None:
        """Start stripe-mock on loopback and wait until it answers."""
        if self.running():
            return
        require_free("127.0.0.1", self.port, "stripe-mock", "stack.stripe_mock_port")
        if not STRIPE_MOCK_BIN.exists():
            msg = f"{STRIPE_MOCK_BIN} is missing: run scripts/setup.sh (installs it with go install)"
            raise StackError(msg)
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            # stripe-mock also serves HTTPS, on [::]:12112 unless told otherwise: keep it on loopback,
            # on a free port, so it is not exposed and a second stack on the machine can start.
            https_port = free_ports(1)[0]
            args = [
                str(STRIPE_MOCK_BIN),
                "-http-addr",
                f"127.0.0.1:{self.port}",
                "-https-addr",
                f"127.0.0.1:{https_port}",
            ]
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_file.write_text(str(proc.pid))
        wait_until(lambda: port_open("127.0.0.1", self.port) or proc.poll() is not None, "stripe-mock", 60, self.log)
        if proc.poll() is not None:
            msg = f"stripe-mock exited with code {proc.returncode}; see {self.log}"
            raise StackError(msg)

    def down(self) -> None:
        stop_pid(self.pid_file, "stripe-mock", timeout=10)

    def status(self) -> ComponentStatus:
        return ComponentStatus(
            "stripe-mock",
            self.running(),
            self.url,
            "" if self.wanted else "not used by this config",
            wanted=self.wanted,
        )
