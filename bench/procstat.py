"""CPU time and resident memory of process trees, read from /proc (Linux)."""

from __future__ import annotations

import os
from pathlib import Path

from meterflow.local.base import descendants

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def parse_stat(text: str) -> tuple[int, float, int]:
    """(parent pid, utime + stime in seconds, RSS in bytes) from the text of /proc/<pid>/stat."""
    fields = text.rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime/stime are fields 14/15, rss is field 24.
    ppid = int(fields[1])
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    rss = int(fields[21]) * PAGE_SIZE
    return ppid, cpu, rss


def all_stats() -> dict[int, tuple[int, float, int]]:
    """Every process's (parent pid, CPU seconds, RSS bytes) from /proc, by pid."""
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = parse_stat(Path(entry.path, "stat").read_text())
            except (OSError, IndexError, ValueError):
                continue
    return stats


class TreeMeter:
    """Cumulative CPU seconds of process trees, counting processes that have since exited.

    Each process's last seen CPU time is kept, so short-lived children (Python workers of a
    cancelled job) still count up to their last sample.
    """

    def __init__(self) -> None:
        self.last_cpu: dict[tuple[str, int], float] = {}

    def sample(self, groups: dict[str, list[int]]) -> dict[str, tuple[float, int]]:
        """Per group: (cumulative CPU seconds of every process ever seen in it, current RSS bytes)."""
        stats = all_stats()
        parents = {pid: s[0] for pid, s in stats.items()}
        result = {}
        for name, roots in groups.items():
            rss = 0
            for pid in descendants(roots, parents):
                self.last_cpu[(name, pid)] = stats[pid][1]
                rss += stats[pid][2]
            result[name] = (sum(v for (g, _), v in self.last_cpu.items() if g == name), rss)
        return result


def read_pid(path: Path) -> int | None:
    """First integer in a pid file (postmaster.pid, kafka.pid), or None."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
