"""Where a usage job's savepoint left its Kafka source: read with Flink's own classes (jvm/ ``SavepointOffsets``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from meterflow.errors import JobSubmissionError
from meterflow.handover import StoppedAt
from meterflow.local.flink import JVM_JAR_DIR, flink_home

# A savepoint's metadata is read in a second or two; far longer means a stuck file system.
READ_TIMEOUT_S = 120


def stopped_at(state: Path, topic: str) -> StoppedAt:
    """Where the job that wrote ``state`` (a savepoint or retained checkpoint directory) stopped: per
    partition of ``topic`` the next offset its source would have read (partitions its readers never
    read are absent), and the watermark and closed-through boundary its lateness decisions held."""
    if not (state / "_metadata").is_file():
        msg = f"{state} is no savepoint or retained checkpoint: it holds no _metadata"
        raise JobSubmissionError(msg)
    jars = [*sorted((flink_home() / "lib").glob("*.jar")), *sorted(JVM_JAR_DIR.glob("*.jar"))]
    # As Flink's scripts find it: JAVA_HOME first, then the PATH.
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if java is None:
        msg = "no java (JAVA_HOME unset, none on PATH): reading a savepoint takes Flink's own classes"
        raise JobSubmissionError(msg)
    command = [java, "-cp", os.pathsep.join(map(str, jars)), "dev.meterflow.source.SavepointOffsets", str(state), topic]
    try:
        r = subprocess.run(command, capture_output=True, text=True, check=False, timeout=READ_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        msg = f"reading the Kafka source's offsets in {state} took over {READ_TIMEOUT_S} s"
        raise JobSubmissionError(msg) from e
    if r.returncode:
        tail = "\n".join(line for line in r.stderr.strip().splitlines()[-15:] if not line.lstrip().startswith("at "))
        msg = f"could not read the Kafka source's offsets in {state}:\n{tail}"
        raise JobSubmissionError(msg)
    try:
        return StoppedAt.parse(r.stdout)
    except ValueError as e:
        msg = f"could not read the Kafka source's offsets in {state}: {e}"
        raise JobSubmissionError(msg) from e
