"""Choose the MAD threshold factor k by measurement: false alarms on fault-free noisy curves vs recall on
spikes, per signal, over many seeds of the simulator. docs/DETECTION.md records the figures.

    python bench/bench_mad_threshold.py [--seeds 20] [--steps 2000]
"""

from __future__ import annotations

import argparse

import numpy as np
from rankwatch.models.mad import RollingMAD

from rankwatch.simulate import Fault, Scenario, metric_rows

SPIKES = {"loss": ("loss_spike", (1.5, 3.0)), "grad_norm": ("grad_explosion", (4.0, 20.0))}


def measure(signal: str, k: float, seeds: int, steps: int, ranks: int) -> tuple[float, float]:
    """(false alarms per 10k points, recall of injected spikes) for one signal and k."""
    kind, (lo, hi) = SPIKES[signal]
    fp = points = caught = injected = 0
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        faults = [Fault(kind, r, int(rng.integers(steps // 3, steps - 5)), magnitude=float(rng.uniform(lo, hi)))
                  for r in range(ranks)]
        rows = metric_rows(Scenario(ranks=ranks, steps=steps, seed=seed, faults=faults))
        for r, series in rows.items():
            det = RollingMAD(k=k)
            for row in series:
                hit = det.update(row[signal]).is_anomaly
                if row["step"] == faults[r].step:
                    caught += hit
                    injected += 1
                else:
                    fp += hit
                    points += 1
    return fp / points * 1e4, caught / injected


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--ranks", type=int, default=8)
    a = ap.parse_args()
    print(f"{a.seeds} seeds x {a.ranks} ranks x {a.steps} steps, window 50, one spike per rank-run")
    print(f"{'signal':>9} {'k':>5} {'false alarms per 10k steps per rank':>36} {'recall':>7}")
    for signal in SPIKES:
        for k in (2.0, 3.5, 5.0, 6.0, 8.0, 10.0, 12.0):
            fp10k, recall = measure(signal, k, a.seeds, a.steps, a.ranks)
            print(f"{signal:>9} {k:5.1f} {fp10k:36.2f} {recall:7.3f}")


if __name__ == "__main__":
    main()
