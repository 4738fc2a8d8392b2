"""The group-by key is built twice: in the job's SQL (jobs/source_plan.py dimensions_key_expr, Flink's
JSON_OBJECT) and in Python for late events (meterflow/corrections.py dimensions_key). A late event
corrects the window whose key has the same bytes, so both must agree byte for byte, on values a
producer may send."""

from __future__ import annotations

import pytest

from jobs.source_plan import dimensions_key_expr
from jobs.sql import sql_string
from meterflow.config import JobConfig
from meterflow.corrections import dimensions_key

pytestmark = [pytest.mark.flink]

CFG = JobConfig.model_validate(
    {"meters": [{"name": "tokens", "group_by": ["region", "model", "tier"]}, {"name": "api_calls"}]}
)
DIMENSIONS = [
    {"region": "eu-west-1", "model": "gpt", "tier": "pro"},
    {"region": "eu", "model": 'say "hi"', "tier": "back\\slash"},
    {"region": "zürich", "model": "模型", "tier": "emoji 🚀"},
    {"region": "tab\there", "model": "new\nline", "tier": "\u007f del"},
    {"region": "a/b", "model": "<&>", "tier": "\u2028 sep"},
    {"region": "only region"},  # missing dimensions are the empty string
    {},
]


def _map(dimensions: dict[str, str]) -> str:
    if not dimensions:
        return "CAST(MAP['x', 'x'] AS MAP<STRING, STRING>)"  # no grouped dimension present
    return "MAP[" + ", ".join(f"{sql_string(k)}, {sql_string(v)}" for k, v in dimensions.items()) + "]"


def test_the_sql_and_the_python_group_by_keys_are_the_same_bytes(table_env):
    rows = ", ".join(f"({i}, 'tokens', {_map(d)})" for i, d in enumerate(DIMENSIONS))
    rows += f", ({len(DIMENSIONS)}, 'api_calls', {_map(DIMENSIONS[0])})"
    query = f"SELECT i, {dimensions_key_expr(CFG)} FROM (VALUES {rows}) AS t(i, `meter`, `dimensions`)"
    with table_env.execute_sql(query).collect() as results:
        got = {i: key for i, key in results}
    expected = {i: dimensions_key(d, ["region", "model", "tier"]) for i, d in enumerate(DIMENSIONS)}
    expected[len(DIMENSIONS)] = dimensions_key(DIMENSIONS[0], [])
    assert {i: got[i].encode() for i in expected} == {i: key.encode() for i, key in expected.items()}
