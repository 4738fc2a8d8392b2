"""The input contract at each limit, and the JVM decoder kept in step with it.

One table of tricky events (``contract_cases``) is the parity check: it is written, as Avro bytes
with the reason ``contract_violation`` gives, to jvm/src/test/resources/input_contract_cases.json;
this module checks the committed file against the table, and the Java InputContractTest decodes
every case with the job's decoder and expects the same reason. After changing the table or the
rules, rewrite the file with ``.venv/bin/python -m tests.unit.test_input_contract``.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from connectors.avro_codec import decode_usage_event, encode_usage_event
from meterflow.input_contract import (
    MAX_ABS_QUANTITY,
    MAX_DIMENSION_KEY_BYTES,
    MAX_DIMENSION_VALUE_BYTES,
    MAX_DIMENSIONS,
    MAX_ID_BYTES,
    MAX_WINDOW_ABS_SUM,
    contract_violation,
)
from tests.conftest import REPO_ROOT

JAVA = REPO_ROOT / "jvm" / "src" / "main" / "java" / "dev" / "meterflow" / "format" / "InputContract.java"
FIXTURE = REPO_ROOT / "jvm" / "src" / "test" / "resources" / "input_contract_cases.json"
IDS = ("event_id", "tenant_id", "customer_id", "meter")
EPSILON = Decimal("1e-9")


def event(**change: Any) -> dict[str, Any]:
    base = {
        "event_id": "e1",
        "tenant_id": "t1",
        "customer_id": "c1",
        "meter": "tokens",
        "quantity": Decimal("1.5"),
        "event_time": datetime(2026, 6, 1, 12, tzinfo=UTC),
        "dimensions": {"region": "eu"},
    }
    return {**base, **change}


def dims(n: int) -> dict[str, str]:
    return {f"k{i}": "v" for i in range(n)}


def contract_cases() -> list[tuple[str, dict[str, Any]]]:
    """(name, event): every limit exactly at it and one past it, control characters, the order of checks."""
    cases: list[tuple[str, dict[str, Any]]] = [("valid", event()), ("no dimensions", event(dimensions={}))]
    for name in IDS:
        limit = MAX_ID_BYTES[name]
        cases += [
            (f"{name} empty (a missing field, not the contract)", event(**{name: ""})),
            (f"{name} at {limit} bytes", event(**{name: "a" * limit})),
            (f"{name} one byte past", event(**{name: "a" * (limit + 1)})),
            (f"{name} at {limit} bytes of 2-byte characters", event(**{name: "é" * (limit // 2)})),
            (f"{name} one byte past with 2-byte characters", event(**{name: "é" * (limit // 2) + "a"})),
            (f"{name} at {limit} bytes of 4-byte characters", event(**{name: "😀" * (limit // 4)})),
            (f"{name} NUL", event(**{name: "abc\x00"})),
            (f"{name} NUL after multi-byte characters", event(**{name: "é€😀\x00x"})),
            (f"{name} C1 NEL", event(**{name: "a\x85"})),
            (f"{name} DEL", event(**{name: "\x7f"})),
            (f"{name} too long and a NUL: length first", event(**{name: "\x00" * (limit + 1)})),
        ]
    cases += [
        ("event_id 3000 bytes", event(event_id="x" * 3000)),
        ("tab", event(customer_id="\t")),
        ("U+0080", event(customer_id="é\x80")),
        ("U+009F", event(meter="m\x9f")),
        ("U+00A0 and U+00A1 are not controls", event(meter="\xa0\xa1")),
        ("U+0100 (bytes C4 80) is not a control", event(meter="\u0100")),
        (f"{MAX_DIMENSIONS} dimensions", event(dimensions=dims(MAX_DIMENSIONS))),
        (f"{MAX_DIMENSIONS + 1} dimensions", event(dimensions=dims(MAX_DIMENSIONS + 1))),
        ("dimension key at 64 bytes", event(dimensions={"k" * MAX_DIMENSION_KEY_BYTES: "v"})),
        ("dimension key one byte past", event(dimensions={"k" * (MAX_DIMENSION_KEY_BYTES + 1): "v"})),
        ("dimension key at 64 bytes of 2-byte characters", event(dimensions={"ü" * 32: "v"})),
        ("dimension key 2-byte characters one byte past", event(dimensions={"ü" * 32 + "k": "v"})),
        ("dimension key empty", event(dimensions={"": "v"})),
        ("dimension key NUL", event(dimensions={"re\x00gion": "v"})),
        ("dimension key C1", event(dimensions={"\x85": "v"})),
        ("dimension key DEL", event(dimensions={"a\x7f": "v"})),
        ("dimension value at 128 bytes", event(dimensions={"region": "v" * MAX_DIMENSION_VALUE_BYTES})),
        ("dimension value one byte past", event(dimensions={"region": "v" * (MAX_DIMENSION_VALUE_BYTES + 1)})),
        ("dimension value at 128 bytes of 2-byte characters", event(dimensions={"region": "ß" * 64})),
        ("dimension value 2-byte characters one byte past", event(dimensions={"region": "ß" * 64 + "v"})),
        ("dimension value empty", event(dimensions={"region": ""})),
        ("dimension value NUL", event(dimensions={"region": "\x00"})),
        ("dimension value C1", event(dimensions={"region": "eu\x85"})),
        ("dimension value DEL", event(dimensions={"region": "eu-\x7f"})),
        ("dimension value 3000 bytes", event(dimensions={"region": "v" * 3000})),
        ("key with a quote: repr's double quotes", event(dimensions={"it's": "\x00"})),
        ("key with both quotes", event(dimensions={"a'b\"c": "\x00"})),
        ("key with a backslash", event(dimensions={"a\\b": "\x00"})),
        ("key with a non-printable space and a format character", event(dimensions={"a\xa0b\u200bc\u3000": "\x00"})),
        ("key of 64 bytes of 2-byte characters, bad value", event(dimensions={"é" * 32: "v" * 129})),
        ("key with plain punctuation", event(dimensions={"app.v2:region-id_x": "\x00"})),
        ("dimensions checked in wire order", event(dimensions={"z": "ok", "b": "\x00", "a": "\x00"})),
        ("a bad key before a bad value", event(dimensions={"": "x", "a": "\x00"})),
        ("17 dimensions and a bad one: the count first", event(dimensions={"bad": "\x00", **dims(MAX_DIMENSIONS)})),
        ("a bad id and a bad dimension: the id first", event(meter="m\x00", dimensions={"region": "\x00"})),
        (
            "a bad dimension and a bad quantity: the dimension first",
            event(quantity=-MAX_ABS_QUANTITY - 1, dimensions={"region": "\x00"}),
        ),
        ("tenant and event_id bad: event_id first", event(event_id="\x01", tenant_id="t" * 65)),
        ("quantity 10^15", event(quantity=MAX_ABS_QUANTITY)),
        ("quantity 10^15 + 10^-9", event(quantity=MAX_ABS_QUANTITY + EPSILON)),
        ("quantity -10^15", event(quantity=-MAX_ABS_QUANTITY)),
        ("quantity -(10^15 + 10^-9)", event(quantity=-MAX_ABS_QUANTITY - EPSILON)),
        ("quantity 0", event(quantity=Decimal(0))),
        ("quantity the largest decimal(38, 9)", event(quantity=MAX_WINDOW_ABS_SUM)),
    ]
    names = [name for name, _ in cases]
    assert len(set(names)) == len(names), "case names are unique"
    return cases


def fixture_text() -> str:
    """The fixture the table makes: each case's Avro bytes (base64) and the contract's reason."""
    rows = [
        {"name": name, "avro": base64.b64encode(encode_usage_event(e)).decode(), "reason": contract_violation(e)}  # type: ignore[arg-type]  # hostile events are not UsageEvents on purpose
        for name, e in contract_cases()
    ]
    return json.dumps(rows, indent=1, ensure_ascii=True) + "\n"


def test_the_committed_fixture_is_the_table():
    """The Java test reads what this table makes today (rewrite it with `python -m tests.unit.test_input_contract`)."""
    assert FIXTURE.read_text() == fixture_text()


def test_fixture_events_read_back_as_the_checked_events():
    """The bytes carry the same dimensions in the same (wire) order as the dict the reason came from."""
    for name, e in contract_cases():
        back = decode_usage_event(encode_usage_event(e))  # type: ignore[arg-type]  # hostile events are not UsageEvents on purpose
        assert list(back["dimensions"].items()) == list(e["dimensions"].items()), name
        assert contract_violation(back) == contract_violation(e), name


# The reasons, exactly, at each limit (the table above gives the Java side the same cases).
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"event_id": "a" * 128}, None),
        ({"event_id": "a" * 129}, "contract: event_id is 129 bytes, at most 128"),
        ({"tenant_id": "a" * 64}, None),
        ({"tenant_id": "a" * 65}, "contract: tenant_id is 65 bytes, at most 64"),
        ({"customer_id": "a" * 128}, None),
        ({"customer_id": "a" * 129}, "contract: customer_id is 129 bytes, at most 128"),
        ({"meter": "a" * 64}, None),
        ({"meter": "a" * 65}, "contract: meter is 65 bytes, at most 64"),
        ({"meter": "é" * 32}, None),
        ({"meter": "é" * 32 + "a"}, "contract: meter is 65 bytes, at most 64"),
        ({"event_id": ""}, None),
        ({"event_id": "x" * 3000}, "contract: event_id is 3000 bytes, at most 128"),
        ({"customer_id": "x" * 70_000}, "contract: customer_id is 70000 bytes, at most 128"),
        ({"meter": "m" * 900_000}, "contract: meter is 900000 bytes, at most 64"),
        ({"event_id": "abc\x00"}, "contract: event_id has control character U+0000 at character 3"),
        ({"tenant_id": "abc\x00"}, "contract: tenant_id has control character U+0000 at character 3"),
        ({"customer_id": "abc\x00"}, "contract: customer_id has control character U+0000 at character 3"),
        ({"meter": "abc\x00"}, "contract: meter has control character U+0000 at character 3"),
        ({"meter": "é€😀\x00"}, "contract: meter has control character U+0000 at character 3"),
        ({"customer_id": "a\x85"}, "contract: customer_id has control character U+0085 at character 1"),
        ({"customer_id": "\x7f"}, "contract: customer_id has control character U+007F at character 0"),
        ({"meter": "\x9f"}, "contract: meter has control character U+009F at character 0"),
        ({"meter": "\xa0"}, None),
        ({"event_id": "a\ud800"}, "contract: event_id has lone surrogate U+D800 at character 1"),
        ({"dimensions": dims(16)}, None),
        ({"dimensions": dims(17)}, "contract: 17 dimensions, at most 16"),
        ({"dimensions": {"k" * 64: "v"}}, None),
        ({"dimensions": {"k" * 65: "v"}}, "contract: dimension key is 65 bytes, at most 64"),
        ({"dimensions": {"ü" * 32: "v"}}, None),
        ({"dimensions": {"ü" * 32 + "k": "v"}}, "contract: dimension key is 65 bytes, at most 64"),
        ({"dimensions": {"": "v"}}, "contract: dimension key is 0 bytes, at least 1"),
        ({"dimensions": {"ab\x00": "v"}}, "contract: dimension key has control character U+0000 at character 2"),
        ({"dimensions": {"region": "v" * 128}}, None),
        ({"dimensions": {"region": "v" * 129}}, "contract: dimension 'region' is 129 bytes, at most 128"),
        ({"dimensions": {"region": ""}}, None),
        (
            {"dimensions": {"region": "\x00"}},
            "contract: dimension 'region' has control character U+0000 at character 0",
        ),
        (
            {"dimensions": {"region": "eu\x85"}},
            "contract: dimension 'region' has control character U+0085 at character 2",
        ),
        (
            {"dimensions": {"region": "\x7f"}},
            "contract: dimension 'region' has control character U+007F at character 0",
        ),
        ({"dimensions": {"it's": "\x00"}}, 'contract: dimension "it\'s" has control character U+0000 at character 0'),
        ({"quantity": MAX_ABS_QUANTITY}, None),
        ({"quantity": -MAX_ABS_QUANTITY}, None),
        ({"quantity": MAX_ABS_QUANTITY + EPSILON}, "contract: |quantity| exceeds 1000000000000000"),
        ({"quantity": -MAX_ABS_QUANTITY - EPSILON}, "contract: |quantity| exceeds 1000000000000000"),
    ],
)
def test_reasons_at_each_limit(change, reason):
    """Exactly at a limit is kept, one past it is refused with the job's reason."""
    assert contract_violation(event(**change)) == reason


def test_the_largest_window_sum_is_the_largest_decimal_38_9():
    """Exact, not rounded to Decimal's default 28 digits."""
    assert MAX_WINDOW_ABS_SUM.as_tuple() == (0, (9,) * 38, -9)


def test_a_huge_field_is_never_repeated_in_the_reason():
    """Reasons stay short whatever the record holds."""
    for name, e in contract_cases():
        reason = contract_violation(e)
        assert reason is None or len(reason) < 200, name
    assert len(contract_violation(event(dimensions={"k": "v" * 900_000})) or "") < 100


def _java_int(name: str) -> int:
    return int(re.search(rf"\bint {name}\s*=\s*(\d+);", JAVA.read_text()).group(1))


def test_java_constants_are_the_python_ones():
    """InputContract.java and meterflow/input_contract.py hold the same limits."""
    for name in IDS:
        assert _java_int(f"MAX_{name.upper()}_BYTES") == MAX_ID_BYTES[name]
    assert _java_int("MAX_DIMENSIONS") == MAX_DIMENSIONS
    assert _java_int("MAX_DIMENSION_KEY_BYTES") == MAX_DIMENSION_KEY_BYTES
    assert _java_int("MAX_DIMENSION_VALUE_BYTES") == MAX_DIMENSION_VALUE_BYTES
    quantity = re.search(r'MAX_ABS_QUANTITY = new BigDecimal\("(\d+)"\);', JAVA.read_text()).group(1)
    assert Decimal(quantity) == MAX_ABS_QUANTITY
    order = re.findall(r'"(\w+)"', re.search(r"ID_FIELDS = \{(.*?)\};", JAVA.read_text(), re.S).group(1))
    assert tuple(order) == tuple(MAX_ID_BYTES) == IDS


if __name__ == "__main__":
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(fixture_text())
    print(f"wrote {len(contract_cases())} cases to {FIXTURE}")
