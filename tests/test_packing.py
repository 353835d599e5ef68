"""producers/packing.py: records become one message per partition and poll, keys keep their partition and order."""

from __future__ import annotations

import orjson
from kafka.errors import KafkaTimeoutError
from rankwatch.producers.packing import PartitionMap, key_partition, pack_messages


def rec(key: str, i: int) -> tuple[str, bytes, bytes, bool]:
    return "ops", key.encode(), orjson.dumps({"key": key, "i": i}), True


def values(msg) -> list[dict]:
    d = orjson.loads(msg[2])
    return d if isinstance(d, list) else [d]


def test_records_of_one_partition_share_a_message_in_read_order():
    items = [rec(f"job/{r}/s{st}", i) for i in range(3) for r in range(8) for st in range(4)]
    items.insert(5, ("deadletter", b"job/1", b'{"reason": "bad"}', False))
    parts = list(range(8))
    msgs = pack_messages(items, lambda _t, key: key_partition(key, parts))
    dead = [m for m in msgs if m[0] == "deadletter"]
    assert dead == [("deadletter", b"job/1", b'{"reason": "bad"}', None)]
    packs = [m for m in msgs if m[0] == "ops"]
    assert len(packs) == len({key_partition(k, parts) for _, k, _, is_record in items if is_record}) < 32
    seen: dict[str, list[int]] = {}
    for msg in packs:
        _topic, key, _value, part = msg
        members = values(msg)
        assert {key_partition(m["key"].encode(), parts) for m in members} == {part}
        assert key == (members[0]["key"].encode() if len({m["key"] for m in members}) == 1 else None)
        for m in members:
            seen.setdefault(m["key"], []).append(m["i"])
    assert len(seen) == 32 and all(v == [0, 1, 2] for v in seen.values())


def test_packs_respect_the_size_limit_and_unknown_partitions_pack_by_key():
    items = [rec("a/0", i) for i in range(50)] + [rec("a/1", i) for i in range(3)]
    msgs = pack_messages(items, lambda _t, _k: None, limit=200)
    assert all(len(m[2]) <= 200 for m in msgs) and len(msgs) > 2
    assert all(m[3] is None and m[1] in (b"a/0", b"a/1") for m in msgs)
    assert [x["i"] for m in msgs if m[1] == b"a/0" for x in values(m)] == list(range(50))
    assert [x["i"] for m in msgs if m[1] == b"a/1" for x in values(m)] == [0, 1, 2]


def test_partition_map_falls_back_while_metadata_is_missing_and_follows_added_partitions():
    now = [0.0]
    answers: list = [KafkaTimeoutError("no metadata"), {0, 1}, {0, 1, 2, 3}]

    def partitions_for(_topic):
        a = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(a, Exception):
            raise a
        return a

    pm = PartitionMap(partitions_for, refresh_s=60, clock=lambda: now[0])
    assert pm("ops", b"k") is None  # broker away: pack by key, Kafka partitions as usual
    assert pm("ops", b"k") == key_partition(b"k", [0, 1])
    now[0] = 61.0
    assert pm("ops", b"k") == key_partition(b"k", [0, 1, 2, 3])



def test_op_records_are_keyed_by_rank_group_so_a_nodes_read_is_one_message():
    """A node's 8 ranks x 4 streams are 32 rank/stream keys; keyed by rank group (rank_group_key) they share one
    partition, so one read of them is one message, and each rank/stream still has one partition whichever
    shipper reads it (the group is a function of the rank alone)."""
    from rankwatch.producers.packing import rank_group_key

    assert rank_group_key("j", 13, 8) == b"j/ranks8-15" == rank_group_key("j", 8, 8)
    assert rank_group_key("j", 13, 0) is None and rank_group_key("j", None, 8) is None  # the record's own key
    assert rank_group_key("j", 13, 1) == b"j/ranks13-13"
    parts = list(range(8))
    for group, most in ((8, 1), (0, 8)):
        items = [("ops", rank_group_key("job", r, group) or f"job/{r}/s{st}".encode(),
                  orjson.dumps({"key": f"job/{r}/s{st}", "i": i}), True)
                 for i in range(3) for r in range(8, 16) for st in range(4)]
        msgs = pack_messages(items, lambda _t, key: key_partition(key, parts))
        assert 1 <= len(msgs) <= most and (group == 0 or len(msgs) == 1)
        seen: dict[str, list[int]] = {}
        for msg in msgs:
            for m in values(msg):
                seen.setdefault(m["key"], []).append(m["i"])
        assert len(seen) == 32 and all(v == [0, 1, 2] for v in seen.values())  # all there, each in order
