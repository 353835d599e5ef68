"""Detection quality on labelled scenarios, offline and through the real stream (the bar of docs/DETECTION.md)."""

from __future__ import annotations

from rankwatch.evaluate import evaluate


def test_precision_recall_and_delay_bar_over_20_seeds_offline_and_streaming(broker):
    lines, results = evaluate(seeds=20, ranks=8, steps=300, path="both", bootstrap=broker.bootstrap)
    print("\n".join(lines))
    assert set(results) == {"offline", "stream"}
    for path, per_kind in results.items():
        for kind, q in per_kind.items():
            assert q.faults >= 20, (path, kind)
            assert q.precision >= 0.9, (path, kind, q)
            assert q.recall >= 0.9, (path, kind, q)
            assert max(q.delays) <= 1, (path, kind, q.delays)
    assert "alarms on slow loss drifts (must be 0): 0" in lines
