"""Which operators of the usage job read the job-wide state TTL (``table.exec.state.ttl``).

The job sets the TTL to ``event_time.dedup_horizon`` for the whole table environment; Flink 2.3's
``STATE_TTL`` hint does not reach the Deduplicate, so there is no per-operator way to scope it. The
job-wide key is only safe while the Deduplicate is the sole operator that reads it: the window
aggregate, the classifier, the window guard, the closer and the sinks clean up by watermark and timers. Any stateful
SQL operator added later (a GROUP BY without a window, a join, a rank, an upsert materialiser)
would silently inherit a 7-day TTL; this test fails when that happens.

How: the job's real StreamGraph (``declare_pipeline``) is built with a horizon of a distinctive
millisecond value, and every operator (factory, operator, user function, generated code, to a
bounded depth) is searched reflectively for that value, as a number, a ``Duration`` or in code.
The planner hands the TTL to an operator as plain milliseconds (``stateRetentionTime``) or a
``StateTtlConfig`` (a ``Duration``), so an operator that will use it carries it.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from meterflow.config import JobConfig, load_config
from tests.flink.usage_graph import usage_stream_graph

pytestmark = [pytest.mark.flink, pytest.mark.slow]

# 7 days plus 1,234 ms, 30 s plus 17 ms: values no default or derived setting of Flink takes.
HORIZON_MS = 7 * 86_400_000 + 1_234
LATENESS_MS = 30_017
MAX_DEPTH = 6
# Only Flink's and the project's own classes are walked; JDK internals are not reflectively open.
WALKED_PACKAGES = ("org.apache.flink.", "dev.meterflow.")


class ValueFinder:
    """Paths, inside one Java object graph, at which a millisecond value occurs."""

    def __init__(self, value: int) -> None:
        from pyflink.java_gateway import get_gateway

        self.value = value
        self.jvm = get_gateway().jvm

    def find(self, root: Any) -> list[str]:
        """Every field path under ``root`` holding the value (number, Duration, or text of generated code)."""
        self._seen: set[int] = set()
        return list(self._walk(root, "", 0))

    def _walk(self, obj: Any, path: str, depth: int) -> Iterator[str]:
        if obj is None or depth > MAX_DEPTH:
            return
        if isinstance(obj, (str, int, float, bool, Decimal)):
            # Py4J hands boxed numbers, BigDecimals (the window guard's sum limit) and strings over as Python values.
            if (isinstance(obj, (int, Decimal)) and obj == self.value) or (
                isinstance(obj, str) and str(self.value) in obj
            ):
                yield path
            return
        identity = self.jvm.System.identityHashCode(obj)
        if identity in self._seen:
            return
        self._seen.add(identity)
        cls = obj.getClass()
        name = cls.getName()
        if cls.isArray():
            if not cls.getComponentType().isPrimitive():
                array = self.jvm.java.lang.reflect.Array
                for i in range(array.getLength(obj)):
                    yield from self._walk(array.get(obj, i), f"{path}[{i}]", depth + 1)
            return
        if name == "java.time.Duration":
            if obj.toMillis() == self.value:
                yield path
            return
        if not name.startswith(WALKED_PACKAGES):
            return
        yield from self._fields(obj, cls, path, depth)

    def _fields(self, obj: Any, cls: Any, path: str, depth: int) -> Iterator[str]:
        modifier = self.jvm.java.lang.reflect.Modifier
        while cls is not None and cls.getName().startswith(WALKED_PACKAGES):
            for field in cls.getDeclaredFields():
                if modifier.isStatic(field.getModifiers()):
                    continue
                field.setAccessible(True)
                value = field.get(obj)
                if field.getType().isPrimitive():
                    if value == self.value:
                        yield f"{path}.{field.getName()}"
                else:
                    yield from self._walk(value, f"{path}.{field.getName()}", depth + 1)
            cls = cls.getSuperclass()


def _operators_holding(cfg: JobConfig, value: int) -> dict[str, list[str]]:
    """Operator name -> paths of ``value`` in it, over the usage job's StreamGraph."""
    graph = usage_stream_graph(cfg)
    finder = ValueFinder(value)
    found = {}
    for node in graph.getStreamNodes().toArray():
        paths = finder.find(node.getOperatorFactory())
        if paths:
            found[node.getOperatorName()] = paths
    return found


def _config(write_config, lateness: str) -> JobConfig:
    text = f"kafka:\n  bootstrap_servers: 127.0.0.1:9\nevent_time:\n  dedup_horizon: {HORIZON_MS}ms\n  allowed_lateness: {lateness}\n"
    return load_config(write_config(text), environ={"METERFLOW_POSTGRES_PASSWORD": "unused-at-planning"})


@pytest.mark.parametrize("lateness", ["0s", f"{LATENESS_MS}ms"])
def test_only_the_deduplicate_reads_the_job_wide_state_ttl(write_config, lateness):
    """The dedup horizon reaches the Deduplicate's retention and no other operator, with and without allowed lateness.

    Without allowed lateness the job leaves ``table.exec.emit.allow-lateness`` unset: the legacy
    window aggregate must not fall back to the state TTL for it either.
    """
    cfg = _config(write_config, lateness)
    holders = _operators_holding(cfg, HORIZON_MS)
    assert list(holders) == [name for name in holders if name.startswith("Deduplicate")], holders
    assert len(holders) == 1, holders
    (paths,) = holders.values()
    assert any(p.endswith(".userFunction.stateRetentionTime") for p in paths), paths


def test_the_search_sees_operator_settings(write_config):
    """Control: the same search finds the allowed lateness in the window aggregate, so an absent TTL is not a blind spot."""
    cfg = _config(write_config, f"{LATENESS_MS}ms")
    holders = _operators_holding(cfg, LATENESS_MS)
    assert any(name.startswith("GroupWindowAggregate") for name in holders), holders
