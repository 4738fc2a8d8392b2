"""The benchmark's profile: collapsed stacks parsed, merged per thread group, laid out and drawn; chunks picked by time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.flamegraph import by_thread, call_tree, layout, merge, parse_collapsed, render, thread_group
from bench.profiler import agent_option, chunks_between, profile_pipeline
from bench.report import render_markdown


def test_thread_group_drops_ids_and_subtask_numbers():
    """Two subtasks of one chain, or two runs, fall into one group."""
    assert thread_group("[Deduplicate[4] -> Calc[5] (1/2)#0 tid=6591]") == "Deduplicate[4] -> Calc[5]"
    assert thread_group("[Deduplicate[4] -> Calc[5] (2/2)#0 tid=6592]") == "Deduplicate[4] -> Calc[5]"
    assert thread_group("[C2 CompilerThre tid=5522]") == "C2 CompilerThre"
    assert thread_group("[GC Thread#1 tid=5565]") == "GC Thread"


def test_parse_collapsed_sums_repeated_stacks_and_refuses_garbage():
    stacks = parse_collapsed(["[t tid=1];a;b 3\n", "[t tid=1];a;b 2\n", "\n", "[t tid=1];a 1\n"])
    assert stacks[("[t tid=1]", "a", "b")] == 5
    assert stacks[("[t tid=1]", "a")] == 1
    with pytest.raises(ValueError, match="line 1"):
        parse_collapsed(["no count here\n"])


def _write(path: Path, lines: list[str], mtime: float) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    os.utime(path, (mtime, mtime))
    return path


def test_merge_and_by_thread_share_samples_per_group(tmp_path):
    a = _write(
        tmp_path / "tm-1.collapsed", ["[Source: x (1/2)#0 tid=1];read 6", "[C2 CompilerThre tid=9];compile 2"], 100
    )
    b = _write(tmp_path / "tm-2.collapsed", ["[Source: x (2/2)#0 tid=2];read 2"], 105)
    stacks = merge([a, b])
    assert by_thread(stacks) == [("Source: x", 8), ("C2 CompilerThre", 2)]


def test_layout_makes_children_no_wider_than_parents_and_drops_thin_frames():
    stacks = parse_collapsed(["t;a;b 60", "t;a;c 39", "t;d 1"])
    boxes = layout(call_tree(stacks), min_share=0.02)
    by_name = {b.name: b for b in boxes}
    assert by_name["all"].width == 1.0
    assert by_name["a"].width == pytest.approx(0.99)
    assert by_name["b"].x == by_name["a"].x and by_name["b"].width == pytest.approx(0.6)
    assert by_name["c"].x == pytest.approx(0.6)
    assert "d" not in by_name  # 1% < 2%
    assert by_name["b"].depth == 3


def test_chunks_between_picks_files_written_during_the_interval(tmp_path):
    """A file is written when its chunk ends, so it covers [mtime - chunk, mtime]."""
    files = [_write(tmp_path / f"tm-{t}.collapsed", ["t;a 1"], t) for t in (100, 105, 110, 115, 120)]
    assert chunks_between(tmp_path, 106, 112, chunk_s=5) == [files[2], files[3]]
    assert chunks_between(tmp_path, 200, 210, chunk_s=5) == []


def test_profile_pipeline_draws_a_png_and_returns_shares(tmp_path):
    _write(
        tmp_path / "tm-1.collapsed", ["[Deduplicate[4] (1/1)#0 tid=3];process;get 3", "[GC Thread#0 tid=4];gc 1"], 100
    )
    image = tmp_path / "flame.png"
    shares = profile_pipeline(tmp_path, 99, 101, image, "test")
    assert shares == [("Deduplicate[4]", 0.75), ("GC Thread", 0.25)]
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert profile_pipeline(tmp_path, 500, 600, None, "nothing") == []


def test_agent_option_loads_the_library_with_collapsed_chunks(tmp_path):
    option = agent_option(tmp_path / "libasyncProfiler.so", tmp_path / "out", interval_ms=10, chunk_s=5)
    assert option.startswith(f"-agentpath:{tmp_path}/libasyncProfiler.so=start,event=itimer,interval=10ms")
    assert "loop=5s" in option and f"file={tmp_path}/out/tm-%t.collapsed" in option and option.endswith(",collapsed")


def test_render_refuses_nothing_to_draw(tmp_path):
    with pytest.raises(ValueError):
        render(parse_collapsed([]), tmp_path / "x.png", "empty")


def test_report_lists_cpu_by_thread_and_links_the_flame_graph():
    results = {
        "run": {"started": "now", "command": "bench/run", "duration_s": 60},
        "machine": {"cpu_model": "cpu", "nproc": 2, "memory_gib": 1.0, "os": "Linux", "versions": {}},
        "dataset": {
            "records": 10,
            "unique": 9,
            "duplicates": 1,
            "late": 0,
            "closers": 3,
            "windows": 1,
            "partitions": 3,
            "tenants": 1,
            "customers": 1,
            "meters": 1,
            "span_s": 60,
            "window_s": 60,
            "late_by_s": 600,
            "produce_s": 1,
        },
        "pipelines": [
            {
                "name": "meterflow",
                "parallelism": 1,
                "records": 10,
                "cpu_by_thread": [["C2 CompilerThre", 0.3], ["a | b", 0.1]],
                "flame_graph": "flamegraph-meterflow-p1.png",
            }
        ],
    }
    text = render_markdown(results)
    assert "![flame graph: meterflow, parallelism 1](img/flamegraph-meterflow-p1.png)" in text
    assert "| C2 CompilerThre | 30.0% |" in text
    assert "| a \\| b | 10.0% |" in text
