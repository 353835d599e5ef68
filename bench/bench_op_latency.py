"""Detection latency of collective-timing findings, line written -> anomaly on the topic, live.

    python bench/bench_op_latency.py [--ranks 16] [--steps 160] [--speed 1.0]

A simulated job (rankwatch/sim_collectives.py) with stragglers and slow streams is written in real time (x
`--speed`) into rank files; the real shipper tails them, the embedded broker and a real worker judge them. For
each straggler and op-timing anomaly, the latency is the wall time from writing its source line (the late op that
decided it) to reading the anomaly from the `anomalies` topic. Prints p50/p99/max and the load (records/s).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rankwatch.producers.shipper import Shipper, ShipperConfig

from rankwatch.broker import EmbeddedBroker, die_with_parent, ensure_topics, free_port, stop_process
from rankwatch.config import Settings
from rankwatch.consume import follow_anomalies
from rankwatch.simulate import Fault, Scenario, job_lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=16)
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--speed", type=float, default=1.0)
    a = ap.parse_args()
    faults = [Fault("straggler", 3, 50, 30, 0.2), Fault("slow_stream", 9 % a.ranks, 110, 14, 2.5, stream="tp"),
              Fault("straggler", 12 % a.ranks, 135, 20, 0.3)]
    sc = Scenario(ranks=a.ranks, steps=a.steps, seed=4, faults=faults)
    lines = job_lines(sc)
    root = Path(tempfile.mkdtemp(prefix="rankwatch-latency-")) / "latency-job"
    broker = EmbeddedBroker(port=free_port()).start()
    s = Settings(bootstrap=broker.bootstrap, app_id=f"latency-{int(time.time())}")
    s.use_topic_prefix(s.app_id)
    ensure_topics(s)
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "rankwatch.cli", "worker", "--embedded", "--metrics-port",
                               str(port)], env={**os.environ, **s.env()}, preexec_fn=die_with_parent,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root.mkdir(parents=True)
    shipper = Shipper([str(root)], s, ShipperConfig(checkpoint=str(root.parent / "c.json"), metrics_port=0,
                                                    poll_interval_s=0.02))
    threading.Thread(target=shipper.run, daemon=True).start()
    written: dict[tuple[str, int], float] = {}
    seen: list[tuple[dict, float]] = []

    def consume() -> None:
        for rec in follow_anomalies(s, follow=True, from_beginning=False, poll_ms=20):
            seen.append((rec, time.time()))

    threading.Thread(target=consume, daemon=True).start()
    time.sleep(8.0)  # the worker joins its group (embedded broker: ~5 s)
    handles: dict[str, object] = {}
    sizes: dict[str, int] = {}
    t0_event, t0_wall = lines[0][0], time.monotonic()
    try:
        for ts, rel, text in lines:
            due = (ts - t0_event) / a.speed - (time.monotonic() - t0_wall)
            if due > 0.002:
                for fh in handles.values():
                    fh.flush()
                time.sleep(due)
            path = str(root / rel)
            fh = handles.get(path)
            if fh is None:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fh = handles[path] = open(path, "a", encoding="utf-8")  # noqa: SIM115
                sizes[path] = 0
            data = text + "\n"
            fh.write(data)
            written[(path, sizes[path])] = time.time()  # flushed within the next pacing sleep (< 2 ms later)
            sizes[path] += len(data.encode())
        for fh in handles.values():
            fh.flush()
        wall = time.monotonic() - t0_wall
        time.sleep(15.0)
    finally:
        for fh in handles.values():
            fh.close()
        shipper.stop_event.set()
        stop_process(worker, 15)
        broker.stop()
    lat = [arrived - written[(r["source"]["file"], r["source"]["offset"])] for r, arrived in seen
           if r["detector"] in ("straggler", "op_timing") and (r["source"]["file"], r["source"]["offset"]) in written]
    found = sorted({(r["detector"], r["rank"]) for r, _ in seen if r["detector"] in ("straggler", "op_timing")})
    print(f"{a.ranks} ranks, {len(lines):,} lines in {wall:.0f} s ({len(lines) / wall:,.0f} lines/s, "
          f"x{a.speed} real time); findings {found}")
    if lat:
        print(f"line written -> anomaly read: p50 {np.percentile(lat, 50) * 1000:.0f} ms, "
              f"p99 {np.percentile(lat, 99) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms over {len(lat)} findings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
