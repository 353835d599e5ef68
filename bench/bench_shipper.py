"""Shipper throughput: parse-only lines/s, and tail -> parse -> Kafka (acks=all, idempotent) lines/s
against the embedded broker. Input: a simulated 8-rank job (NCCL, JSON metrics, GPU samples, app logs).

    python bench/bench_shipper.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from rankwatch.producers.shipper import Shipper, ShipperConfig

from rankwatch.broker import EmbeddedBroker, ensure_topics
from rankwatch.config import Settings
from rankwatch.parsing import SourceContext, parse_line
from rankwatch.simulate import Scenario, job_lines, write_job


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--ranks", type=int, default=8)
    a = ap.parse_args()
    sc = Scenario(ranks=a.ranks, steps=a.steps, seed=1)
    lines = [text for _, _, text in job_lines(sc)]
    total_bytes = sum(len(x) + 1 for x in lines)
    ctx = SourceContext(path="/x/rank0/train.log", job="bench", rank=0)
    t = time.perf_counter()
    for i, line in enumerate(lines):
        parse_line(line, ctx, i, 0.0)
    dt = time.perf_counter() - t
    print(f"parse only:  {len(lines)} lines in {dt:.2f} s = {len(lines) / dt:,.0f} lines/s "
          f"({dt / len(lines) * 1e6:.1f} us/line)")
    with tempfile.TemporaryDirectory() as d, EmbeddedBroker() as broker:
        s = Settings(bootstrap=broker.bootstrap, partitions=8)
        ensure_topics(s)
        n = write_job(sc, d + "/job")
        sh = Shipper([d + "/job"], s, ShipperConfig(checkpoint=d + "/c.json", metrics_port=0))
        t = time.perf_counter()
        shipped = sh.run_until_idle(idle_s=0.5)
        dt = time.perf_counter() - t - 0.5  # minus the idle wait that ends the run
        sh.close()
        assert shipped == n, (shipped, n)
        print(f"end to end:  {n} lines ({total_bytes / 1e6:.1f} MB) tailed, parsed, produced and acknowledged "
              f"in {dt:.2f} s = {n / dt:,.0f} lines/s ({total_bytes / dt / 1e6:.1f} MB/s)")


if __name__ == "__main__":
    main()
