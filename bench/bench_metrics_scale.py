"""How `rankwatch analyze` (and the worker's metrics path: the same two stages) scales with a job's rank count:
one rank file of JSON metrics per rank, every step on every rank, a job-wide 3x slowdown at one step.

    python bench/bench_metrics_scale.py [--ranks 64 1024 4096] [--steps 60]

Each size runs in its own process (its peak RSS is its own). Prints lines/s per CPU second and what was found:
the per-record cost must not grow with the number of ranks (the step-time straggler's readiness check once
walked every rank for every record: 4,096 ranks x 60 steps took 96 s, now 22 s, on the 2-core box of
docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

_CHILD = """
import json, resource, sys, time
from rankwatch.processors.offline import AnalyzeStats, analyze
stats = AnalyzeStats()
t, c = time.perf_counter(), time.process_time()
found = analyze([sys.argv[1]], stats=stats)
print(json.dumps({"lines": stats.lines, "wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "found": sorted(f"{a.detector}@{a.context.get('step')}/{a.rank}" for a in found)}))
"""


def write_job(root: str, ranks: int, steps: int, slow_step: int) -> None:
    rng = random.Random(0)
    files = [open(os.path.join(root, f"rank{r}.log"), "w") for r in range(ranks)]
    for step in range(steps):
        base = 3.0 if step == slow_step else 1.0
        for r, f in enumerate(files):
            st = base * (1 + rng.gauss(0, 0.01))
            f.write(json.dumps({"ts": 1.7e9 + step + r * 1e-5, "step": step, "loss": 2.0 + rng.gauss(0, 0.01),
                                "step_time_s": st, "throughput": 64 / st}) + "\n")
    for f in files:
        f.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 1024, 4096])
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    print(f"{'ranks':>6} {'lines':>9} {'wall s':>8} {'lines/CPU-s':>12} {'peak RSS MiB':>13}  found")
    for ranks in a.ranks:
        with tempfile.TemporaryDirectory(prefix="rankwatch-scale-") as root:
            write_job(root, ranks, a.steps, slow_step=a.steps * 2 // 3)
            out = subprocess.run([sys.executable, "-c", _CHILD, root], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            found = ", ".join(r["found"][:4]) + (" ..." if len(r["found"]) > 4 else "")
            print(f"{ranks:>6} {r['lines']:>9,} {r['wall_s']:>8.1f} {r['lines'] / r['cpu_s']:>12,.0f} "
                  f"{r['rss_mib']:>13,.0f}  {found}")


if __name__ == "__main__":
    main()
