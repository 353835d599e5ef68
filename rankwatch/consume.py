"""Reading the anomalies topic (`rankwatch anomalies`) and showing anomaly records as a table."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from kafka import KafkaConsumer, TopicPartition

from rankwatch.config import Settings

log = logging.getLogger(__name__)


def follow_anomalies(settings: Settings, follow: bool = False, from_beginning: bool = True,
                     poll_ms: int = 500) -> Iterator[dict[str, Any]]:
    """Anomaly dicts from the topic; without `follow`, stops at the log end as it was when called."""
    consumer = KafkaConsumer(**settings.kafka_kwargs(), enable_auto_commit=False, group_id=None)
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
        ends = consumer.end_offsets(tps)
        while True:
            batch = consumer.poll(timeout_ms=poll_ms)
            for msgs in batch.values():
                for m in msgs:
                    try:
                        yield orjson.loads(m.value)
                    except orjson.JSONDecodeError:
                        log.warning("skipping a non-JSON message at %s:%d", m.topic, m.offset)
            if not follow and all(consumer.position(tp) >= ends[tp] for tp in tps):
                return
    finally:
        consumer.close()


COLUMNS = ("event_time", "job", "rank", "detector", "signal", "value", "threshold", "severity", "message")
_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


def _cell(rec: dict[str, Any], col: str) -> str:
    v = rec.get(col)
    if isinstance(v, float):
        return f"{v:.4g}"
    if col == "event_time" and isinstance(v, str):
        return v.replace("T", " ")[:23]
    return "" if v is None else str(v)


def anomaly_table(records: Iterable[dict[str, Any]], title: str = "anomalies"):
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in COLUMNS:
        table.add_column(col, overflow="fold", max_width=70 if col == "message" else None)
    for rec in records:
        table.add_row(*(_cell(rec, c) for c in COLUMNS), style=_STYLE.get(rec.get("severity"), ""))
    return table


def render_table(records: Iterable[dict[str, Any]], live: bool = False) -> None:
    from rich.console import Console

    console = Console()
    if not live:
        console.print(anomaly_table(list(records)))
        return
    for rec in records:  # streaming: one line per anomaly as it arrives
        console.print(" | ".join(_cell(rec, c) for c in COLUMNS), style=_STYLE.get(rec.get("severity"), ""))
