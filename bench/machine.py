"""The machine a benchmark ran on, for its results."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from meterflow.local.kafka import KAFKA_JARS


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory, OS and the versions that matter."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
        platform.processor() or "unknown",
    )
    mem_kib = int(
        next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    )
    java = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False).stderr.splitlines()
    kafka = sorted(
        p.name.removeprefix("kafka-clients-").removesuffix(".jar") for p in KAFKA_JARS.glob("kafka-clients-*.jar")
    )
    versions = {
        "Python": platform.python_version(),
        "Java": java[0] if java else "?",
        "Flink (apache-flink)": metadata.version("apache-flink"),
        "Kafka": kafka[0] if kafka else "?",
    }
    for dist in ("kafka-python", "fastavro", "psycopg"):
        versions[dist] = metadata.version(dist)
    return {
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "memory_gib": mem_kib / 1024**2,
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions,
    }
