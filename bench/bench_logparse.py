"""Template mining accuracy on loghub's 2k labelled samples (HDFS, BGL) and mining speed.

Loghub's conventions: the message is the structured CSV's Content column; grouping accuracy (GA) is the share
of messages whose mined group is exactly one ground-truth group. Both the corrected ground truth (loghub-2.0,
the bar: HDFS >= 0.99, BGL >= 0.96) and the original one are reported, with the default masks and Drain
settings of `LogTemplateMiner` (docs/LOGKEYS.md).

    python bench/bench_logparse.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rankwatch.models.templates import LogTemplateMiner  # noqa: E402

from rankwatch.deeplog.datasets import grouping_accuracy, loghub_sample  # noqa: E402

PUBLISHED = {"HDFS": 0.998, "BGL": 0.963}  # Drain on Loghub-2k (loghub-2.0 RQ2)


def main() -> None:
    print(f"{'dataset':<8} {'ground truth':<13} {'GA':>7} {'Drain':>7} {'templates':>10} {'truth':>6} {'us/line':>8}")
    for name in ("HDFS", "BGL"):
        for corrected in (True, False):
            messages, truth = loghub_sample(name, corrected)
            miner = LogTemplateMiner()
            t0 = time.perf_counter()
            ids = [miner.add(m)[0] for m in messages]
            us = (time.perf_counter() - t0) / len(messages) * 1e6
            ga = grouping_accuracy(ids, truth)
            print(f"{name:<8} {'corrected' if corrected else 'original':<13} {ga:>7.4f} {PUBLISHED[name]:>7.3f} "
                  f"{len(miner):>10} {len(set(truth)):>6} {us:>8.1f}")


if __name__ == "__main__":
    main()
