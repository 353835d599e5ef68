"""Reading the anomalies topic (`rankwatch anomalies`) and showing anomaly records as a table."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from kafka import KafkaConsumer, TopicPartition

from rankwatch.config import Settings

log = logging.getLogger(__name__)


def drain(consumer: KafkaConsumer, tps: list[TopicPartition], max_idle_polls: int = 2,
          poll_ms: int = 500, max_records: int | None = None) -> Iterator:
    """Messages of the assigned partitions from their positions to the log end.

    The end is judged by the high watermark that fetch responses carry, not by ListOffsets: the embedded
    Tansu broker answers ListOffsets(latest) with the last batch's base offset + 1, which is too low.
    A partition counts as done once its position reaches that high watermark, or after `max_idle_polls`
    empty polls (an empty partition never gets a fetch response with data)."""
    idle = 0
    seen = 0
    while True:
        batch = consumer.poll(timeout_ms=poll_ms)
        for msgs in batch.values():
            for m in msgs:
                seen += 1
                yield m
        if max_records is not None and seen >= max_records:
            return
        done = True
        for tp in tps:
            hw = consumer.highwater(tp)
            if hw is None or consumer.position(tp) < hw:
                done = False
        if done:
            return
        idle = 0 if batch else idle + 1
        if idle >= max_idle_polls:
            return


def follow_anomalies(settings: Settings, follow: bool = False, from_beginning: bool = True,
                     poll_ms: int = 500, stop: threading.Event | None = None) -> Iterator[dict[str, Any]]:
    """Anomaly dicts from the topic; without `follow`, stops at the log end as it was when called. `stop`:
    following ends within a poll of it being set, anomalies or not (so the consumer is closed before whoever
    set it stops the broker, instead of logging the broker's disappearance as errors)."""
    # A short fetch wait: the broker otherwise holds an empty fetch for 500 ms, which is latency for --follow.
    consumer = KafkaConsumer(**settings.kafka_kwargs(), enable_auto_commit=False, group_id=None,
                             fetch_max_wait_ms=50)
    try:
        parts = consumer.partitions_for_topic(settings.topic_anomalies) or set()
        tps = [TopicPartition(settings.topic_anomalies, p) for p in sorted(parts)]
        if not tps:
            log.warning("topic %s does not exist yet", settings.topic_anomalies)
            return
        consumer.assign(tps)
        if from_beginning:
            consumer.seek_to_beginning(*tps)
        else:
            consumer.seek_to_end(*tps)
        if follow:
            while stop is None or not stop.is_set():
                for msgs in consumer.poll(timeout_ms=poll_ms).values():
                    yield from _decode(msgs)
        else:
            for m in drain(consumer, tps):
                yield from _decode([m])
    finally:
        consumer.close()


def messages_from_beginning(settings: Settings, topics: list[str]) -> Iterator:
    """Every message of the given topics, from the beginning to the log end as it is now."""
    consumer = KafkaConsumer(**settings.kafka_kwargs(), enable_auto_commit=False, group_id=None)
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or [])]
        if not tps:
            return
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        yield from drain(consumer, tps)
    finally:
        consumer.close()


def read_records_from_topics(settings: Settings, topics: list[str]) -> list:
    """Every valid record on the given typed topics (from the beginning), in event-time order."""
    from rankwatch.records import decode_records

    out = []
    for m in messages_from_beginning(settings, topics):
        records, errors = decode_records(m.value)
        out.extend(records)
        if errors:
            log.warning("skipping %d invalid records at %s:%d", len(errors), m.topic, m.offset)
    out.sort(key=lambda r: r.ts)
    return out


def _decode(msgs) -> Iterator[dict[str, Any]]:
    for m in msgs:
        try:
            yield orjson.loads(m.value)
        except orjson.JSONDecodeError:
            log.warning("skipping a non-JSON message at %s:%d", m.topic, m.offset)


COLUMNS = ("event_time", "job", "rank", "detector", "signal", "value", "threshold", "severity", "message")
_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


def _cell(rec: dict[str, Any], col: str) -> str:
    v = rec.get(col)
    if isinstance(v, float):
        return f"{v:.4g}"
    if col == "event_time" and isinstance(v, str):
        return v.replace("T", " ")[:23]
    return "" if v is None else str(v)


def anomaly_table(records: Iterable[dict[str, Any]], title: str = "anomalies", width: int = 80):
    """A table that reads at `width` columns: below 120, two columns (who and what, then the message with room to
    wrap: nine narrow columns would fold a message into a word per line); wider, one column per field."""
    from rich.table import Table

    table = Table(title=title, show_lines=width < 120)
    rows = list(records)
    if width >= 120:
        for col in COLUMNS:
            table.add_column(col, overflow="fold", max_width=70 if col == "message" else None)
        for rec in rows:
            table.add_row(*(_cell(rec, c) for c in COLUMNS), style=_STYLE.get(rec.get("severity"), ""))
        return table
    table.add_column("when / where / what", no_wrap=True)
    table.add_column("message", overflow="fold", ratio=1)
    for rec in rows:
        where = rec.get("job") or ""
        if rec.get("rank") is not None:
            where = f"{where} rank {rec['rank']}".strip()
        what = f"{rec.get('detector', '')} {rec.get('severity', '')}".strip()
        table.add_row("\n".join((_cell(rec, "event_time"), where[:26], what)), _cell(rec, "message"),
                      style=_STYLE.get(rec.get("severity"), ""))
    return table


def render_table(records: Iterable[dict[str, Any]], live: bool = False) -> None:
    from rich.console import Console

    console = Console()
    if not live:
        console.print(anomaly_table(list(records), width=console.width))
        return
    for rec in records:  # streaming: one line per anomaly as it arrives
        console.print(" | ".join(_cell(rec, c) for c in COLUMNS), style=_STYLE.get(rec.get("severity"), ""))
