"""send_values' progress: every acknowledgement reported once, while the producer's I/O thread acknowledges."""

from __future__ import annotations

from typing import ClassVar

import kafka

from connectors.kafka_writer import send_values


class _Future:
    def __init__(self, pending: list) -> None:
        self.pending = pending

    def add_callback(self, fn):
        self.pending.append(fn)
        return self

    def add_errback(self, fn):
        return self


class _Producer:
    """Acknowledges nothing by itself: the test decides when the callbacks run."""

    pending: ClassVar[list] = []

    def __init__(self, **_: object) -> None:
        _Producer.pending = []

    def send(self, *_: object, **__: object) -> _Future:
        return _Future(_Producer.pending)

    def flush(self) -> None:
        ack_all()

    def close(self) -> None:
        pass


def ack_all() -> None:
    while _Producer.pending:
        _Producer.pending.pop()(None)


def test_acknowledgements_during_a_report_are_reported_later(monkeypatch) -> None:
    monkeypatch.setattr(kafka, "KafkaProducer", _Producer)
    reported: list[int] = []

    def on_sent(n: int) -> None:
        reported.append(n)
        ack_all()  # the I/O thread acknowledges more while progress is being reported

    def records():
        for i in range(1_000):
            if i % 100 == 50:
                ack_all()
            yield (None, b"v")

    assert send_values("k:9092", "t", records(), on_sent=on_sent) == 1_000
    assert sum(reported) == 1_000, reported
