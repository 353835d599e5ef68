"""GPU memory detection quality on simulated runs, CI-sized (4 seeds per scenario; the figures in docs/DETECTION.md
come from `python bench/bench_memory.py --quality --seeds 20`).

The bar of the issue: an OOM forecast >= 60 s before the OOM in >= 90% of leak runs, zero OOM/leak alarms on
stable runs, the imbalanced GPU named in >= 95% of jobs: asserted as such. Its ETA part (error <= 25% at the first
forecast in >= 90% of runs) is NOT met: 88% over 20 seeds (docs/DETECTION.md says why, per tier). It is asserted at
the level measured, so that a regression shows, not at the bar.
"""

from __future__ import annotations

from rankwatch.memory_eval import evaluate_memory, report_lines


def test_memory_detection_bar_on_four_seeds():
    q = evaluate_memory(seeds=4, stable_s=3600.0)
    print("\n".join(report_lines(q)))
    leaks = q.leak_runs
    assert leaks.runs == 20
    assert leaks.early >= 0.9, leaks.leads
    assert leaks.both >= 0.75, list(zip(leaks.leads, leaks.eta_errors, strict=True))
    assert q.stable_alarms == [], q.stable_alarms
    assert q.stable_frag_alarms == 0
    assert q.imbalance_named == q.imbalance_jobs == 4 and q.imbalance_wrong == 0 and q.balanced_alarms == 0
    assert q.frag_found >= 3
