"""False alarms on normal runs that are less regular than the eval's: gradient accumulation, ranks' batches of
different lengths, many buckets per step.

    python bench/bench_ops_irregular.py [--seeds 6] [--steps 800] [--variants accum cv15 cv30 buckets]

Each variant is a healthy 8-rank DP x TP job (rankwatch/sim_collectives.py) with drift and three evaluation
pauses, run through `rankwatch analyze`; it prints the findings per detector. No fault is injected, so every
collective finding (op_timing, straggler, hang) is a false alarm. Variants:
- accum: 4 micro-batches per step (tensor-parallel ops in each, the data-parallel buckets only in the last);
- cv15 / cv30: each data-parallel rank's compute per step x exp(0.15 / 0.30 x N(0,1)) (its TP group shares
  its batch): variable sequence lengths, so a different rank is last at each step;
- buckets: 8 tensor-parallel ops and 12 gradient buckets per step (more ops per step than the straggler window);
- cv15buckets: both (a rank with a long batch is late on a dozen ops in a row).
Training-metric findings (step_time, throughput, mad) are listed too: the pauses cause 3 per rank and run.
"""

from __future__ import annotations

import argparse
import collections
import tempfile

import numpy as np

from rankwatch.eval_ops import LabelledJob, _folder, run_offline
from rankwatch.sim_collectives import build_timeline
from rankwatch.simulate import Scenario, write_job

VARIANTS = {"accum": {"grad_accum": 4}, "cv15": {"batch_cv": 0.15}, "cv30": {"batch_cv": 0.3},
            "buckets": {"tp_ops": 8, "dp_buckets": 12}, "cv15buckets": {"batch_cv": 0.15, "tp_ops": 8, "dp_buckets": 12}}
COLLECTIVE = ("op_timing", "straggler", "hang")


def run_variant(name: str, seeds: int, steps: int) -> tuple[int, collections.Counter]:
    root = tempfile.mkdtemp(prefix=f"rankwatch-irregular-{name}-")
    total: collections.Counter = collections.Counter()
    ops = 0
    for seed in range(seeds):
        rng = np.random.default_rng(30_000 + seed)
        sc = Scenario(ranks=8, steps=steps, seed=seed + 90_000, faults=[], step_drift=float(rng.uniform(0, 0.1)),
                      nccl_style=("2.14", "2.18", "2.19")[seed % 3], watchdog_s=120.0,
                      pauses={int(s): float(rng.uniform(5, 30)) for s in rng.integers(100, steps - 50, 3)},
                      **VARIANTS[name])
        job = LabelledJob(f"irregular-seed{seed}-normal", sc, build_timeline(sc).windows, True)
        write_job(sc, _folder(root, job, 4))
        ops += sc.ranks * steps * (sc.tp_ops * sc.grad_accum + sc.dp_buckets)
        total.update(a["detector"] for a in run_offline([job], root)[job.name])
    return ops, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    a = ap.parse_args()
    print(f"{'variant':8} {'op records':>10}  {'op_timing':>9} {'straggler':>9} {'hang':>4}  other findings")
    for name in a.variants:
        ops, found = run_variant(name, a.seeds, a.steps)
        other = ", ".join(f"{k} {v}" for k, v in sorted(found.items()) if k not in COLLECTIVE)
        print(f"{name:8} {ops:>10,}  {found['op_timing']:>9} {found['straggler']:>9} {found['hang']:>4}  {other}",
              flush=True)


if __name__ == "__main__":
    main()
