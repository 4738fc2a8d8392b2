"""House rules on imports, read from the source with ``ast``.

* Floors (docs/architecture.md), each importing only its own floor and those below it:
  1. the ground: contracts and rules, ``meterflow/*.py`` (config, errors, the window row, windowing,
     the input contract, the operator tools' rules) and ``billing/`` (the billing domain);
  2. ``connectors/`` (Kafka, Avro, the providers' clients) and ``sinks/`` (Postgres), side by side:
     neither imports the other;
  3. ``jobs/``: the Flink graphs;
  4. the roof: the HTTP service (``meterflow/serve``) beside the local stack (``meterflow/local``),
     and the CLI (``meterflow/commands``) above both.
* Public names: ``bench/`` and ``tests/`` use the project's modules through public names only, never
  ``from x import _y``, ``x._y`` or ``setattr(x, "_y", ...)`` on a project module or what it exports.
* No circles: no file of the project or its benchmarks imports, through other files, a file that
  imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PROJECT_PACKAGES = {"meterflow", "billing", "jobs", "connectors", "sinks", "bench", "tests"}
# Each floor and the floors its files may import.
MAY_IMPORT = {
    "ground": {"ground"},
    "connectors": {"ground", "connectors"},
    "sinks": {"ground", "sinks"},
    "jobs": {"ground", "connectors", "sinks", "jobs"},
    "local": {"ground", "connectors", "sinks", "jobs", "local"},
    "serve": {"ground", "connectors", "sinks", "serve"},
    "cli": {"ground", "connectors", "sinks", "jobs", "local", "serve", "cli"},
}


def floor_of(module: str) -> str | None:
    """The floor of a project module by its dotted name; None outside the production packages."""
    parts = module.split(".")
    if parts[0] == "meterflow":
        return {"commands": "cli", "local": "local", "serve": "serve"}.get(parts[1] if len(parts) > 1 else "", "ground")
    return {"billing": "ground", "connectors": "connectors", "sinks": "sinks", "jobs": "jobs"}.get(parts[0])


PRODUCTION = [
    p for d in ("meterflow", "billing", "connectors", "sinks", "jobs") for p in sorted((REPO_ROOT / d).rglob("*.py"))
]
CLIENTS = [p for d in ("bench", "tests") for p in sorted((REPO_ROOT / d).rglob("*.py"))]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    """The module an ImportFrom names, with relative imports resolved against ``path``."""
    if not node.level:
        return node.module or ""
    package = _module_of(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def imported_modules(path: Path) -> set[str]:
    """Every module the file imports, as dotted names (``from a import b`` counts as ``a`` and ``a.b``)."""
    found = set()
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, path)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root_name(node: ast.expr) -> ast.expr:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def private_uses(path: Path) -> list[str]:
    """Private names of project modules that the file imports or reaches through an attribute."""
    tree = _parse(path)
    bound, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _absolute(node, path)
            if module.split(".")[0] not in PROJECT_PACKAGES:
                continue
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if _private(alias.name) or any(_private(part) for part in module.split(".")):
                    found.append(f"line {node.lineno}: from {module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PROJECT_PACKAGES:
                    bound.add(alias.asname or alias.name.split(".")[0])
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = _root_name(node.value)
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if called in ("setattr", "getattr", "delattr") and len(node.args) >= 2:
                target, name = node.args[0], node.args[1]
                root = _root_name(target)
                if (
                    isinstance(name, ast.Constant)
                    and isinstance(name.value, str)
                    and _private(name.value.rsplit(".", 1)[-1])
                    and isinstance(root, ast.Name)
                    and root.id in bound
                ):
                    found.append(f"line {node.lineno}: {called}({ast.unparse(target)}, {name.value!r})")
    return found


def imports_up(path: Path) -> list[str]:
    """The project modules the file imports from a floor it may not import."""
    allowed = MAY_IMPORT[floor_of(_module_of(path)) or "ground"]
    return sorted(
        m
        for m in imported_modules(path)
        if (floor_of(m) or "ground") not in allowed and m.split(".")[0] in PROJECT_PACKAGES
    )


@pytest.mark.parametrize("path", PRODUCTION, ids=_rel)
def test_no_import_runs_up_a_floor(path):
    """A file imports only its own floor and the floors below it."""
    wrong = imports_up(path)
    assert not wrong, f"{_rel(path)} ({floor_of(_module_of(path))}) imports {wrong}"


def test_every_production_file_has_a_floor():
    assert all(floor_of(_module_of(p)) in MAY_IMPORT for p in PRODUCTION)


@pytest.mark.parametrize("path", CLIENTS, ids=_rel)
def test_uses_public_names_only(path):
    """Benchmark and tests reach the project through public names."""
    uses = private_uses(path)
    assert not uses, f"{_rel(path)} uses private names: {uses}"


def test_the_rules_catch_what_they_forbid(tmp_path, monkeypatch):
    """Each kind of violation is found (so an empty result means something)."""
    monkeypatch.setitem(globals(), "REPO_ROOT", tmp_path)
    found = {}
    for name, text in {
        "billing/x.py": "from meterflow.config import JobConfig\nfrom connectors import kafka_writer\n",
        "sinks/x.py": "from meterflow import local\nimport meterflow.commands.root\nfrom billing.retry import BackoffPolicy\nimport connectors.topics\n",
        "connectors/x.py": "from sinks.postgres import connect\nfrom meterflow.errors import SinkError\n",
        "jobs/x.py": "from sinks import ledger\nfrom meterflow.local.base import Stack\n",
        "meterflow/local/x.py": "from jobs import plan\nfrom meterflow.commands import cli\n",
        "meterflow/x.py": "from jobs.plan import LATE_EVENT_SCHEMA\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
        found[name] = imports_up(tmp_path / name)
    assert found == {
        "billing/x.py": ["connectors", "connectors.kafka_writer"],
        "sinks/x.py": ["connectors.topics", "meterflow.commands.root", "meterflow.local"],
        "connectors/x.py": ["sinks.postgres", "sinks.postgres.connect"],
        "jobs/x.py": ["meterflow.local.base", "meterflow.local.base.Stack"],
        "meterflow/local/x.py": ["meterflow.commands", "meterflow.commands.cli"],
        "meterflow/x.py": ["jobs.plan", "jobs.plan.LATE_EVENT_SCHEMA"],
    }
    (tmp_path / "tests").mkdir()
    client = tmp_path / "tests" / "test_x.py"
    client.write_text(
        "from meterflow.local import base\nfrom meterflow.local.base import _hidden, pid_alive\nimport meterflow.local.flink as fl\n"
        "base._x()\nfl.FlinkCluster(cfg)._y\nmonkeypatch.setattr(base.Thing, '_z', 1)\nself._fine = pid_alive\n"
    )
    assert sorted(use.split(":")[0] for use in private_uses(client)) == ["line 2", "line 4", "line 5", "line 6"]


SOURCES = [*PRODUCTION, *sorted((REPO_ROOT / "bench").rglob("*.py"))]


def import_graph(paths: list[Path]) -> dict[str, set[str]]:
    """Module -> the modules among ``paths`` it imports (``from a import b`` names ``a.b`` when that is a file)."""
    modules = {_module_of(p): p for p in paths}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_modules(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and modules[imported].name != "__init__.py":
                targets.add(imported)
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of two or more modules that import each other, through others or straight (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_file_imports_a_file_that_imports_it():
    assert circles(import_graph(SOURCES)) == []


def test_a_circle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]


def test_test_modules_have_unique_names():
    """pytest imports test modules by their base name (no __init__.py): two with one name break collection."""
    from collections import Counter
    from pathlib import Path

    names = Counter(p.name for p in (Path(__file__).parents[1]).rglob("test_*.py"))
    assert [n for n, k in names.items() if k > 1] == []
