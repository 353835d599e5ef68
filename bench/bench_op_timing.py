"""Collective-op timing at scale: records/s per worker process, batched vs one key at a time, state per key,
shared vs per-key LSTM (quality and cost). docs/PERFORMANCE.md and docs/DETECTION.md record the figures.

    python bench/bench_op_timing.py --throughput [--ranks 1024 4096] [--ops 200000]
    python bench/bench_op_timing.py --memory [--ranks 4096]
    python bench/bench_op_timing.py --share [--seeds 6]

Throughput runs the worker's code path in process (decode excluded: see bench_shipper.py for the wire): op records
of R ranks x 4 streams, in micro-batches as the worker takes them, through both stages (per rank/stream model and
LSTM, then the job's cross-rank stage).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from rankwatch.models.op_timing import OpInput, OpTimingConfig, OpTimingDetector
from rankwatch.processors.op_stage import OpHandler
from rankwatch.processors.pipeline import DetectionConfig, Pipeline

from rankwatch.records import Record

STREAMS = 4


def synthetic_ops(ranks: int, steps: int, seed: int = 0) -> list[Record]:
    """R ranks x 4 streams of a synchronous job: 3 ops per stream and step, in enqueue order."""
    rng = np.random.default_rng(seed)
    out = []
    t = 1000.0
    for step in range(steps):
        jitter = rng.normal(0, 0.002, (ranks, STREAMS, 3))
        for k in range(3):
            for s in range(STREAMS):
                ts = t + 0.05 * (k + 1) + 0.01 * s
                for r in range(ranks):
                    out.append(Record("op", "bench", r, ts + jitter[r, s, k], f"rank{r}/nccl.log", len(out),
                                      {"op": "AllReduce", "op_count": step * 3 + k, "stream": f"0xs{s}",
                                       "comm": f"0xc{r}{s}", "comm_id": f"0xid{s}", "nranks": ranks,
                                       "count": 1024}))
        t += 0.5
    return out


WARM_STEPS = 50  # steps that warm every key up (not timed)


def warm_up(update: Callable[[list], object], items: list, det: OpTimingDetector, ranks: int,
            predictor: str) -> list:
    """Feed the warm-up steps in batches of 2,000, wait for the training round under way, and check that the
    predictor asked for judges; returns the items left to time."""
    warm = ranks * STREAMS * 3 * WARM_STEPS
    for i in range(0, warm, 2000):
        update(items[i:i + 2000])
    det.models["bench"].wait()
    if predictor == "lstm" and not det.lstm_active("bench"):
        raise SystemExit("the LSTM is not judging after the warm-up: this figure would not be the LSTM's")
    return items[warm:]


@contextmanager
def frozen_gc() -> Iterator[None]:
    """A worker holds one micro-batch of records at a time, this bench holds millions: without this, the
    collector's full passes over them (not the detector) would be a large part of what is timed."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def throughput(ranks: int, total_ops: int, batch: int, predictor: str = "auto") -> tuple[float, float]:
    """(records/s, of which stage 2's share) for micro-batches of `batch` records. predictor "lstm": the LSTM
    judges every op once trained (what a job costs after the LSTM has won); "auto": the default, where the
    seasonal reference judges these jobs and the LSTM scores 1 op in 4 per key."""
    steps = max(WARM_STEPS + 10, total_ops // (ranks * STREAMS * 3))
    # as the worker runs it (processors/app.py): training rounds on their thread
    p = Pipeline(DetectionConfig(op_predictor=predictor, op_background_training=True))
    timed = warm_up(p.process, synthetic_ops(ranks, steps), p.handler(OpHandler).detector, ranks, predictor)
    t_stage2 = 0.0
    with frozen_gc():
        t0 = time.perf_counter()
        for i in range(0, len(timed), batch):
            found, summaries = p.first_stage(timed[i:i + batch])
            t1 = time.perf_counter()
            p.second_stage(summaries)
            t_stage2 += time.perf_counter() - t1
        dt = time.perf_counter() - t0
    return len(timed) / dt, t_stage2 / dt


def per_key_rate(ranks: int, predictor: str = "lstm", n: int = 5000) -> tuple[float, float]:
    """Stage 1 alone, the LSTM judging every op: (records/s in micro-batches of 10,000, records/s one op per
    update, i.e. one forward pass per op, as a model per key without batching would run)."""
    det = OpTimingDetector(OpTimingConfig(op_predictor=predictor, op_background_training=True))
    timed = warm_up(det.update, [OpInput((r.job, r.rank, r.data["stream"]), r.ts, r.data["op_count"], r.data["comm"])
                                 for r in synthetic_ops(ranks, WARM_STEPS + 10)], det, ranks, predictor)
    with frozen_gc():
        t0 = time.perf_counter()
        for i in range(0, len(timed) - n, 10_000):
            det.update(timed[i:i + 10_000])
        batched = (len(timed) - n) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for it in timed[-n:]:
            det.update([it])
        one = n / (time.perf_counter() - t0)
    return batched, one


def memory_per_key(ranks: int) -> tuple[float, float]:
    """(bytes of stage-1 state per rank/stream key, bytes of the shared LSTM per job), by tracemalloc."""
    recs = synthetic_ops(ranks, 80)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    det = OpTimingDetector(OpTimingConfig(op_use_lstm=False))
    for i in range(0, len(recs), 4000):
        det.update([OpInput((r.job, r.rank, r.data["stream"]), r.ts, r.data["op_count"], r.data["comm"])
                    for r in recs[i:i + 4000]])
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    keys = len(det.keys)
    lstm = OpTimingDetector(OpTimingConfig()).model("bench")
    params = sum(p.numel() for p in lstm.net.parameters()) if lstm else 0
    # inference copy + training copy + Adam's two moments, float32; plus the reservoir of training windows
    shared = params * 4 * 4 + (lstm.buffer * 10 * 2 * 4 if lstm else 0)
    return used / keys, shared


def share_quality(seeds: int) -> list[str]:
    """Shared LSTM per job vs one LSTM per rank/stream vs the seasonal predictor alone, on the labelled
    collective scenarios: detection quality, how often the LSTM judged, and time. The LSTM rows force the LSTM to
    judge once trained (`op_predictor = "lstm"`) and train faster than the default (every 200 windows, 50 steps a
    round), so that it judges within these jobs' length."""
    from rankwatch.eval_ops import evaluate_ops

    lstm = {"op_predictor": "lstm", "op_train_every": 200, "op_train_steps": 50, "op_shadow_every": 1}
    lines = []
    for label, cfg in (("seasonal reference only", {"op_predictor": "seasonal"}),
                       ("LSTM shared per job", {**lstm, "op_share": "job"}),
                       ("LSTM per rank/stream", {**lstm, "op_share": "key"})):
        t0 = time.perf_counter()
        out, _ = evaluate_ops(seeds=seeds, path="offline", normal_steps=600, detection=DetectionConfig(**cfg))
        lines += [f"== {label}: {time.perf_counter() - t0:.0f} s"] + out[1:]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--share", action="store_true")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--ops", type=int, default=200_000)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--predictor", choices=["auto", "lstm"], nargs="+", default=["auto", "lstm"],
                    help="throughput with the default choice, and with the LSTM judging every op")
    a = ap.parse_args()
    if not (a.throughput or a.memory or a.share):
        a.throughput = a.memory = True
    if a.throughput:
        for r in a.ranks:
            for pred in a.predictor:
                rate, s2 = throughput(r, a.ops, 500 * 20, pred)  # 500 messages per micro-batch, ~20 records each
                print(f"{r} ranks x {STREAMS} streams, predictor {pred}: {rate:,.0f} op records/s batched "
                      f"(stage 2 {s2:.0%} of the time)", flush=True)
            batched, one = per_key_rate(r)
            print(f"{r} ranks x {STREAMS} streams, stage 1 alone, LSTM judging: {batched:,.0f} op records/s "
                  f"batched, {one:,.0f}/s one op at a time", flush=True)
    if a.memory:
        for r in a.ranks:
            per_key, shared = memory_per_key(r)
            print(f"{r} ranks x {STREAMS} streams: {per_key / 1024:.1f} KiB of stage-1 state per key; shared LSTM "
                  f"per job {shared / 2**20:.1f} MiB (weights, training copy, Adam moments, reservoir)", flush=True)
    if a.share:
        print("\n".join(share_quality(a.seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
