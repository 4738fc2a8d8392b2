"""Decoder microbenchmark: runs bench/DecodeBench.java (one thread, in memory) and prints its table.

Compares the meterflow-avro format's hand-written decoder with Avro's GenericDatumReader and with
Flink's own ``avro`` format, on records shaped like the benchmark data set. Needs the meterflow-jvm jar
(scripts/setup.sh) and the Flink jars of the apache-flink wheel::

    .venv/bin/python -m bench.decode_bench [records] [rounds]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from meterflow.local.base import REPO_ROOT
from meterflow.local.flink import FLINK_CONNECTOR_JARS, JVM_JAR_DIR, flink_home

SOURCE = REPO_ROOT / "bench" / "DecodeBench.java"


def classpath() -> list[Path]:
    """The meterflow-jvm jar, the Flink distribution's jars and the Avro format jar."""
    return [
        JVM_JAR_DIR / "meterflow-jvm.jar",
        *sorted((flink_home() / "lib").glob("*.jar")),
        *sorted(FLINK_CONNECTOR_JARS.glob("flink-sql-avro-*.jar")),
    ]


def main(argv: list[str]) -> int:
    """Run the Java benchmark in its own JVM, output straight to this process's stdout."""
    cmd = ["java", "-Xms1g", "-Xmx1g", "-cp", ":".join(map(str, classpath())), str(SOURCE), *argv]
    return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
