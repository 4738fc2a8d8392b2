"""What every part of the local stack shares: repository paths, the status record, ports, pid files, waiting."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from meterflow.errors import PortInUseError, StackError

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ComponentStatus:
    """What ``stack status`` reports for one part of the stack."""

    name: str
    running: bool
    address: str
    detail: str = ""
    wanted: bool = True  # False: this config does not use the part, so it need not run


class StackPart(Protocol):
    """A process of the local stack: started by ``up`` unless ``running``."""

    def running(self) -> bool: ...

    def up(self) -> None: ...


class OptionalPart(StackPart, Protocol):
    """A part the config may not use (``wanted`` False: it need not run)."""

    @property
    def wanted(self) -> bool: ...


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback TCP ports that were free a moment ago (for private stacks)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_free(host: str, port: int, what: str, config_key: str) -> None:
    """Raise PortInUseError when another process already listens on host:port."""
    if port_open(host, port):
        msg = f"port {port} needed by {what} is taken by another process; free it or change {config_key} in the config"
        raise PortInUseError(msg)


def wait_until(check: Callable[[], bool], what: str, timeout: float, log: Path | None = None) -> None:
    """Poll ``check`` until true; on timeout raise StackError pointing at the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    hint = f"; see {log}" if log else ""
    msg = f"{what} did not become ready within {timeout:.0f}s{hint}"
    raise StackError(msg)


def pid_alive(pid_file: Path) -> int | None:
    """The pid in the file if that process is running (an exited, unreaped child is not)."""
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    # A child of this process that exited stays a zombie until reaped; kill(pid, 0) still succeeds.
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return None
    except ChildProcessError:
        pass  # not our child: its parent reaps it
    return pid if proc_running(pid) else None


def proc_running(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def parent_pids() -> dict[int, int]:
    """Every running process's parent pid, by pid, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while listed
    return parents


def descendants(roots: Iterable[int], parents: dict[int, int]) -> set[int]:
    """The roots and every process below them, given a pid -> parent pid map."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [r for r in roots if r in parents]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def process_tree(pid: int) -> set[int]:
    """``pid`` and every process descended from it."""
    return descendants([pid], parent_pids())


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False


def stop_pid(pid_file: Path, what: str, timeout: float = 30) -> None:
    """Stop the process (its whole session when it leads one) named in ``pid_file``: SIGTERM, then SIGKILL after ``timeout``."""
    pid = pid_alive(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return
    os.killpg(pid, signal.SIGTERM) if _is_group_leader(pid) else os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid_file):
        time.sleep(0.2)
    if pid_alive(pid_file):
        os.killpg(pid, signal.SIGKILL) if _is_group_leader(pid) else os.kill(pid, signal.SIGKILL)
        print(f"{what} did not stop in {timeout:.0f}s; killed", file=sys.stderr)
        deadline = time.monotonic() + 10
        while pid_alive(pid_file) and time.monotonic() < deadline:
            time.sleep(0.2)
    pid_file.unlink(missing_ok=True)


def require_jars(directory: Path, what: str) -> list[Path]:
    """The jars in ``directory``; StackError naming the setup script when there are none."""
    jars = sorted(directory.glob("*.jar"))
    if not jars:
        msg = f"no {what} jars in {directory}: run scripts/setup.sh (downloads them from Maven Central)"
        raise StackError(msg)
    return jars
