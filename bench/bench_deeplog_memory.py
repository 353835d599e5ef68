"""Memory stays flat whatever the input size: `rankwatch deeplog train` on multi-GB synthetic inputs.

Writes session files (HDFS-like sessions resampled from `hdfs_train`, or random ones without the data) and a
JSON-lines file of `{"session_id", "keys"}` records, then runs each measurement in a fresh process and prints
its peak RSS: encoding the whole input into the on-disk cache plus `--steps` training steps, and one full epoch
of the data pipeline (positioned reads, windows, shuffle buffer, batches) without the model. A small input
gives the baseline (mostly torch itself). Not in CI: it writes several GB under --dir and takes minutes.

    python bench/bench_deeplog_memory.py [--gb 2] [--jsonl-gb 1] [--steps 200] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def sessions(rng: random.Random):
    from rankwatch.deeplog.datasets import hdfs_sessions, shared_data_dir

    if shared_data_dir() is not None:
        pool = [line.split() for line in hdfs_sessions("hdfs_train")]
        while True:
            yield rng.choice(pool)
    while True:
        yield [str(rng.randint(1, 30)) for _ in range(rng.randint(5, 40))]


def write_sessions(path: str, size: int, jsonl: bool) -> None:
    rng = random.Random(0)
    gen = sessions(rng)
    written, i = 0, 0
    with open(path, "w") as fh:
        while written < size:
            block = []
            for _ in range(5000):
                keys = next(gen)
                block.append(json.dumps({"session_id": i, "keys": [int(k) for k in keys]}) if jsonl
                             else " ".join(keys))
                i += 1
            text = "\n".join(block) + "\n"
            fh.write(text)
            written += len(text)


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line with its peak RSS."""
    import numpy as np

    from rankwatch.deeplog.cache import KeyCache, shuffled_batches
    from rankwatch.deeplog.config import load_deeplog_config
    from rankwatch.deeplog.train import train

    t0 = time.perf_counter()
    out: dict = {}
    if args.child == "train":
        cfg = load_deeplog_config(None, {"data.data_dir": [args.data], "output_dir": args.out,
                                         "training.max_steps": args.steps, "training.num_epochs": 1,
                                         "training.device": "cpu", "training.threads": 1,
                                         "training.checkpoint_every": 0, "training.log_every": 10**9,
                                         "model.hidden_size": 64, "model.embedding_dim": 32})
        res = train(cfg, evaluate_after=False)
        out["steps"] = res["steps"]
        out["tokens"] = KeyCache(os.path.join(args.out, "cache")).meta["n_tokens"]
    else:  # one full epoch of the data pipeline
        cache = KeyCache(os.path.join(args.out, "cache"))
        rng = np.random.default_rng(0)
        n = 0
        chunks = cache.chunks("train", tokens_per_chunk=2500, order=rng)
        for b in shuffled_batches(chunks, 256, 10000, True, rng):
            n += len(b.targets)
        out["windows"] = n
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def measure(what: str, data: str, out: str, steps: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", what, "--data", data, "--out", out,
                        "--steps", str(steps)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--jsonl-gb", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--child")
    ap.add_argument("--data")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        inputs = [("sessions", 0.05, False), ("sessions", args.gb, False), ("JSON lines (ijson)", args.jsonl_gb, True)]
        print(f"{'input':<20} {'size':>8} {'keys':>14} {'encode + steps':>16} {'peak RSS':>9} "
              f"{'1 epoch pipeline':>17} {'peak RSS':>9}")
        for name, gb, jsonl in inputs:
            path = os.path.join(d, f"data-{gb}.{'jsonl' if jsonl else 'txt'}")
            write_sessions(path, int(gb * 1e9), jsonl)
            out = os.path.join(d, f"out-{gb}-{jsonl}")
            tr = measure("train", path, out, args.steps)
            ep = measure("epoch", path, out, args.steps)
            print(f"{name:<20} {os.path.getsize(path) / 1e9:>6.2f}GB {tr['tokens']:>14,} {tr['seconds']:>14.0f} s "
                  f"{tr['peak_rss_mb']:>6.0f} MB {ep['windows']:>9,} in {ep['seconds']:>3.0f} s "
                  f"{ep['peak_rss_mb']:>6.0f} MB")
            for f in os.listdir(os.path.join(out, "cache")):
                os.remove(os.path.join(out, "cache", f))
            os.remove(path)


if __name__ == "__main__":
    main()
