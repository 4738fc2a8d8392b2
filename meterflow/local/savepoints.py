"""Where a usage job's savepoint left its Kafka source: read with Flink's own classes (jvm/ ``SavepointOffsets``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from meterflow.errors import JobSubmissionError
from meterflow.local.flink import JVM_JAR_DIR, flink_home


def savepoint_offsets(state: Path, topic: str) -> dict[int, int]:
    """Per partition of ``topic``, the next offset the source of the job that wrote ``state`` (a savepoint
    or retained checkpoint directory) would have read; partitions its readers never read are absent."""
    if not (state / "_metadata").is_file():
        msg = f"{state} is no savepoint or retained checkpoint: it holds no _metadata"
        raise JobSubmissionError(msg)
    jars = [*sorted((flink_home() / "lib").glob("*.jar")), *sorted(JVM_JAR_DIR.glob("*.jar"))]
    r = subprocess.run(
        ["java", "-cp", os.pathsep.join(map(str, jars)), "dev.meterflow.source.SavepointOffsets", str(state), topic],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if r.returncode:
        tail = "\n".join(line for line in r.stderr.strip().splitlines()[-15:] if not line.lstrip().startswith("at "))
        msg = f"could not read the Kafka source's offsets in {state}:\n{tail}"
        raise JobSubmissionError(msg)
    return {int(p): int(o) for p, o in (line.split() for line in r.stdout.splitlines() if line.strip())}
