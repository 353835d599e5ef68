"""The shipper against a real broker: crash-restart, broker outage, dead letters."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

from prometheus_client import generate_latest
from rankwatch.producers.shipper import Shipper, ShipperConfig

from rankwatch.broker import EmbeddedBroker

from .conftest import make_settings, read_topic, settings_env


def shipped_lines(s, topics=("topic_logs", "topic_metrics")) -> Counter:
    c: Counter = Counter()
    for t in topics:
        for rec in read_topic(s, getattr(s, t)):
            if rec["kind"] == "log":
                c[rec["data"]["raw"]] += 1
            else:
                c[f'metrics {rec["data"]["step"]}'] += 1
    return c


def writer(path, n, delay=0.0, rotate_at=None):
    with open(path, "a") as fh:
        for i in range(n):
            if rotate_at and i == rotate_at:
                fh.close()
                os.rename(path, str(path) + ".1")
                fh = open(path, "a")  # noqa: SIM115
            if i % 10 == 0:
                fh.write(f'{{"step": {i}, "loss": 1.0}}\n')
            else:
                fh.write(f"line {i:06d} payload {'x' * (i % 50)}\n")
            if delay and i % 100 == 0:
                fh.flush()
                time.sleep(delay)
    return n


def expected_lines(n):
    return Counter(f"metrics {i}" if i % 10 == 0 else f"line {i:06d} payload {'x' * (i % 50)}" for i in range(n))


def test_sigkill_restarts_lose_nothing_and_duplicate_nothing(broker, tmp_path):
    s = make_settings(broker.bootstrap)
    logdir = tmp_path / "job"
    logdir.mkdir()
    ckpt = tmp_path / "ckpt.json"
    n = 30000
    t = threading.Thread(target=writer, args=(logdir / "rank0.log", n, 0.01, 15000))
    t.start()
    cmd = [sys.executable, "-m", "rankwatch.producers.shipper", "--tail", str(logdir), "--checkpoint", str(ckpt),
           "--metrics-port", "0"]
    rng = random.Random(5)
    kills = 0
    for _ in range(6):
        p = subprocess.Popen(cmd, env=settings_env(s), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 2.5))  # start-up takes ~0.8 s: kills land before, during and after batches
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    t.join()
    p = subprocess.run(cmd + ["--once"], env=settings_env(s), capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    got = shipped_lines(s)
    want = expected_lines(n)
    missing = want - got
    dups = {k: v for k, v in got.items() if v > 1}
    assert kills == 6
    assert not missing, f"{sum(missing.values())} lines lost, e.g. {list(missing)[:3]}"
    assert not dups, f"{len(dups)} lines duplicated, e.g. {list(dups.items())[:3]}"
    assert sum(got.values()) == n


def test_broker_paused_20s_while_shipping_loses_nothing(tmp_path):
    with EmbeddedBroker() as b:
        s = make_settings(b.bootstrap)
        logdir = tmp_path / "job"
        logdir.mkdir()
        sh = Shipper([str(logdir)], s, ShipperConfig(checkpoint=str(tmp_path / "c.json"), metrics_port=0,
                                                       stall_report_s=1.0))
        th = threading.Thread(target=sh.run, daemon=True)
        th.start()
        n = 8000
        wt = threading.Thread(target=writer, args=(logdir / "a.log", n, 0.05))
        wt.start()
        time.sleep(1.0)
        b.pause()
        stalled_seen = False
        t_end = time.monotonic() + 20
        while time.monotonic() < t_end:
            stalled_seen |= sh.metrics.stalled._value.get() == 1
            time.sleep(0.5)
        b.resume()
        wt.join()
        deadline = time.monotonic() + 90
        while sh.shipped_total < n and time.monotonic() < deadline:
            time.sleep(0.5)
        sh.stop_event.set()
        th.join(30)
        sh.close()
        assert stalled_seen, "the shipper never reported being stalled"
        assert sh.metrics.stalled._value.get() == 0
        got = shipped_lines(s)
        assert got == expected_lines(n)
        text = generate_latest(sh.registry).decode()
        assert 'rankwatch_shipper_lines_total{kind="log"} 7200.0' in text


def test_malformed_lines_are_dead_lettered_counted_and_shipping_continues(broker, tmp_path):
    s = make_settings(broker.bootstrap)
    logdir = tmp_path / "job"
    (logdir / "rank2").mkdir(parents=True)
    with open(logdir / "rank2" / "out.log", "wb") as fh:
        fh.write(b'{"step": 1, "loss": 0.5}\n{"step": "one", "loss": 0.5}\n{"loss": 1}\n{broken json}\n'
                 b'\xff\xfe not utf8\n' + b"L" * 70000 + b"\n" + b'{"step": 2, "loss": 0.4}\n')
    sh = Shipper([str(logdir)], s, ShipperConfig(checkpoint=str(tmp_path / "c.json"), metrics_port=0))
    assert sh.run_until_idle(0.5) == 7
    sh.close()
    dl = read_topic(s, s.topic_deadletter)
    assert len(dl) == 2  # "{broken json}" claims no format (neither JSON nor a dict): a message (issue 6)
    first = len(b'{"step": 1, "loss": 0.5}\n')
    second = first + len(b'{"step": "one", "loss": 0.5}\n')
    assert {d["offset"] for d in dl} == {first, second}
    assert all(d["file"].endswith("out.log") and d["reason"] and d["job"] == "job" for d in dl)
    metrics = read_topic(s, s.topic_metrics)
    assert sorted(m["data"]["step"] for m in metrics) == [1, 2] and all(m["rank"] == 2 for m in metrics)
    logs = read_topic(s, s.topic_logs)
    assert any(r["data"]["msg"] == "{broken json}" for r in logs)
    assert any("\ufffd" in r["data"]["raw"] for r in logs)
    assert any(len(r["data"]["raw"]) == 65536 for r in logs)
    text = generate_latest(sh.registry).decode()
    assert "rankwatch_shipper_parse_errors_total" in text and "rankwatch_shipper_truncated_lines_total 1.0" in text
    assert "rankwatch_shipper_rotations_total 0.0" in text


def test_records_of_one_partition_share_a_message_and_each_key_keeps_its_partition(broker, tmp_path):
    """Packing per partition (producers/packing.py) must put every record where Kafka's own partitioner puts
    its key, or a key's records would split across workers; and it must cut the messages a poll sends."""
    from kafka import KafkaProducer
    from rankwatch.producers.packing import key_partition

    s = make_settings(broker.bootstrap)
    logdir = tmp_path / "packjob"
    ranks = 24
    for r in range(ranks):
        (logdir / f"rank{r}").mkdir(parents=True)
        with open(logdir / f"rank{r}" / "train.log", "w") as fh:
            fh.writelines(f'{{"step": {i}, "loss": {1.0 + r / 100}}}\n' for i in range(20))
    sh = Shipper([str(logdir)], s, ShipperConfig(checkpoint=str(tmp_path / "c.json"), metrics_port=0))
    assert sh.run_until_idle(0.5) == ranks * 20
    sh.close()
    msgs, steps, where = shipped_by_key(s, s.topic_metrics, "step")
    assert len(steps) == ranks and all(v == list(range(20)) for v in steps.values())  # all there, in order
    assert len(msgs) <= s.partitions < ranks  # one read of 24 ranks' files: a message per partition
    probe = KafkaProducer(**s.kafka_kwargs())
    parts = sorted(probe.partitions_for(s.topic_metrics))
    for key, found in where.items():
        kafka_says = probe.send(s.topic_metrics, key=key.encode(), value=b"{}").get(timeout=30).partition
        assert found == {key_partition(key.encode(), parts)} == {kafka_says}, key
    probe.close()


def test_op_records_of_a_rank_group_share_a_partition_and_each_rank_stream_keeps_its_order(broker, tmp_path):
    """The shipper keys collective-op records by rank group (rank_group_key, `op_group_ranks` 8): a read of a
    node's ranks is one message per group, not one per partition its rank/stream keys hash to, and each
    rank/stream's ops stay on one partition, in order, where Kafka's own partitioner puts the group key."""
    from kafka import KafkaProducer
    from rankwatch.producers.packing import rank_group_key

    s = make_settings(broker.bootstrap)
    logdir = tmp_path / "opjob"
    ranks, streams, ops = 16, 2, 12
    for r in range(ranks):
        (logdir / f"rank{r}").mkdir(parents=True)
        with open(logdir / f"rank{r}" / "nccl.log", "w") as fh:
            fh.writelines(f"node{r // 8}:100{r}:200{r} [{r % 8}] NCCL INFO AllReduce: opCount {n:x} sendbuff "
                          f"0x7f00 recvbuff 0x7f00 count 1024 datatype 7 op 0 root 0 comm 0x55{r:02d} "
                          f"[nranks={ranks}] stream 0x56{st}\n" for n in range(ops) for st in range(streams))
    sh = Shipper([str(logdir)], s, ShipperConfig(checkpoint=str(tmp_path / "c.json"), metrics_port=0))
    assert sh.run_until_idle(0.5) == ranks * streams * ops
    sh.close()
    msgs, counts, where = shipped_by_key(s, s.topic_ops, "op_count")
    assert all(len({rec.rank // 8 for rec in recs}) == 1 for recs in msgs)  # one rank group per message
    assert len(counts) == ranks * streams and all(v == list(range(ops)) for v in counts.values())
    assert len(msgs) <= 2 * 2  # two rank groups; the first read may stop inside a file
    probe = KafkaProducer(**s.kafka_kwargs())
    for key, found in where.items():
        rank = int(key.split("/")[1])
        group_key = rank_group_key("opjob", rank, 8)
        assert found == {probe.send(s.topic_ops, key=group_key, value=b"{}").get(timeout=30).partition}, key
    probe.close()


def shipped_by_key(s, topic: str, field: str) -> tuple[list[list], dict[str, list], dict[str, set[int]]]:
    """What the shipper sent to `topic`, decoded without errors: each message's records, each record key's
    `field` values in the order they arrived, and the partitions each key arrived on."""
    from rankwatch.consume import messages_from_beginning
    from rankwatch.records import decode_records

    per_message: list[list] = []
    values: dict[str, list] = {}
    where: dict[str, set[int]] = {}
    for m in messages_from_beginning(s, [topic]):
        recs, errors = decode_records(m.value)
        assert not errors
        per_message.append(recs)
        for rec in recs:
            values.setdefault(rec.key(), []).append(rec.data[field])
            where.setdefault(rec.key(), set()).add(m.partition)
    return per_message, values, where
