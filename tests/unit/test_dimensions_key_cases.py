"""The group-by key is built twice: in the source, by the meterflow-avro format (jvm/ EventRules.dimensionsKey),
and in Python for late events (meterflow/corrections.py dimensions_key). A late event corrects the
window whose key has the same bytes, so both must agree byte for byte, on values a producer may send
(and on control characters, which the input contract refuses before any key is built).

One table of cases (``key_cases``) is the parity check: it is written, with the key Python builds, to
jvm/src/test/resources/dimensions_key_cases.json; this module checks the committed file against the
table, and the Java EventRulesTest builds every case's key in the format and expects the same bytes.
After changing the table or the key, rewrite the file with
``.venv/bin/python -m tests.unit.test_dimensions_key_cases``.
"""

from __future__ import annotations

import json

from meterflow.corrections import dimensions_key
from tests.conftest import REPO_ROOT

FIXTURE = REPO_ROOT / "jvm" / "src" / "test" / "resources" / "dimensions_key_cases.json"
GROUP_BY = ["region", "model", "tier"]


def key_cases() -> list[tuple[list[str], dict[str, str]]]:
    """(group-by dimensions, the event's dimensions): quotes, backslashes, non-ASCII, control characters, missing ones."""
    grouped = [
        {"region": "eu-west-1", "model": "gpt", "tier": "pro"},
        {"region": "eu", "model": 'say "hi"', "tier": "back\\slash"},
        {"region": "zürich", "model": "模型", "tier": "emoji 🚀"},
        {"region": "tab\there", "model": "new\nline", "tier": "\u007f del"},
        {"region": "\r\b\f", "model": "\x00\x01\x1b\x1f", "tier": "\u0085 next line"},
        {"region": "a/b", "model": "<&>", "tier": "\u2028 sep"},
        {"region": "", "model": " ", "tier": "'single'"},
        {"region": "only region"},
        {"other": "not grouped"},
        {},
    ]
    cases = [(GROUP_BY, d) for d in grouped]
    cases += [(["model"], {"model": "m", "region": "r"}), ([], {"region": "r"}), (["a.b:c-d_e"], {"a.b:c-d_e": "x"})]
    return cases


def fixture_text() -> str:
    rows = [
        {"group_by": group_by, "dimensions": dims, "key": dimensions_key(dims, group_by)}
        for group_by, dims in key_cases()
    ]
    return json.dumps(rows, ensure_ascii=False, indent=1) + "\n"


def test_the_committed_fixture_is_the_table():
    """The Java test reads what Python builds today."""
    assert FIXTURE.read_text(encoding="utf-8") == fixture_text()


def test_keys_are_sorted_compact_json_with_missing_dimensions_empty():
    """The key's shape: names sorted, no spaces, a missing dimension as '', none at all as '{}'."""
    assert dimensions_key({"region": "eu", "model": "m"}, GROUP_BY) == '{"model":"m","region":"eu","tier":""}'
    assert dimensions_key({"region": "eu"}, []) == "{}"
    assert dimensions_key({"model": 'a"\\'}, ["model"]) == '{"model":"a\\"\\\\"}'


if __name__ == "__main__":
    FIXTURE.write_text(fixture_text(), encoding="utf-8")
    print(f"wrote {len(key_cases())} cases to {FIXTURE}")
