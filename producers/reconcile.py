"""After a crash, find which lines already reached the broker, so a restart duplicates none.

The checkpoint records, per topic partition, the offset just past the shipper's last acknowledged record.
Everything this shipper could have sent since then lies after those offsets, so reading forward from them to
the log end and keeping the records whose file identity is ours gives, per file, the last line shipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import orjson
from kafka import KafkaConsumer, TopicPartition

log = logging.getLogger(__name__)


def tp_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def end_positions(consumer: KafkaConsumer, topics: Iterable[str]) -> dict[str, int]:
    tps = []
    for topic in topics:
        parts = consumer.partitions_for_topic(topic) or set()
        tps.extend(TopicPartition(topic, p) for p in parts)
    if not tps:
        return {}
    return {tp_key(tp.topic, tp.partition): off for tp, off in consumer.end_offsets(tps).items()}


def shipped_since(consumer: KafkaConsumer, positions: dict[str, int], fids: set[str] | None,
                  fid_prefix: str, max_records: int = 5_000_000) -> dict[str, int]:
    """fid -> highest line offset found after `positions` for files of this shipper."""
    tps = []
    for key, off in positions.items():
        topic, _, part = key.rpartition(":")
        tps.append((TopicPartition(topic, int(part)), off))
    if not tps:
        return {}
    consumer.assign([tp for tp, _ in tps])
    ends = consumer.end_offsets([tp for tp, _ in tps])
    todo = {}
    for tp, off in tps:
        if ends.get(tp, 0) > off:
            consumer.seek(tp, off)
            todo[tp] = ends[tp]
    found: dict[str, int] = {}
    seen = 0
    while todo and seen < max_records:
        batch = consumer.poll(timeout_ms=1000, max_records=10000)
        for tp, msgs in batch.items():
            for m in msgs:
                seen += 1
                try:
                    d = orjson.loads(m.value)
                except orjson.JSONDecodeError:
                    continue
                fid = d.get("fid") if isinstance(d, dict) else None
                if not fid or not fid.startswith(fid_prefix) or (fids is not None and fid not in fids):
                    continue
                off = int(d.get("offset", -1))
                if off > found.get(fid, -1):
                    found[fid] = off
            if tp in todo and consumer.position(tp) >= todo[tp]:
                del todo[tp]
        if not batch:
            for tp in list(todo):
                if consumer.position(tp) >= todo[tp]:
                    del todo[tp]
    if seen >= max_records:
        log.warning("reconciliation stopped after %d records; some lines may be shipped twice", seen)
    log.info("reconciled %d records after a crash: %d files had lines past the checkpoint", seen, len(found))
    return found
