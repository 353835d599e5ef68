"""Parsing throughput per log format (lines/s on one core), and the shipper's end-to-end rate on a folder that
mixes every format (tail -> parse -> Kafka, acks=all, against the embedded broker).

Per format, the lines are that format's own: the real lines of tests/data/real_lines/ and the simulator's
fixtures (rankwatch/sim_formats.py) that the parser recognises as that format, repeated to --lines.

    python bench/bench_formats.py [--lines 200000] [--steps 500] [--no-shipper]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from rankwatch.formats.user import compile_formats
from rankwatch.parsing import ParseError, SourceContext, parse_line
from rankwatch.sim_formats import RENDERERS, write_format_job
from rankwatch.simulate import Scenario, job_lines, write_job

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "tests" / "data" / "real_lines"


def _ctx(path: str, formats=()) -> SourceContext:
    return SourceContext(path=path, job="bench", rank=0, user_formats=formats)


def lines_by_format(steps: int) -> dict[str, list[tuple[str, list[str]]]]:
    """format -> [(file path, its lines of that format in order)]: the file keeps per-file state realistic."""
    out: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)

    def classify(path: str, texts: list[str]) -> None:
        ctx = _ctx(path)
        per: dict[str, list[str]] = defaultdict(list)
        for t in texts:
            try:
                parse_line(t, ctx, 0, 0.0)
            except ParseError:
                continue
            per[ctx.last_format or "plain text"].append(t)
        for name, ts in per.items():
            if name == "lightning_csv" and ctx.csv_header:  # rows need their header first
                ts = [",".join(ctx.csv_header), *ts]
            out[name].append((path, ts))

    for p in sorted(REAL.iterdir()):
        if p.suffix in (".txt", ".csv"):
            classify(str(p), [t for t in p.read_text().split("\n")[:-1] if not t.startswith("#")])
    sc = Scenario(ranks=2, steps=steps, seed=3)
    for fmt, render in RENDERERS.items():
        for rel, lines in render(sc).items():
            classify(f"/sim/{fmt}/{rel}", [t for _, t in lines])
    classify("/sim/json/rank0/train.log", [t for _, _, t in job_lines(sc)])
    return out


def rate(files: list[tuple[str, list[str]]], n: int, formats=(), repeat: int = 3) -> float:
    """Lines per CPU second of this process (per core, whatever else the machine runs), best of `repeat`."""
    texts = [(path, t) for path, ts in files for t in ts]
    if not texts:
        return 0.0
    reps = max(1, n // len(texts))
    best = 0.0
    for _ in range(repeat):
        gc.collect()
        start = time.process_time()
        count = 0
        for _ in range(reps):
            contexts: dict[str, SourceContext] = {}
            for path, t in texts:
                ctx = contexts.get(path)
                if ctx is None:
                    ctx = contexts[path] = _ctx(path, formats)
                try:
                    parse_line(t, ctx, count, 0.0)
                except ParseError:
                    pass
                count += 1
        best = max(best, count / (time.process_time() - start))
    return best


def shipper_rate(steps: int) -> tuple[int, float, float]:
    from rankwatch.producers.shipper import Shipper, ShipperConfig

    from rankwatch.broker import EmbeddedBroker, ensure_topics
    from rankwatch.config import Settings

    sc = Scenario(ranks=8, steps=steps, seed=1)
    with tempfile.TemporaryDirectory() as d, EmbeddedBroker() as broker:
        s = Settings(bootstrap=broker.bootstrap, partitions=8)
        ensure_topics(s)
        job = os.path.join(d, "job")
        n = write_job(sc, os.path.join(job, "json"))
        for fmt in RENDERERS:
            n += write_format_job(sc, fmt, os.path.join(job, fmt))
        size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(job) for f in fs)
        sh = Shipper([job], s, ShipperConfig(checkpoint=os.path.join(d, "c.json"), metrics_port=0))
        t = time.perf_counter()  # wall time: the shipper waits on the broker too
        shipped = sh.run_until_idle(idle_s=0.5)
        dt = time.perf_counter() - t - 0.5
        sh.close()
        assert shipped == n, (shipped, n)
        return n, n / dt, size / dt / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=200_000, help="lines parsed per format")
    ap.add_argument("--steps", type=int, default=500, help="simulated steps (fixtures and the shipper's folder)")
    ap.add_argument("--no-shipper", action="store_true")
    a = ap.parse_args()
    by_fmt = lines_by_format(a.steps)
    print(f"parse rate per format: lines per CPU second of one process, best of 3 ({a.lines:,} lines each; "
          f"Python {sys.version.split()[0]})")
    print(f"{'format':<20} {'lines/s':>10} {'us/line':>8}")
    worst = ("", float("inf"))
    for name in sorted(by_fmt, key=lambda k: (k == "plain text", k)):
        r = rate(by_fmt[name], a.lines)
        worst = min(worst, (name, r), key=lambda x: x[1])
        print(f"{name:<20} {r:>10,.0f} {1e6 / r:>8.1f}")
    user = compile_formats([{"name": "mine", "regex": r"it=(?P<step>\d+) loss=(?P<loss>\S+) dt=(?P<dt>\S+)ms",
                             "fields": {"dt": "step_time_s"}, "units": {"dt": "ms"}}])
    r = rate([("/u.log", [f"it={i} loss={2 + i / 1e4:.4f} dt={500 + i % 7}.5ms" for i in range(1000)])],
             a.lines, user)
    worst = min(worst, ("user regex", r), key=lambda x: x[1])
    print(f"{'user regex':<20} {r:>10,.0f} {1e6 / r:>8.1f}")
    sc = Scenario(ranks=8, steps=2000, seed=1)
    mixed = [("/x/rank0/train.log", [t for _, _, t in job_lines(sc)])]
    r = rate(mixed, 1)
    print(f"{'mixed (simulate.py)':<20} {r:>10,.0f} {1e6 / r:>8.1f}   <- bench_shipper's 'parse only' input")
    print(f"slowest: {worst[0]} {worst[1]:,.0f} lines/s ({'meets' if worst[1] >= 50_000 else 'MISSES'} "
          f"the 50,000 lines/s/core bar)")
    if not a.no_shipper:
        n, lps, mbs = shipper_rate(a.steps)
        print(f"shipper end to end on a mixed folder (JSON + {len(RENDERERS)} framework formats, 8 ranks x "
              f"{a.steps} steps): {n:,} lines at {lps:,.0f} lines/s ({mbs:.1f} MB/s)")


if __name__ == "__main__":
    main()
