"""The TaskManager supervisor's log, as the supervisor writes it and the stack reads it back."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

# The line the supervisor logs when it starts a TaskManager in place of a lost one.
REPLACED = "replaced a lost TaskManager"


def replacements(log: Path) -> list[datetime]:
    """When the supervisor started each replacement, from its log (empty when it never did)."""
    if not log.exists():
        return []
    return [datetime.fromisoformat(line.split(" ", 1)[0]) for line in log.read_text().splitlines() if REPLACED in line]
