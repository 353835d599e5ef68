"""Log lines per second through one worker process's pipeline with template mining and DeepLog scoring on.

What a worker does per micro-batch of 500 records (the worker's default `batch_size`): stage 1 turns each log
line into a summary; the summaries go through orjson as they would to and from the summaries topic; stage 2
reorders them, mines templates and scores every rank's window, one forward pass per batch for the windows not
yet cached. Parsing is excluded (the shipper does it). Two runs: a job bootstrapping its own model (its first
2,000 lines, fitted in the background thread, included in the time) and a job with a trained checkpoint.

    python bench/bench_logkeys_throughput.py [--ranks 8] [--steps 60000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import orjson
from rankwatch.processors.logkey_stage import LogKeyJob

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rankwatch.processors.offline import read_records  # noqa: E402
from rankwatch.processors.pipeline import DetectionConfig, Pipeline  # noqa: E402

from rankwatch.deeplog.model import save_checkpoint  # noqa: E402
from rankwatch.sim_logs import LogFault, LogScenario, write_log_job  # noqa: E402


def run(records, cfg: DetectionConfig, batch: int) -> tuple[float, Pipeline, int]:
    pipe = Pipeline(cfg)
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(records), batch):
        found, summaries = pipe.first_stage(records[i:i + batch])
        wire = orjson.loads(orjson.dumps(summaries))  # the summaries topic hop (one pack per job and batch)
        found += pipe.second_stage(wire)
        n += len(found)
    n += len(pipe.finish())
    return time.perf_counter() - t0, pipe, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60000)
    ap.add_argument("--batch", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        sc = LogScenario(ranks=args.ranks, steps=args.steps, seed=1,
                         faults=[LogFault("nccl_net", 2, args.steps // 2, 3)])
        write_log_job(sc, os.path.join(d, "job"))
        records = list(read_records([os.path.join(d, "job")]))
        logs = sum(r.kind == "log" for r in records)
        print(f"{len(records):,} records ({logs:,} log lines), {args.ranks} ranks, micro-batches of {args.batch}, "
              f"{os.cpu_count()} CPUs")
        secs, pipe, n = run(records, DetectionConfig(), args.batch)
        stage = pipe.jobs["job"].detector(LogKeyJob)
        print(f"bootstrapping (first 2,000 lines train the job's model): {len(records) / secs:,.0f} lines/s "
              f"({secs:.2f} s, {n} anomalies, judged {stage.det.stats['judged']:,}, cache "
              f"{len(stage.det._cache):,} windows)")
        ckpt = os.path.join(d, "model.pt")
        stage.det.vocab.miner = stage.det.miner.save_state()
        save_checkpoint(ckpt, stage.det.model, stage.det.vocab)
        secs, pipe, n = run(records, DetectionConfig(deeplog_model=ckpt), args.batch)
        print(f"trained checkpoint (--deeplog-model): {len(records) / secs:,.0f} lines/s ({secs:.2f} s, {n} anomalies)")
        secs, _, _ = run(records, DetectionConfig(deeplog_bootstrap_lines=10**12), args.batch)
        print(f"mining only (no model ever: judged by level): {len(records) / secs:,.0f} lines/s ({secs:.2f} s)")


if __name__ == "__main__":
    main()
