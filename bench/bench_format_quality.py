"""Detection quality per log format (docs/DETECTION.md): the labelled scenarios of `rankwatch eval` written in each
framework's format (rankwatch/sim_formats.py), read back offline (`rankwatch analyze`) and/or through the real
shipper -> embedded broker -> worker, next to rankwatch's own JSON lines on the same seeds.

    python bench/bench_format_quality.py [--seeds 20] [--path offline|stream|both] [--formats mmengine ...]
"""

from __future__ import annotations

import argparse
import time

from rankwatch.evaluate import evaluate
from rankwatch.format_eval import BAR_KINDS, bar_met, evaluate_formats
from rankwatch.sim_formats import RENDERERS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--path", choices=("offline", "stream", "both"), default="both")
    ap.add_argument("--formats", nargs="+", choices=sorted(RENDERERS), default=None, help="default: all")
    a = ap.parse_args()
    t = time.perf_counter()
    json_lines, _ = evaluate(a.seeds, path="offline")
    lines, results = evaluate_formats(a.seeds, formats=a.formats, path=a.path)
    print("\n".join(["rankwatch's JSON lines (baseline)", *json_lines[1:], *lines]))
    print()
    print(f"{'format':<16} {'path':<8} " + " ".join(f"{k + ' P/R':>22}" for k in BAR_KINDS))
    for path, per_fmt in results.items():
        for fmt, per_kind in per_fmt.items():
            cells = [f"{per_kind[k].precision:.3f} / {per_kind[k].recall:.3f}" if k in per_kind else "not printed"
                     for k in BAR_KINDS]
            print(f"{fmt:<16} {path:<8} " + " ".join(f"{c:>22}" for c in cells))
    print(f"bar (precision >= 0.9 and recall >= 0.9 on {', '.join(BAR_KINDS)} where printed): "
          f"{'MET' if bar_met(results) else 'MISSED'}  ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
