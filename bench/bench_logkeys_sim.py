"""Log-key detection on simulated jobs (rankwatch/sim_logs.py): each job bootstraps its own DeepLog model from
its first 2,000 lines (its normal start), then injected error bursts must be flagged on the right rank, and
a job's later phases (checkpoint saves, evaluation loops, LR schedule and epoch messages) must not be.

Reports recall per fault kind and magnitude (1 = one line, subtle; 5 = a long burst), precision over all
log-key anomalies, false alarms on long normal runs, and the sensitivity to the two probability settings.

    python bench/bench_logkeys_sim.py [--seeds 20] [--long-steps 40000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rankwatch.processors.offline import analyze  # noqa: E402
from rankwatch.processors.pipeline import DetectionConfig  # noqa: E402

from rankwatch.sim_logs import (  # noqa: E402
    LOG_FAULT_KINDS,
    BurstScore,
    LogScenario,
    random_faults,
    score_bursts,
    write_log_job,
)

_JOBS: dict[int, tuple[str, list]] = {}


def scenario_score(seed: int, tmp: str, **cfg) -> BurstScore:
    """One simulated job (written once, reused across settings), analysed; detections against its labels."""
    if seed not in _JOBS:
        sc = LogScenario(ranks=8, steps=4000, seed=seed)
        sc.faults = random_faults(sc, np.random.default_rng(seed), 5, after_step=1400)
        d = os.path.join(tmp, f"job{seed}")
        _JOBS[seed] = (d, write_log_job(sc, d))
    d, bursts = _JOBS[seed]
    found = [a for a in analyze([d], detection=DetectionConfig(**cfg)) if a.detector == "deeplog"]
    return score_bursts(found, bursts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--long-steps", type=int, default=40000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        total = BurstScore()
        for seed in range(args.seeds):
            s = scenario_score(seed, tmp)
            total.add(s)
        print(f"{args.seeds} jobs x 8 ranks x 4000 steps, 5 faults each, bootstrapped on their first 2,000 lines "
              f"({time.perf_counter() - t0:.0f} s)")
        print(f"{'fault':<16} {'magnitude':>9} {'found':>7} {'recall':>7}")
        for kind in LOG_FAULT_KINDS:
            for (k, m), (hit, n) in sorted(total.found.items()):
                if k == kind:
                    print(f"{k:<16} {m:>9} {hit:>3}/{n:<3} {hit / n:>7.2f}")
            print(f"{kind:<16} {'all':>9} {'':>7} {total.recall(kind):>7.3f}")
        print(f"recall {total.recall():.3f}, precision {total.precision():.3f} ({total.alarms} anomalies, "
              f"{len(total.false_alarms)} false)")
        for a in total.false_alarms:
            print(f"  false alarm: rank {a.rank} {a.context['reason']} p={a.value} {a.context['template'][:90]}")

        sc = LogScenario(ranks=8, steps=args.long_steps, seed=99)
        d = os.path.join(tmp, "long")
        write_log_job(sc, d)
        lines = sum(sum(1 for _ in open(os.path.join(d, f))) for f in os.listdir(d))
        found = [a for a in analyze([d], detection=DetectionConfig()) if a.detector == "deeplog"]
        hours = args.long_steps * sc.step_s / 3600
        print(f"long normal run: 8 ranks x {args.long_steps} steps ({hours:.1f} h of training, {lines:,} lines, "
              f"{args.long_steps // sc.checkpoint_every} checkpoint saves, evaluations, LR and epoch messages): "
              f"{len(found)} alarms")
        for a in found:
            print(f"  alarm: rank {a.rank} {a.context['reason']} {a.context['template'][:90]}")

        print("sensitivity (first 10 jobs): deeplog_min_prob / deeplog_rare_ratio -> recall, precision "
              "(ratio inf: no rare-key exception; 0 / inf: the paper's top-g alone)")
        inf = float("inf")
        for min_prob, ratio in ((0.001, 0.1), (0.001, 0.05), (0.001, 0.3), (0.0001, 0.1), (0.01, 0.1), (0.001, inf),
                                (0.0, inf)):
            t = BurstScore()
            for seed in range(min(10, args.seeds)):
                t.add(scenario_score(seed, tmp, deeplog_min_prob=min_prob, deeplog_rare_ratio=ratio))
            print(f"  {min_prob:<7} {ratio:<5} -> recall {t.recall():.3f} (out_of_order {t.recall('out_of_order'):.3f}), "
                  f"precision {t.precision():.3f}")


if __name__ == "__main__":
    main()
