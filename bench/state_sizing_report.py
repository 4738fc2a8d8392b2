"""Pure parts of the state-sizing benchmark: size labels, per-id figures and the Markdown table."""

from __future__ import annotations

from typing import Any

GB = 1_000_000_000
_SUFFIX = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}


def parse_ids(text: str) -> int:
    """``"10M"`` -> 10,000,000; plain digits are taken as they are."""
    text = text.strip().upper().replace("_", "")
    if text and text[-1] in _SUFFIX:
        return int(float(text[:-1]) * _SUFFIX[text[-1]])
    return int(text)


def ids_label(n: int) -> str:
    """10,000,000 -> ``"10M"`` (exact multiples only; otherwise the digits)."""
    for suffix, factor in (("G", _SUFFIX["G"]), ("M", _SUFFIX["M"]), ("K", _SUFFIX["K"])):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{suffix}"
    return str(n)


def per_id(run: dict[str, Any]) -> dict[str, float | None]:
    """Bytes per id in memory (live heap after GC), on local disk and in the checkpoint, and ids per GB of each.

    Divided by the ids the Deduplicate actually held when the first checkpoint was taken (N plus
    the few the live source had added).
    """
    n = run["ids_in_state"]
    memory = run["heap_live_bytes"] / n if run["backend"] == "hashmap" else None
    disk = run["local_dir_bytes"] / n if run["local_dir_bytes"] else None
    checkpoint = run["checkpoint_first"]["dedup_full_bytes"] / n
    return {
        "heap_bytes_per_id": memory,
        "disk_bytes_per_id": disk,
        "checkpoint_bytes_per_id": checkpoint,
        "ids_per_gb_heap": GB / memory if memory else None,
        "ids_per_gb_disk": GB / disk if disk else None,
        "ids_per_gb_checkpoint": GB / checkpoint,
    }


def _mb(n: float) -> str:
    return f"{n / 1_000_000:,.0f} MB" if n >= 10_000_000 else f"{n / 1_000_000:,.1f} MB"


def _num(x: float | None, fmt: str = ",.0f", unit: str = "") -> str:
    return "n/a" if x is None else format(x, fmt) + unit


def render_markdown(data: dict[str, Any]) -> str:
    """The sizing table (one row per backend and size) and the failed runs with their errors."""
    head = (
        "| ids | backend | ingest | heap / id | local disk / id | checkpoint (full) | checkpoint / id | ids per GB (heap or disk) "
        "| 1st checkpoint: total (sync + async) | steady checkpoint: persisted, total | TM RSS | TM size |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows, failed = [], []
    for run in data.get("runs", []):
        if not run.get("ok"):
            failed.append(
                f"- **{run['backend']}, {ids_label(run['ids_target'])} ids** (TaskManager {run['tm_process_mb']} MB): `{run.get('error', '')[:600]}`"
            )
            continue
        f = per_id(run)
        first, steady = run["checkpoint_first"], run["checkpoint_steady"]
        memory_or_disk = f["ids_per_gb_heap"] if run["backend"] == "hashmap" else f["ids_per_gb_disk"]
        mark = " *" if run.get("overlapped") else ""
        rows.append(
            f"| {ids_label(run['ids_target'])}{mark} | {run['backend']} | {run['ingest_s']:.0f} s ({run['ingest_rate']:,}/s) "
            f"| {_num(f['heap_bytes_per_id'], ',.0f', ' B')} | {_num(f['disk_bytes_per_id'], ',.0f', ' B')} | {_mb(first['dedup_full_bytes'])} "
            f"| {f['checkpoint_bytes_per_id']:.0f} B | {_num(memory_or_disk and memory_or_disk / 1e6, ',.1f', ' M')} "
            f"| {first['end_to_end_s']:.1f} s ({first['dedup_sync_s']:.2f} + {first['dedup_async_s']:.1f}) "
            f"| {_mb(steady['dedup_persisted_bytes'])}, {steady['end_to_end_s']:.1f} s | {run['tm_rss_bytes'] / 1e9:.1f} GB | {run['tm_process_mb']:,} MB |"
        )
    text = head + "\n" + "\n".join(rows)
    if any(r.get("overlapped") for r in data.get("runs", [])):
        text += "\n\n\\* other work was running on the machine during this run (its time figures are pessimistic)."
    if failed:
        text += "\n\nRuns that did not complete:\n\n" + "\n".join(failed)
    return text


# The table sits between these markers in docs/operations.md and docs/benchmarks.md; the whole
# benchmark section of docs/benchmarks.md between the section markers, which bench/run keeps
# when it regenerates that file.
TABLE_START, TABLE_END = "<!-- state sizing table: start -->", "<!-- state sizing table: end -->"
SECTION_START, SECTION_END = (
    "<!-- state sizing benchmark: start (bench/state_sizing.py) -->",
    "<!-- state sizing benchmark: end -->",
)


def splice_table(text: str, table: str) -> str:
    """``text`` with the table between the table markers replaced (unchanged when it has none)."""
    if TABLE_START not in text or TABLE_END not in text:
        return text
    head, rest = text.split(TABLE_START, 1)
    return f"{head}{TABLE_START}\n{table}\n{TABLE_END}{rest.split(TABLE_END, 1)[1]}"


def keep_section(old_report: str, new_report: str) -> str:
    """A regenerated docs/benchmarks.md with the state-sizing section of the one it replaces, before the billing section."""
    if SECTION_START not in old_report or SECTION_END not in old_report or SECTION_START in new_report:
        return new_report
    section = SECTION_START + old_report.split(SECTION_START, 1)[1].split(SECTION_END, 1)[0] + SECTION_END + "\n\n"
    billing = "<!-- billing benchmark: start"
    if billing in new_report:
        head, tail = new_report.split(billing, 1)
        return head + section + billing + tail
    return new_report.rstrip("\n") + "\n\n" + section
