"""How many op records/s one real worker process judges end to end: Kafka fetch, Faust, decode, both stages,
the summaries' round trip through their topic, metrics.

    python bench/bench_worker_capacity.py [--rate 50000] [--cycle 0.25] [--steps 100] [--steady 0.5] [--profile FILE]

A healthy 1,024-rank x 4-stream synchronous job's op records (bench_op_latency.load_ops) are written to the ops
topic of an embedded broker first, packed as 128 node shippers reading every `--cycle` seconds would pack them at
`--rate` records/s of event time (one message per node, read and partition: producers/packing.py), so records per
message are what such a job gives. Then one worker starts and reads the backlog; its capacity is the records it
judged over the time between its first and last hundredth of them (its group join and start excluded), from its
own /metrics, and again from `--steady` (half) of them on: a new job's first minute also pays for the shared
LSTM's first training rounds (op_train_budget), which later minutes do not. Nothing else runs meanwhile: no load generator and no shipper share the cores, only the broker
serving fetches. `--profile FILE` samples the worker with py-spy (if installed) into FILE (collapsed stacks).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_op_latency import LOAD_OPS, LOAD_RANKS, LOAD_STREAMS, load_ops  # noqa: E402

from rankwatch.broker import EmbeddedBroker, die_with_parent, ensure_topics, free_port, stop_process  # noqa: E402
from rankwatch.config import Settings  # noqa: E402
from rankwatch.stream_eval import events_processed  # noqa: E402


def preload(s: Settings, rate: float, cycle_s: float, steps: int, shippers: int, group_ranks: int
            ) -> tuple[int, int]:
    """Write `steps` steps of the load job as shippers reading every `cycle_s` would ship them at `rate` records/s
    (event time in the past: the backlog of a worker that starts late), keyed as the shipper keys op records
    (`group_ranks`: producers/packing.py rank_group_key). Returns (records, messages)."""
    from kafka import KafkaProducer
    from rankwatch.producers.packing import key_partition, pack_messages, rank_group_key

    producer = KafkaProducer(**s.kafka_kwargs(), linger_ms=20, batch_size=1024 * 1024, acks=1)
    parts = sorted(producer.partitions_for(s.topic_ops))
    ranks_per_node = max(1, LOAD_RANKS // shippers)
    step_s = LOAD_RANKS * LOAD_STREAMS * LOAD_OPS / rate
    t0 = time.time() - steps * step_s - 60.0
    rng = np.random.default_rng(0)
    ops = sorted((op for k in range(steps) for op in load_ops(k, t0 + k * step_s, step_s, rng)), key=lambda o: o[0])
    records = messages = 0
    i = 0
    read_at = t0 + cycle_s
    while i < len(ops):
        by_node: dict[int, list] = {}
        while i < len(ops) and ops[i][0] <= read_at:
            _ts, r, key, value = ops[i]
            key = rank_group_key("load-job", r, group_ranks) or key
            by_node.setdefault(r // ranks_per_node, []).append((s.topic_ops, key, value, True))
            i += 1
        for items in by_node.values():
            records += len(items)
            for topic, key, value, part in pack_messages(items, lambda _t, k: key_partition(k, parts)):
                producer.send(topic, key=key, value=value, partition=part)
                messages += 1
        read_at += cycle_s
    producer.flush()
    producer.close()
    return records, messages


def stat_cpu_s(path: str) -> float:
    """User + system CPU seconds from a /proc stat file (a process's or one of its threads')."""
    with open(path) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds per thread of `pid` (the main thread's id is the pid)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = stat_cpu_s(f"/proc/{pid}/task/{tid}/stat")
        except OSError:  # the thread ended meanwhile
            continue
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=50_000.0, help="event-time records/s the shippers saw")
    ap.add_argument("--cycle", type=float, default=0.25, help="seconds between a shipper's reads")
    ap.add_argument("--steps", type=int, default=100, help="steps of the 1,024 x 4 job (12,288 records each)")
    ap.add_argument("--shippers", type=int, default=128)
    ap.add_argument("--op-group-ranks", type=int, default=8,
                    help="the shipper's op_group_ranks: op records keyed by groups of this many ranks (0: per "
                         "rank/stream, as shippers did before)")
    ap.add_argument("--predictor", choices=["auto", "seasonal", "lstm"], default="auto",
                    help="op_predictor of the worker (auto: the LSTM judges this load once it predicts it better)")
    ap.add_argument("--steady", type=float, default=0.5,
                    help="second figure from this fraction of the backlog on: past the LSTM's first training "
                         "rounds (its budget), which the first minute of a job pays once")
    ap.add_argument("--profile", help="py-spy collapsed stacks of the worker from --steady on")
    ap.add_argument("--timeout", type=float, default=300.0)
    a = ap.parse_args()
    broker = EmbeddedBroker(port=free_port()).start()
    worker = None
    try:
        s = Settings(bootstrap=broker.bootstrap, app_id=f"capacity-{int(time.time())}")
        s.use_topic_prefix(s.app_id)
        ensure_topics(s)
        t = time.time()
        records, messages = preload(s, a.rate, a.cycle, a.steps, a.shippers, a.op_group_ranks)
        print(f"preloaded {records:,} op records in {messages:,} messages ({records / messages:.1f} per message) "
              f"in {time.time() - t:.0f} s")
        port = free_port()
        worker = subprocess.Popen([sys.executable, "-m", "rankwatch.cli", "worker", "--embedded", "--metrics-port",
                                   str(port)], env={**os.environ, **s.env(), "RANKWATCH_OP_PREDICTOR": a.predictor}, preexec_fn=die_with_parent,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spy = None
        marks: list[tuple[float, float, float, dict[int, float]]] = []  # wall, records judged, CPU s, per thread
        deadline = time.time() + a.timeout
        while time.time() < deadline:
            time.sleep(0.25)
            try:
                n = events_processed(port, ("op",))
            except OSError:
                continue
            marks.append((time.time(), n, stat_cpu_s(f"/proc/{worker.pid}/stat"), thread_cpu_s(worker.pid)))
            if spy is None and a.profile and n > a.steady * records and shutil.which("py-spy"):
                spy = subprocess.Popen(["py-spy", "record", "-p", str(worker.pid), "-d", "20", "-r", "100", "-f",
                                        "raw", "-o", a.profile, "--nonblocking"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            if n >= records:
                break
        if spy is not None:
            spy.wait(60)
    finally:
        if worker is not None:
            stop_process(worker, 15)
        broker.stop()
    if not marks or marks[-1][1] < 0.99 * records:
        print(f"the worker judged {marks[-1][1] if marks else 0:,.0f} of {records:,} records within {a.timeout} s")
        return 1
    print(f"{records / messages:.1f} records per message (rate {a.rate:,.0f}/s, reads every {a.cycle} s, "
          f"op_group_ranks {a.op_group_ranks}), op_predictor {a.predictor}")
    for name, start in (("whole backlog", 0.01), (f"from {a.steady:.0%} on", a.steady)):
        report(name, marks, start * records, 0.99 * records, worker.pid)
    return 0


def report(name: str, marks: list[tuple[float, float, float, dict[int, float]]], first: float, last: float,
           pid: int) -> None:
    """Records/s, cores busy and CPU per record between the marks where `first` and `last` records were judged."""
    lo = next(m for m in marks if m[1] >= first)
    hi = next(m for m in marks if m[1] >= last)
    if hi[0] <= lo[0]:
        print(f"{name}: too few marks")
        return
    n = hi[1] - lo[1]
    wall, cpu = hi[0] - lo[0], hi[2] - lo[2]
    busy = sorted(((hi[3].get(t, 0.0) - lo[3].get(t, 0.0)) / wall, t) for t in hi[3])[::-1]
    main_share = next((b for b, t in busy if t == pid), 0.0)
    others = ", ".join(f"{b:.2f}" for b, t in busy if t != pid and b >= 0.01)
    print(f"{name}: {n / wall:,.0f} op records/s end to end ({n:,.0f} in {wall:.1f} s), {cpu / wall:.2f} cores "
          f"busy, {1e6 * cpu / n:.0f} us of worker CPU per record; per thread: main {main_share:.2f}, "
          f"others {others or '-'}")


if __name__ == "__main__":
    sys.exit(main())
