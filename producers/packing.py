"""How a shipper's records become Kafka messages: one message per topic partition and poll, not per key.

The worker pays a fixed cost per Kafka message (Faust's per-event machinery, ~100-200 us), several times what
judging one record costs. A node's shipper tails 8 ranks' files; collective-op records are keyed by
job/rank/stream, so one poll touches ~32 keys but at most `partitions` partitions. Records bound for one
partition (the one Kafka's default partitioner gives their key, so every key still lands where it always would,
in order) therefore travel as one JSON array: 4x fewer messages per poll at 8 partitions, which is what lets a
worker keep up with many shippers (docs/PERFORMANCE.md). A pack's message key is its records' key when they
share one, else empty: consumers take each record's identity from the record, never from the message key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka.errors import KafkaError
from kafka.partitioner.default import murmur2

from rankwatch.records import encode_pack

log = logging.getLogger("rankwatch.producer")

Message = tuple[str, bytes | None, bytes, int | None]  # topic, key, value, partition (None: by key)


def rank_group_key(job: str, rank: int | None, group_ranks: int) -> bytes | None:
    """The Kafka key of a collective-op record: its ranks' group, `job/ranks<first>-<last>` for `group_ranks`
    consecutive ranks (a node's GPUs at the default 8), so a node's op records share one partition and a
    shipper's read of them travels as one message, not one per partition its 32 rank/stream keys hash to.
    Every rank/stream key still lands on one partition, in order (what per-key state needs), whichever shipper
    reads it: the group is a function of the rank alone. None (`group_ranks` 0, or no rank): the record keeps its
    own key, `Record.key()`."""
    if group_ranks <= 0 or rank is None:
        return None
    first = rank - rank % group_ranks
    return f"{job}/ranks{first}-{first + group_ranks - 1}".encode()


def key_partition(key: bytes, partitions: list[int]) -> int:
    """The partition Kafka's default partitioner (Java and kafka-python alike) gives a non-empty key."""
    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]


class PartitionMap:
    """key -> partition per topic, from the producer's metadata, refreshed every `refresh_s` so that partitions
    added to a topic are used as the default partitioner would. Without metadata (broker away) it answers None
    and the records are packed per key instead, sent with Kafka's own partitioning: the same partition."""

    def __init__(self, partitions_for: Callable[[str], set[int] | None], refresh_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.partitions_for = partitions_for
        self.refresh_s = refresh_s
        self.clock = clock
        self._topics: dict[str, tuple[float, list[int]]] = {}
        self._keys: dict[tuple[str, bytes], int] = {}

    def __call__(self, topic: str, key: bytes) -> int | None:
        now = self.clock()
        known = self._topics.get(topic)
        if known is None or now - known[0] > self.refresh_s:
            try:
                parts = sorted(self.partitions_for(topic) or ())
            except KafkaError as exc:
                log.debug("no partition metadata for %s (%s): packing by key", topic, exc)
                parts = []
            if not parts:
                return None
            if known is not None and known[1] != parts:
                self._keys.clear()
            known = self._topics[topic] = (now, parts)
        part = self._keys.get((topic, key))
        if part is None:
            if len(self._keys) > 100_000:  # keys of files long gone
                self._keys.clear()
            part = self._keys[(topic, key)] = key_partition(key, known[1])
        return part


@dataclass
class _Pack:
    topic: str
    key: bytes | None
    partition: int | None
    values: list[bytes] = field(default_factory=list)
    size: int = 1  # bytes of the JSON array: '[' now, then each member and its ',' or ']'

    def add(self, key: bytes, value: bytes) -> None:
        if self.values and key != self.key:
            self.key = None  # records of several keys
        self.values.append(value)
        self.size += len(value) + 1

    def message(self) -> Message:
        value = self.values[0] if len(self.values) == 1 else encode_pack(self.values)
        return self.topic, self.key, value, self.partition


def pack_messages(items: list[tuple[str, bytes, bytes, bool]], partition_of: Callable[[str, bytes], int | None],
                  limit: int = 256 * 1024) -> list[Message]:
    """(topic, key, value, is_record) in read order -> messages. Records of one partition (per key where the
    partition is unknown) share a message of at most `limit` bytes, in their order, so each key's order holds.
    Dead letters (is_record False) stay single messages, keyed as given."""
    out: list[_Pack | Message] = []
    open_packs: dict[tuple[str, int | bytes], _Pack] = {}
    for topic, key, value, is_record in items:
        if not is_record:
            out.append((topic, key, value, None))
            continue
        part = partition_of(topic, key)
        slot = (topic, key if part is None else part)
        pack = open_packs.get(slot)
        if pack is None or pack.size + len(value) + 1 > limit:
            pack = open_packs[slot] = _Pack(topic, key, part)
            out.append(pack)
        pack.add(key, value)
    return [m.message() if isinstance(m, _Pack) else m for m in out]
