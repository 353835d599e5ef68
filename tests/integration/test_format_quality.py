"""Loss spikes, grad-norm explosions and NaN losses are found in every built-in log format, offline and through
the real shipper -> broker -> worker, as well as in rankwatch's own JSON lines (docs/DETECTION.md).

The simulator's labelled job is written as each framework writes its logs (rankwatch/sim_formats.py). Six seeds
here (the first six, not chosen); `python bench/bench_format_quality.py --seeds 20` gives the full figures."""

from __future__ import annotations

from rankwatch.evaluate import evaluate
from rankwatch.format_eval import BAR_KINDS, evaluate_formats, judged_kinds
from rankwatch.sim_formats import RENDERERS

SEEDS = 6


def test_every_format_meets_the_json_bar_offline_and_streaming(broker):
    lines, results = evaluate_formats(seeds=SEEDS, path="both", bootstrap=broker.bootstrap)
    print("\n".join(lines))
    _, baseline = evaluate(seeds=SEEDS, path="offline")
    json_q = baseline["offline"]
    assert set(results) == {"offline", "stream"}
    for fmt in RENDERERS:
        judged = judged_kinds(fmt)
        assert {"loss_spike", "nonfinite"} <= set(judged)
        for path in ("offline", "stream"):
            per_kind = results[path][fmt]
            assert set(per_kind) == set(judged), (path, fmt)
            for kind, q in per_kind.items():
                ctx = (path, fmt, kind, q)
                assert q.faults == json_q[kind].faults >= SEEDS, ctx
                if kind not in BAR_KINDS:
                    continue  # throughput drops: reported, judged by the JSON suite
                # the same detections as rankwatch's own JSON lines: nothing lost by reading the framework's format
                assert (q.tp, q.fp, q.detected) == (json_q[kind].tp, json_q[kind].fp, json_q[kind].detected), ctx
                assert q.precision >= 0.9 and q.recall >= 0.9, ctx
                assert max(q.delays) <= 1, ctx
