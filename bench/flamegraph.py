"""Flame graphs of async-profiler's collapsed stacks, drawn as a PNG (no browser needed to read them).

async-profiler (Maven Central ``tools.profiler:async-profiler``, loaded as a JVM agent into the
TaskManager by ``bench/run --profile``) writes one ``*.collapsed`` file per loop interval: one line per
distinct stack, ``frame;frame;...;frame count``, the first frame the thread when ``threads`` is on.
``merge`` sums the files of an interval, ``by_thread`` shares the samples out per thread group,
``render`` draws the graph: root at the bottom, each frame as wide as its share of the samples.

Usage: ``python -m bench.flamegraph OUT.png FILE.collapsed ... [--title T]``
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import click

Stacks = Counter[tuple[str, ...]]

# Thread names carry ids and subtask numbers that differ from run to run; one group per operator chain.
_THREAD_SUFFIXES = (
    re.compile(r" tid=\d+$"),
    re.compile(r" \(\d+/\d+\)#\d+$"),
    re.compile(r"#\d+$"),
    re.compile(r"-\d+$"),
)


def thread_group(thread_frame: str) -> str:
    """``[GroupWindowAggregate[12] -> Calc[13] (1/1)#0 tid=6591]`` -> ``GroupWindowAggregate[12] -> Calc[13]``."""
    name = thread_frame.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    for suffix in _THREAD_SUFFIXES:
        name = suffix.sub("", name)
    return name.strip() or thread_frame


def parse_collapsed(lines: Iterable[str]) -> Stacks:
    """Stacks and their sample counts from collapsed lines (malformed lines are an error, not skipped)."""
    stacks: Stacks = Counter()
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            msg = f"line {number} is not 'frame;...;frame count': {line[:80]!r}"
            raise ValueError(msg)
        stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def merge(paths: Iterable[Path]) -> Stacks:
    """The samples of several collapsed files, summed; thread frames grouped by ``thread_group``."""
    total: Stacks = Counter()
    for path in paths:
        with path.open() as f:
            for stack, n in parse_collapsed(f).items():
                total[(thread_group(stack[0]), *stack[1:])] += n
    return total


def by_thread(stacks: Stacks) -> list[tuple[str, int]]:
    """Samples per thread group, most first."""
    threads: Counter[str] = Counter()
    for stack, n in stacks.items():
        threads[stack[0]] += n
    return threads.most_common()


@dataclass
class Node:
    """A frame in the call tree: its samples (itself and below) and its callees."""

    name: str
    samples: int = 0
    children: dict[str, Node] = field(default_factory=dict)


def call_tree(stacks: Stacks) -> Node:
    """The stacks as one tree under a root ``all``."""
    root = Node("all")
    for stack, n in stacks.items():
        root.samples += n
        node = root
        for frame in stack:
            node = node.children.setdefault(frame, Node(frame))
            node.samples += n
    return root


@dataclass(frozen=True)
class Box:
    """One frame as drawn: left edge and width as shares of all samples, depth from the root."""

    x: float
    width: float
    depth: int
    name: str
    samples: int


def layout(root: Node, min_share: float = 0.002) -> list[Box]:
    """Boxes of every frame at least ``min_share`` of the samples wide, widest callee first."""
    boxes: list[Box] = []
    total = root.samples or 1

    def place(node: Node, x: float, depth: int) -> None:
        boxes.append(Box(x, node.samples / total, depth, node.name, node.samples))
        for child in sorted(node.children.values(), key=lambda c: -c.samples):
            if child.samples / total >= min_share:
                place(child, x, depth + 1)
            x += child.samples / total

    place(root, 0.0, 0)
    return boxes


def short_name(frame: str) -> str:
    """A frame's label: ``org/apache/flink/runtime/io/Foo.bar`` -> ``Foo.bar`` (the package is in the colour)."""
    return frame.rsplit("/", 1)[-1] if "/" in frame and not frame.startswith("[") else frame


def _colour(name: str) -> str:
    if name.startswith("["):
        return "#c8c8c8"  # thread
    if "/" in name or "." in name and "(" not in name:
        return "#e8a33d" if name.startswith(("org/apache/flink/table", "Stream", "Grouping")) else "#f2c94c"  # Java
    return "#e0605f"  # native, kernel, JVM internals


def render(stacks: Stacks, out: Path, title: str, min_share: float = 0.002) -> None:
    """Draw the flame graph of ``stacks`` into ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not stacks:
        msg = "no samples to draw"
        raise ValueError(msg)
    boxes = layout(call_tree(Counter({(f"[{s[0]}]", *s[1:]): n for s, n in stacks.items()})), min_share)
    depth = max(b.depth for b in boxes) + 1
    fig, ax = plt.subplots(figsize=(22, max(6.0, 0.22 * depth + 1.2)), dpi=110)
    total = boxes[0].samples or 1
    for b in boxes:
        ax.add_patch(
            plt.Rectangle((b.x, b.depth), b.width, 0.95, facecolor=_colour(b.name), edgecolor="white", linewidth=0.3)
        )
        chars = int(b.width * 330)
        if chars >= 4:
            name = short_name(b.name)
            label = name if len(name) <= chars else name[: chars - 2] + ".."
            ax.text(
                b.x + 0.001, b.depth + 0.45, label, fontsize=5.5, va="center", ha="left", clip_on=True, parse_math=False
            )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, depth)
    ax.set_yticks([])
    ax.set_xticks([i / 10 for i in range(11)], [f"{i * 10}%" for i in range(11)])
    ax.set_title(f"{title} ({total:,} samples; frames under {min_share:.1%} of the samples not drawn)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


@click.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--title", default="TaskManager CPU", show_default=True)
@click.option(
    "--min-share", default=0.002, show_default=True, help="Leave out frames narrower than this share of the samples."
)
def main(out: Path, files: tuple[Path, ...], title: str, min_share: float) -> None:
    """Merge collapsed stacks and draw their flame graph; print the samples per thread."""
    stacks = merge(files)
    total = sum(stacks.values())
    for thread, n in by_thread(stacks)[:15]:
        click.echo(f"{n / total:6.1%}  {thread}")
    render(stacks, out, title, min_share)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
