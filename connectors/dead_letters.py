"""Dead letters as data: decoding the dead-letter topic's records, choosing some, and reporting them (pure).

``meterflow dead-letters list`` and ``replay`` read the topic (connectors/kafka_reader.py) and hand
the records to these functions; only ``replay`` writes anything, the chosen payloads unchanged.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import fastavro

from connectors.avro_codec import read_record, usage_event_schema
from connectors.avro_types import AVRO_DIR, load_schema

DEAD_LETTER_SCHEMA = AVRO_DIR / "dead_letter.avsc"
# How many dead letters `replay` sends without asking (more need a yes, or --yes).
CONFIRM_ABOVE = 100
# The width of a reason in the table; the JSON output has it whole.
REASON_WIDTH = 100
# What jvm/ CountDeadLetter appends to the reason when the payload was cut.
_PAYLOAD_CUT = re.compile(r"; payload cut to (?P<kept>\d+) of (?P<of>\d+) bytes$")
# A schema-registry framed message: magic byte 0, then a 4-byte schema id, then the Avro body.
_FRAME_HEADER = 5


@lru_cache(maxsize=1)
def dead_letter_schema() -> Any:
    """The parsed avro/dead_letter.avsc (parsed once)."""
    return fastavro.parse_schema(load_schema(DEAD_LETTER_SCHEMA))


def kind_of(reason: str) -> str:
    """The reason's kind, as the job counts it in metrics (jvm/ ``CountDeadLetter``): the text before
    the first colon, trimmed, each run of other characters than ASCII letters and digits one ``_``,
    lower case. ``"unknown meter: x"`` is ``unknown_meter``; a reason without a colon is its own kind."""
    head = reason.split(":", 1)[0].strip("".join(chr(c) for c in range(0x21)))  # Java's trim(): every char <= ' '
    return re.sub(r"[^A-Za-z0-9]+", "_", head).lower()


@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic: where it is (``partition``, ``offset``) and what it holds."""

    partition: int
    offset: int
    payload: bytes
    reason: str
    source_topic: str
    source_partition: int
    source_offset: int
    seen_at: datetime  # aware, UTC

    @property
    def kind(self) -> str:
        return kind_of(self.reason)

    @property
    def payload_cut(self) -> bool:
        """Whether the job kept only the start of the message (jvm/ BoundedPayload: a value longer than
        kafka.max_message_bytes, from an input topic created elsewhere). Such a payload is not what
        was sent, so it is never replayed."""
        mark = _PAYLOAD_CUT.search(self.reason)
        return mark is not None and int(mark["kept"]) == len(self.payload) < int(mark["of"])


def decode_dead_letter(partition: int, offset: int, value: bytes) -> DeadLetter:
    """One dead-letter record's value (avro/dead_letter.avsc); ValueError when it is not one."""
    buf = io.BytesIO(value)
    try:
        r = read_record(buf, dead_letter_schema())
    except Exception as e:  # fastavro raises EOFError, UnicodeDecodeError, ... on foreign bytes
        msg = f"not a dead letter: {type(e).__name__}: {e}"
        raise ValueError(msg) from e
    if buf.tell() != len(value):
        msg = f"not a dead letter: {len(value) - buf.tell()} bytes after the record"
        raise ValueError(msg)
    return DeadLetter(
        partition=partition,
        offset=offset,
        payload=r["payload"],
        reason=r["reason"],
        source_topic=r["source_topic"],
        source_partition=r["source_partition"],
        source_offset=r["source_offset"],
        seen_at=r["seen_at"].astimezone(UTC),
    )


@dataclass(frozen=True)
class Unreadable:
    """A record of the dead-letter topic that is not a dead letter (never the job's; reported, skipped)."""

    partition: int
    offset: int
    error: str


def decode_all(records: Iterable[tuple[int, int, bytes]]) -> tuple[list[DeadLetter], list[Unreadable]]:
    """(partition, offset, value) records decoded; ones that are not dead letters listed apart."""
    letters: list[DeadLetter] = []
    unreadable: list[Unreadable] = []
    for partition, offset, value in records:
        try:
            letters.append(decode_dead_letter(partition, offset, value))
        except ValueError as e:
            unreadable.append(Unreadable(partition, offset, str(e)))
    return letters, unreadable


def parse_time(text: str) -> datetime:
    """A --since/--until value as an aware UTC datetime: integer epoch milliseconds, or ISO-8601
    (``2026-01-31T12:00:00+01:00``, ``...Z``); an ISO time without a zone is UTC. ValueError otherwise."""
    value = text.strip()
    if re.fullmatch(r"-?\d+", value):
        return datetime.fromtimestamp(int(value) / 1000, UTC)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as e:
        msg = f"{text!r} is neither ISO-8601 nor epoch milliseconds"
        raise ValueError(msg) from e
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@dataclass(frozen=True)
class Criteria:
    """Which dead letters: each given condition must hold (an empty tuple or None holds always).

    ``reason_contains``: any of these substrings, case-insensitive. ``kinds``: any of these kinds
    (normalised like ``kind_of``). ``since`` inclusive, ``until`` exclusive, on ``seen_at``.
    ``partition``, ``from_offset``/``to_offset`` (both inclusive, in every partition read) are
    positions in the dead-letter topic. ``limit``: at most this many, oldest ``seen_at`` first.
    """

    reason_contains: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    partition: int | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    limit: int | None = None
    _needles: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _kinds: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            bound = getattr(self, name)
            if bound is not None and bound.tzinfo is None:
                msg = f"{name} must be an aware datetime (parse_time makes one)"
                raise ValueError(msg)
        for name in ("partition", "from_offset", "to_offset", "limit"):
            if (getattr(self, name) or 0) < 0:
                msg = f"{name} must not be negative"
                raise ValueError(msg)
        object.__setattr__(self, "_needles", tuple(n.casefold() for n in self.reason_contains))
        object.__setattr__(self, "_kinds", frozenset(kind_of(k) for k in self.kinds))

    def matches(self, d: DeadLetter) -> bool:
        """Whether ``d`` meets every condition (``limit`` aside)."""
        return (
            (not self._needles or any(n in d.reason.casefold() for n in self._needles))
            and (not self._kinds or d.kind in self._kinds)
            and (self.since is None or d.seen_at >= self.since)
            and (self.until is None or d.seen_at < self.until)
            and (self.partition is None or d.partition == self.partition)
            and (self.from_offset is None or d.offset >= self.from_offset)
            and (self.to_offset is None or d.offset <= self.to_offset)
        )


def select(letters: Iterable[DeadLetter], criteria: Criteria) -> list[DeadLetter]:
    """The dead letters that meet ``criteria``, oldest first (seen_at, then partition and offset),
    at most ``criteria.limit`` of them."""
    chosen = sorted((d for d in letters if criteria.matches(d)), key=lambda d: (d.seen_at, d.partition, d.offset))
    return chosen if criteria.limit is None else chosen[: criteria.limit]


class _EveryPartition(Mapping[int, int]):
    """The same start offset for whatever partition is asked about (the reader finds the partitions)."""

    def __init__(self, offset: int) -> None:
        self._offset = offset

    def __getitem__(self, partition: int) -> int:
        return self._offset

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


def start_offsets(criteria: Criteria) -> Mapping[int, int]:
    """Where reading starts in each partition (connectors/kafka_reader.py ``read_from``): nothing
    before ``from_offset`` is wanted, so nothing before it is read."""
    return _EveryPartition(criteria.from_offset or 0)


def replayable(letters: Iterable[DeadLetter]) -> tuple[list[DeadLetter], list[DeadLetter]]:
    """The dead letters whose payload is the message as sent, and those whose payload was cut."""
    whole: list[DeadLetter] = []
    cut: list[DeadLetter] = []
    for d in letters:
        (cut if d.payload_cut else whole).append(d)
    return whole, cut


def payload_identity(payload: bytes) -> dict[str, str] | None:
    """event_id, tenant_id, customer_id and meter of a payload that is a whole usage event (plain
    Avro, or after a schema-registry header read with this schema), else None."""
    bodies = [payload]
    if len(payload) > _FRAME_HEADER and payload[0] == 0:
        bodies.append(payload[_FRAME_HEADER:])
    for body in bodies:
        buf = io.BytesIO(body)
        try:
            event = read_record(buf, usage_event_schema())
        except Exception:  # noqa: BLE001, S112 - any undecodable payload is simply not keyed
            continue
        ids = {k: event[k] for k in ("event_id", "tenant_id", "customer_id", "meter")}
        if buf.tell() == len(body) and all(ids.values()):
            return ids
    return None


def replay_key(payload: bytes) -> bytes | None:
    """The Kafka key ``meterflow produce`` would give this event (``tenant_id/customer_id``), or None
    (unkeyed) when the payload is not a usage event. The key only places the record in a partition:
    the job deduplicates on the payload's (tenant_id, event_id)."""
    ids = payload_identity(payload)
    return f"{ids['tenant_id']}/{ids['customer_id']}".encode() if ids else None


def counts_by_kind(letters: Iterable[DeadLetter]) -> list[tuple[str, int]]:
    """How many dead letters of each kind, most first (ties by kind)."""
    return sorted(Counter(d.kind for d in letters).items(), key=lambda kv: (-kv[1], kv[0]))


def one_line(text: str, width: int = REASON_WIDTH) -> str:
    """``text`` safe for a terminal on one line: control characters (newlines, escapes) shown as
    ``\\uXXXX``, cut to ``width`` characters with an ellipsis."""
    shown = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F else c for c in text)
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def table_row(d: DeadLetter) -> tuple[str, ...]:
    """A dead letter as the list table shows it: offset, seen_at, source, kind, reason, payload bytes
    (marked when the job kept only the start of the message)."""
    return (
        f"{d.partition}/{d.offset}",
        d.seen_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
        one_line(f"{d.source_topic}/{d.source_partition}/{d.source_offset}", 80),
        one_line(d.kind, 40),
        one_line(d.reason),
        f"{len(d.payload)} (cut)" if d.payload_cut else str(len(d.payload)),
    )


TABLE_COLUMNS = (
    "partition/offset",
    "seen_at (UTC)",
    "source topic/partition/offset",
    "kind",
    "reason",
    "payload bytes",
)


def to_json_record(d: DeadLetter) -> dict[str, Any]:
    """A dead letter for ``--json``: its place, whole reason, payload (base64) and, when the payload
    is a usage event, its ids."""
    return {
        "partition": d.partition,
        "offset": d.offset,
        "seen_at": d.seen_at.isoformat(timespec="milliseconds"),
        "source_topic": d.source_topic,
        "source_partition": d.source_partition,
        "source_offset": d.source_offset,
        "kind": d.kind,
        "reason": d.reason,
        "payload_bytes": len(d.payload),
        "payload_cut": d.payload_cut,
        "payload_base64": base64.b64encode(d.payload).decode("ascii"),
        "event": payload_identity(d.payload),
    }


def to_json(topic: str, read: int, chosen: list[DeadLetter], unreadable: Iterable[Unreadable] = ()) -> str:
    """The ``list --json`` document: the topic, how many were read and chosen, counts per kind, the
    dead letters, and any record that was not a dead letter."""
    return json.dumps(
        {
            "topic": topic,
            "read": read,
            "selected": len(chosen),
            "by_kind": dict(counts_by_kind(chosen)),
            "dead_letters": [to_json_record(d) for d in chosen],
            "unreadable": [{"partition": u.partition, "offset": u.offset, "error": u.error} for u in unreadable],
        },
        indent=2,
    )
