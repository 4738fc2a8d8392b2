"""The state-sizing benchmark's pure parts: size labels, per-id figures, the Markdown table."""

from __future__ import annotations

import pytest

from bench.state_sizing_report import ids_label, parse_ids, per_id, render_markdown


def _run(backend: str = "rocksdb", **overrides) -> dict:
    checkpoint = {
        "id": 2,
        "full_bytes": 90_000_000,
        "persisted_bytes": 90_000_000,
        "end_to_end_s": 3.2,
        "dedup_sync_s": 0.05,
        "dedup_async_s": 3.0,
        "dedup_full_bytes": 90_000_000,
        "dedup_persisted_bytes": 90_000_000,
    }
    steady = {**checkpoint, "dedup_persisted_bytes": 400_000, "end_to_end_s": 0.4}
    run = {
        "backend": backend,
        "ids_target": 1_000_000,
        "ids_in_state": 1_000_000,
        "tm_process_mb": 2560,
        "ok": True,
        "ingest_s": 10.0,
        "ingest_rate": 100_000,
        "heap_live_bytes": 150_000_000,
        "tm_rss_bytes": 2_000_000_000,
        "local_dir_bytes": 60_000_000 if backend != "hashmap" else 0,
        "checkpoint_first": checkpoint,
        "checkpoint_steady": steady,
        "overlapped": [],
    }
    return {**run, **overrides}


@pytest.mark.parametrize(
    ("text", "n"), [("1M", 1_000_000), ("50m", 50_000_000), ("200K", 200_000), ("1_500", 1500), ("2.5M", 2_500_000)]
)
def test_parse_ids(text, n):
    """Sizes read with K/M/G suffixes."""
    assert parse_ids(text) == n


def test_ids_label_round_trips_exact_multiples():
    """Labels use the largest exact suffix."""
    assert [ids_label(n) for n in (1_000_000, 50_000_000, 200_000, 1500)] == ["1M", "50M", "200K", "1500"]


def test_per_id_divides_by_the_ids_actually_held():
    """Heap figures only for heap state; disk and checkpoint figures per id held, and ids per GB from them."""
    rocks = per_id(_run("rocksdb"))
    assert rocks["heap_bytes_per_id"] is None
    assert rocks["disk_bytes_per_id"] == 60 and rocks["checkpoint_bytes_per_id"] == 90
    assert rocks["ids_per_gb_disk"] == pytest.approx(1e9 / 60)
    heap = per_id(_run("hashmap", ids_in_state=1_500_000))
    assert heap["heap_bytes_per_id"] == 100 and heap["ids_per_gb_heap"] == pytest.approx(1e7)
    assert heap["disk_bytes_per_id"] is None


def test_render_markdown_lists_rows_marks_overlap_and_reports_failures():
    """One row per completed run; a run that overlapped other work is starred; a failed run shows its error."""
    data = {
        "runs": [
            _run("hashmap"),
            _run("rocksdb", overlapped=["/tmp/ci-busy"]),
            _run(
                "hashmap",
                ids_target=50_000_000,
                ok=False,
                error="RuntimeError: java.lang.OutOfMemoryError: Java heap space",
            ),
        ]
    }
    text = render_markdown(data)
    rows = [ln for ln in text.splitlines() if ln.startswith("| 1M")]
    assert len(rows) == 2
    assert "| 1M * | rocksdb |" in text and "other work was running" in text
    assert "150 B" in rows[0] and "3.2 s (0.05 + 3.0)" in rows[0]
    assert "**hashmap, 50M ids**" in text and "OutOfMemoryError" in text


def test_table_is_spliced_between_markers_and_the_section_survives_a_regenerated_report():
    """--write-docs replaces only the table; bench/run's regenerated benchmarks page keeps the section before billing."""
    from bench.state_sizing_report import (
        SECTION_END,
        SECTION_START,
        TABLE_END,
        TABLE_START,
        keep_section,
        splice_table,
    )

    doc = f"intro\n{TABLE_START}\nold\n{TABLE_END}\nafter\n"
    assert splice_table(doc, "| new |") == f"intro\n{TABLE_START}\n| new |\n{TABLE_END}\nafter\n"
    assert splice_table("no markers", "| new |") == "no markers"
    old = f"# Benchmarks\nold body\n{SECTION_START}\n## State at scale\n{SECTION_END}\n\n<!-- billing benchmark: start -->\nbilling\n"
    new = "# Benchmarks\nnew body\n\n<!-- billing benchmark: start -->\nbilling\n"
    kept = keep_section(old, new)
    assert kept.index("new body") < kept.index("## State at scale") < kept.index("<!-- billing benchmark: start")
    assert keep_section(kept, kept) == kept
