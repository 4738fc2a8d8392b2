"""async-profiler in the benchmark's TaskManager: where each pipeline's CPU goes, per thread and frame.

The TaskManager starts with async-profiler as a JVM agent (jar from Maven Central, see
third_party/profiler/pom.xml). It samples every thread on CPU time (``itimer``: no perf events needed)
and writes one collapsed-stacks file per ``chunk_s`` seconds. A pipeline's profile is the chunks
written while it consumed; bench/flamegraph.py merges and draws them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from bench.flamegraph import by_thread, merge, render

PROFILER_JARS = Path(__file__).resolve().parent.parent / "third_party" / "profiler" / "target" / "dependency"
LIBRARY = "linux-x64/libasyncProfiler.so"
CHUNK_S = 5


def extract_library(into: Path) -> Path:
    """libasyncProfiler.so from the async-profiler jar that scripts/setup.sh downloaded."""
    jars = sorted(PROFILER_JARS.glob("async-profiler-*-linux-x64.jar"))
    if not jars:
        msg = f"no async-profiler jar in {PROFILER_JARS}: run scripts/setup.sh (or pass --no-profile)"
        raise FileNotFoundError(msg)
    into.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(jars[-1]) as jar:
        target = into / Path(LIBRARY).name
        target.write_bytes(jar.read(LIBRARY))
    return target


def agent_option(library: Path, out_dir: Path, interval_ms: int = 10, chunk_s: int = CHUNK_S) -> str:
    """The TaskManager JVM option: sample every ``interval_ms`` of CPU, a file of stacks per ``chunk_s`` s."""
    return f"-agentpath:{library}=start,event=itimer,interval={interval_ms}ms,threads,loop={chunk_s}s,file={out_dir}/tm-%t.collapsed,collapsed"


def chunks_between(out_dir: Path, start: float, end: float, chunk_s: int = CHUNK_S) -> list[Path]:
    """The files whose chunk overlaps [start, end] (a file is written when its chunk ends)."""
    return sorted(
        p for p in out_dir.glob("tm-*.collapsed") if start < p.stat().st_mtime and p.stat().st_mtime - chunk_s < end
    )


def profile_pipeline(
    out_dir: Path, start: float, end: float, image: Path | None, title: str
) -> list[tuple[str, float]]:
    """The share of CPU samples per thread group while a pipeline consumed, and its flame graph (when ``image``)."""
    files = chunks_between(out_dir, start, end)
    if not files:
        return []
    stacks = merge(files)
    total = sum(stacks.values()) or 1
    if image is not None:
        render(stacks, image, title)
    return [(thread, n / total) for thread, n in by_thread(stacks)]
