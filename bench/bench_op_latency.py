"""Detection latency of collective-timing findings, line written -> anomaly on the topic, live.

    python bench/bench_op_latency.py [--ranks 16] [--steps 160] [--speed 1.0] [--load 20000]

A simulated job (rankwatch/sim_collectives.py) with stragglers and slow streams is written in real time (x
`--speed`) into rank files; the real shipper tails them, the embedded broker and a real worker judge them. For
each straggler and op-timing anomaly, the latency is the wall time from writing its source line (the late op that
decided it) to reading the anomaly from the `anomalies` topic. Prints p50/p99/max and the load (records/s).

`--load R` adds a second, healthy job of 1,024 ranks x 4 streams whose op records a separate process sends
straight to the ops topic at R records/s (event time = wall time), shipped as `--shippers` node shippers (8 ranks
each) would: every `--cycle` seconds each ships what its ranks enqueued since its last read, keyed by rank group
and packed per partition as the shipper does (producers/packing.py; `--packing partition`: keyed per rank/stream
and packed per partition, as shippers did before op_group_ranks; `--packing key`: one message per key). So the worker judges the
measured job while it carries that load. The worker's consumed rate is printed from its metrics, with the
messages/s it was sent: if it falls behind R, the latency says so.
`RW_PROFILE=FILE` runs the worker under cProfile, its profile written to FILE when it stops.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rankwatch.producers.shipper import Shipper, ShipperConfig

from rankwatch.broker import EmbeddedBroker, die_with_parent, ensure_topics, free_port, stop_process
from rankwatch.config import Settings
from rankwatch.consume import follow_anomalies
from rankwatch.simulate import Fault, Scenario, job_lines
from rankwatch.stream_eval import events_processed

LOAD_RANKS, LOAD_STREAMS, LOAD_OPS = 1024, 4, 3  # the load job: ops per rank/stream and step


def load_ops(step: int, t0: float, step_s: float, rng: np.random.Generator) -> list[tuple[float, int, bytes, bytes]]:
    """One step of the load job: (enqueue time, rank, key, encoded record) of every rank/stream's ops."""
    out = []
    noise = rng.normal(0, 2e-3, (LOAD_RANKS, LOAD_STREAMS, LOAD_OPS))
    for r in range(LOAD_RANKS):
        for st in range(LOAD_STREAMS):
            key = f"load-job/{r}/0xs{st}".encode()
            for k in range(LOAD_OPS):
                ts = round(t0 + step_s * (k + 1) / (LOAD_OPS + 1) + 0.01 * st + float(noise[r, st, k]), 6)
                out.append((ts, r, key, orjson.dumps({
                    "kind": "op", "job": "load-job", "rank": r, "ts": ts, "file": f"rank{r}/nccl.log",
                    "offset": step * 1000 + st * 10 + k,
                    "data": {"op": "AllReduce", "op_count": step * LOAD_OPS + k, "stream": f"0xs{st}",
                             "comm": f"0xc{r}{st}", "comm_id": f"0xid{st}", "nranks": LOAD_RANKS, "count": 1024}})))
    return out


def send_load(s: Settings, rate: float, stop: Any, shippers: int, cycle_s: float, packing: str,
              sent: Any) -> None:
    """A healthy synchronous job at `rate` op records/s, shipped as `shippers` node shippers would: each ships,
    every `cycle_s`, what its ranks enqueued since its last read, keyed and packed as `packing` says (see module),
    until stop. `sent` counts the messages."""
    from kafka import KafkaProducer
    from rankwatch.producers.packing import key_partition, pack_messages, rank_group_key

    producer = KafkaProducer(**s.kafka_kwargs(), linger_ms=5, batch_size=256 * 1024, acks=1)
    parts = sorted(producer.partitions_for(s.topic_ops))
    # kafka-python's murmur2 is pure Python (~4 us a key): cached per key
    partition_of = functools.lru_cache(maxsize=None)(
        (lambda _t, key: key_partition(key, parts)) if packing != "key" else (lambda _t, _k: None))
    ranks_per_node = max(1, LOAD_RANKS // shippers)
    step_s = LOAD_RANKS * LOAD_STREAMS * LOAD_OPS / rate
    rng = np.random.default_rng(0)
    t_start = time.time()
    step, pending = 0, []
    while not stop.is_set():
        time.sleep(max(0.0, cycle_s - (time.time() - t_start) % cycle_s))
        now = time.time()
        while t_start + step * step_s <= now:
            pending.extend(load_ops(step, t_start + step * step_s, step_s, rng))
            step += 1
        due = [op for op in pending if op[0] <= now]
        pending = [op for op in pending if op[0] > now]
        by_node: dict[int, list] = {}
        for _ts, r, key, value in sorted(due, key=lambda op: op[0]):
            if packing == "group":
                key = rank_group_key("load-job", r, 8) or key
            by_node.setdefault(r // ranks_per_node, []).append((s.topic_ops, key, value, True))
        for items in by_node.values():
            for topic, key, value, part in pack_messages(items, partition_of):
                producer.send(topic, key=key, value=value, partition=part)
                sent.value += 1
    producer.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=16)
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--speed", type=float, default=1.0)
    ap.add_argument("--load", type=float, default=0.0, help="op records/s of a second, healthy job (see module)")
    ap.add_argument("--shippers", type=int, default=128, help="node shippers of the load job (8 ranks each)")
    ap.add_argument("--cycle", type=float, default=0.1, help="seconds between a load shipper's reads")
    ap.add_argument("--packing", choices=("group", "partition", "key"), default="group",
                    help="the load shippers' messages: keyed by rank group, per partition and read (today), keyed "
                         "by rank/stream per partition and read, or per key (before)")
    a = ap.parse_args()
    faults = [Fault("straggler", 3, 50, 30, 0.2), Fault("slow_stream", 9 % a.ranks, 110, 14, 2.5, stream="tp"),
              Fault("straggler", 12 % a.ranks, 135, 20, 0.3)]
    sc = Scenario(ranks=a.ranks, steps=a.steps, seed=4, faults=faults)
    lines = job_lines(sc)
    root = Path(tempfile.mkdtemp(prefix="rankwatch-latency-")) / "latency-job"
    broker = EmbeddedBroker(port=free_port()).start()
    s = Settings(bootstrap=broker.bootstrap, app_id=f"latency-{int(time.time())}")
    s.use_topic_prefix(s.app_id)
    ensure_topics(s)
    port = free_port()
    prof = ["-m", "cProfile", "-o", os.environ["RW_PROFILE"]] if os.environ.get("RW_PROFILE") else []
    worker = subprocess.Popen([sys.executable, *prof, "-m", "rankwatch.cli", "worker", "--embedded", "--metrics-port",
                               str(port)], env={**os.environ, **s.env()}, preexec_fn=die_with_parent,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root.mkdir(parents=True)
    shipper = Shipper([str(root)], s, ShipperConfig(checkpoint=str(root.parent / "c.json"), metrics_port=0,
                                                    poll_interval_s=0.02))
    threading.Thread(target=shipper.run, daemon=True).start()
    written: dict[tuple[str, int], float] = {}
    seen: list[tuple[dict, float]] = []

    def consume() -> None:
        for rec in follow_anomalies(s, follow=True, from_beginning=False, poll_ms=20):
            seen.append((rec, time.time()))

    threading.Thread(target=consume, daemon=True).start()
    time.sleep(8.0)  # the worker joins its group (embedded broker: ~5 s)
    consumed = ""
    stop_load = mp.get_context("spawn").Event()
    sent = mp.get_context("spawn").Value("q", 0, lock=False)
    loader = None
    if a.load > 0:
        loader = mp.get_context("spawn").Process(target=send_load, daemon=True, args=(
            s, a.load, stop_load, a.shippers, a.cycle, a.packing, sent))
        loader.start()
        time.sleep(10.0)  # the load job's keys warm up before the measured job starts
    handles: dict[str, object] = {}
    sizes: dict[str, int] = {}
    t0_event, t0_wall = lines[0][0], time.monotonic()
    ops_before, sent_before = events_processed(port, ("op",)), sent.value
    try:
        for ts, rel, text in lines:
            due = (ts - t0_event) / a.speed - (time.monotonic() - t0_wall)
            if due > 0.002:
                for fh in handles.values():
                    fh.flush()
                time.sleep(due)
            path = str(root / rel)
            fh = handles.get(path)
            if fh is None:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fh = handles[path] = open(path, "a", encoding="utf-8")  # noqa: SIM115
                sizes[path] = 0
            data = text + "\n"
            fh.write(data)
            written[(path, sizes[path])] = time.time()  # flushed within the next pacing sleep (< 2 ms later)
            sizes[path] += len(data.encode())
        for fh in handles.values():
            fh.flush()
        wall = time.monotonic() - t0_wall
        ops_during = events_processed(port, ("op",)) - ops_before
        consumed = (f"{ops_during / wall:,.0f} op records/s while the measured job ran; the load came in "
                    f"{(sent.value - sent_before) / wall:,.0f} messages/s")
        time.sleep(15.0)
    finally:
        stop_load.set()
        if loader is not None:
            loader.join(10)
        for fh in handles.values():
            fh.close()
        shipper.stop_event.set()
        stop_process(worker, 15)
        broker.stop()
    timed = [(r, arrived - written[(r["source"]["file"], r["source"]["offset"])]) for r, arrived in seen
             if r["detector"] in ("straggler", "op_timing") and (r["source"]["file"], r["source"]["offset"]) in written]
    lat = [t for _, t in timed]
    found = sorted({(r["detector"], r["rank"]) for r, _ in seen if r["detector"] in ("straggler", "op_timing")})
    for r, t in timed:
        print(f"  {r['detector']:9} rank {r['rank']:>3}: {t * 1000:5.0f} ms")
    print(f"{a.ranks} ranks, {len(lines):,} lines in {wall:.0f} s ({len(lines) / wall:,.0f} lines/s, "
          f"x{a.speed} real time); findings {found}")
    if a.load:
        print(f"load: a 1,024-rank job at {a.load:,.0f} op records/s from {a.shippers} shippers reading every "
              f"{a.cycle} s, packing {a.packing}; worker consumed {consumed}")
    if lat:
        print(f"line written -> anomaly read: p50 {np.percentile(lat, 50) * 1000:.0f} ms, "
              f"p99 {np.percentile(lat, 99) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms over {len(lat)} findings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
