"""False alarms on normal runs that are less regular than the eval's: gradient accumulation, ranks' batches of
different lengths, many buckets per step.

    python bench/bench_ops_irregular.py [--seeds 6] [--steps 800] [--variants accum cv15 cv30 buckets]
        [--predictors default seasonal shared perkey]

Each variant is a healthy 8-rank DP x TP job (rankwatch/sim_collectives.py) with drift and three evaluation
pauses, run through `rankwatch analyze`; it prints the findings per detector. No fault is injected, so every
collective finding (op_timing, straggler, hang) is a false alarm. Variants:
- accum: 4 micro-batches per step (tensor-parallel ops in each, the data-parallel buckets only in the last);
- cv15 / cv30: each data-parallel rank's compute per step x exp(0.15 / 0.30 x N(0,1)) (its TP group shares
  its batch): variable sequence lengths, so a different rank is last at each step;
- buckets: 8 tensor-parallel ops and 12 gradient buckets per step (more ops per step than the straggler window);
- cv15buckets: both (a rank with a long batch is late on a dozen ops in a row).
Training-metric findings (step_time, throughput, mad) are listed too: the pauses cause 3 per rank and run.

--predictors runs each variant's jobs (simulated once per variant) under each op-timing predictor, the configs
of `bench/bench_op_timing.py --share`:
- default: the DetectionConfig defaults (op_predictor "auto": the seasonal reference judges until the job's
  shared LSTM predicts it better; the LSTM trains every 2,000 windows);
- seasonal: the seasonal reference alone (op_predictor "seasonal", no LSTM);
- shared: one LSTM per job, forced to judge once trained (op_predictor "lstm") and trained faster than the
  default (50 steps every 200 windows, every op scored), so that it judges within these jobs' length;
- perkey: the same, but one LSTM per rank/stream key (op_share "key").
Each row: the op records, the op_timing / straggler / hang findings, how many of the op_timing findings the LSTM
judged (their context["predictor"]; "-" when none were raised), and the wall seconds of the analysis (the
simulated logs' writing excluded).
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time

import numpy as np
from rankwatch.processors.pipeline import DetectionConfig

from rankwatch.eval_ops import LabelledJob, _folder, run_offline
from rankwatch.sim_collectives import build_timeline
from rankwatch.simulate import Scenario, write_job

VARIANTS = {"accum": {"grad_accum": 4}, "cv15": {"batch_cv": 0.15}, "cv30": {"batch_cv": 0.3},
            "buckets": {"tp_ops": 8, "dp_buckets": 12}, "cv15buckets": {"batch_cv": 0.15, "tp_ops": 8, "dp_buckets": 12}}
COLLECTIVE = ("op_timing", "straggler", "hang")
_LSTM = {"op_predictor": "lstm", "op_train_every": 200, "op_train_steps": 50, "op_shadow_every": 1}
PREDICTORS: dict[str, dict | None] = {"default": None, "seasonal": {"op_predictor": "seasonal"},
                                      "shared": {**_LSTM, "op_share": "job"}, "perkey": {**_LSTM, "op_share": "key"}}


def variant_jobs(name: str, seeds: int, steps: int, root: str) -> tuple[int, list[LabelledJob]]:
    """Write the variant's healthy jobs under `root`: (op records, jobs)."""
    jobs, ops = [], 0
    for seed in range(seeds):
        rng = np.random.default_rng(30_000 + seed)
        sc = Scenario(ranks=8, steps=steps, seed=seed + 90_000, faults=[], step_drift=float(rng.uniform(0, 0.1)),
                      nccl_style=("2.14", "2.18", "2.19")[seed % 3], watchdog_s=120.0,
                      pauses={int(s): float(rng.uniform(5, 30)) for s in rng.integers(100, steps - 50, 3)},
                      **VARIANTS[name])
        job = LabelledJob(f"irregular-seed{seed}-normal", sc, build_timeline(sc).windows, True)
        write_job(sc, _folder(root, job, 4))
        ops += sc.ranks * steps * (sc.tp_ops * sc.grad_accum + sc.dp_buckets)
        jobs.append(job)
    return ops, jobs


def run_predictor(jobs: list[LabelledJob], root: str, predictor: str) -> tuple[collections.Counter, int, float]:
    """Analyze the jobs with one predictor's config: (findings per detector, op_timing findings the LSTM judged,
    wall seconds)."""
    cfg = PREDICTORS[predictor]
    detection = None if cfg is None else DetectionConfig(**cfg)
    total: collections.Counter = collections.Counter()
    lstm = 0
    t0 = time.perf_counter()
    for job in jobs:
        found = run_offline([job], root, detection=detection)[job.name]
        total.update(a["detector"] for a in found)
        lstm += sum(a["detector"] == "op_timing" and (a.get("context") or {}).get("predictor") == "lstm"
                    for a in found)
    return total, lstm, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--predictors", nargs="+", default=["default"], choices=list(PREDICTORS),
                    help="op-timing predictors to run each variant under (see the module docstring)")
    a = ap.parse_args()
    print(f"{'variant':11} {'predictor':9} {'op records':>10}  {'op_timing':>9} {'straggler':>9} {'hang':>4}  "
          f"{'lstm-judged':>11} {'wall s':>7}  other findings", flush=True)
    for name in a.variants:
        with tempfile.TemporaryDirectory(prefix=f"rankwatch-irregular-{name}-") as root:
            ops, jobs = variant_jobs(name, a.seeds, a.steps, root)
            for pred in a.predictors:
                found, lstm, wall = run_predictor(jobs, root, pred)
                other = ", ".join(f"{k} {v}" for k, v in sorted(found.items()) if k not in COLLECTIVE)
                judged = f"{lstm}/{found['op_timing']}" if found["op_timing"] else "-"
                print(f"{name:11} {pred:9} {ops:>10,}  {found['op_timing']:>9} {found['straggler']:>9} "
                      f"{found['hang']:>4}  {judged:>11} {wall:>7.0f}  {other}", flush=True)


if __name__ == "__main__":
    main()
