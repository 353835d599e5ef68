"""After a crash, find which lines already reached the broker, so a restart duplicates none.

The checkpoint records, per topic partition, the offset just past the shipper's last acknowledged record.
Everything this shipper could have sent since then lies after those offsets, so reading forward from them to
the log end and keeping the records whose file identity is ours gives, per file, exactly which lines arrived.
(Which, not how far: a broker may keep a later in-flight request of a killed client and lose an earlier one.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import orjson
from kafka import KafkaConsumer, TopicPartition

from rankwatch.consume import drain

log = logging.getLogger(__name__)


def tp_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def end_positions(consumer: KafkaConsumer, topics: Iterable[str]) -> dict[str, int]:
    """Log-end offsets as ListOffsets reports them. Only a lower bound is needed (the scan starts there), so
    a broker that under-reports (Tansu) costs a slightly longer scan, never a missed record."""
    tps = []
    for topic in topics:
        parts = consumer.partitions_for_topic(topic) or set()
        tps.extend(TopicPartition(topic, p) for p in parts)
    if not tps:
        return {}
    return {tp_key(tp.topic, tp.partition): off for tp, off in consumer.end_offsets(tps).items()}


def shipped_since(consumer: KafkaConsumer, positions: dict[str, int], fids: set[str] | None,
                  fid_prefix: str, max_records: int = 5_000_000) -> dict[str, set[int]]:
    """fid -> start offsets of this shipper's lines found after `positions`."""
    tps = []
    for key, off in positions.items():
        topic, _, part = key.rpartition(":")
        tps.append((TopicPartition(topic, int(part)), off))
    if not tps:
        return {}
    consumer.assign([tp for tp, _ in tps])
    for tp, off in tps:
        consumer.seek(tp, off)
    found: dict[str, set[int]] = {}
    seen = 0
    for m in drain(consumer, [tp for tp, _ in tps], max_records=max_records):
        seen += 1
        try:
            d = orjson.loads(m.value)
        except orjson.JSONDecodeError:
            continue
        for item in d if isinstance(d, list) else [d]:  # a pack of records, or one record / dead letter
            fid = item.get("fid") if isinstance(item, dict) else None
            if not fid or not fid.startswith(fid_prefix) or (fids is not None and fid not in fids):
                continue
            found.setdefault(fid, set()).add(int(item.get("offset", -1)))
    if seen >= max_records:
        log.warning("reconciliation stopped after %d records; some lines may be shipped twice", seen)
    log.info("reconciled %d records after a crash: %d files had lines past the checkpoint", seen, len(found))
    return found
