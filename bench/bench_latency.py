"""End-to-end detection latency: a line appended to a log file -> anomaly on the `anomalies` topic,
through the real shipper, embedded broker and Faust worker. Prints p50/p95/max over --spikes spikes.

    python bench/bench_latency.py [--spikes 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from rankwatch.producers.shipper import Shipper, ShipperConfig

from rankwatch.broker import EmbeddedBroker, ensure_topics, free_port
from rankwatch.config import Settings
from rankwatch.consume import follow_anomalies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spikes", type=int, default=20)
    a = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as d, EmbeddedBroker() as broker:
        s = Settings(bootstrap=broker.bootstrap, partitions=8, app_id="bench-latency")
        ensure_topics(s)
        mport = free_port()
        env = {**os.environ, **s.env()}
        worker = subprocess.Popen([sys.executable, "-m", "rankwatch.cli", "worker", "--embedded",
                                   "--metrics-port", str(mport)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            os.makedirs(d + "/job")
            sh = Shipper([d + "/job"], s, ShipperConfig(checkpoint=d + "/c.json", metrics_port=0,
                                                         poll_interval_s=0.02))
            threading.Thread(target=sh.run, daemon=True).start()
            path = d + "/job/rank_0.log"
            step = 0

            def write(loss: float) -> None:
                nonlocal step
                with open(path, "a") as fh:
                    fh.write(json.dumps({"ts": 1e9 + step, "step": step, "loss": loss}) + "\n")
                step += 1

            for _ in range(60):
                write(2.0 + rng.gauss(0, 0.02))
            t0 = time.monotonic()
            while time.monotonic() - t0 < 60:  # wait for the worker to join and catch up
                try:
                    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2).read().decode()
                    if 'rankwatch_events_total{kind="metrics"} 60.0' in text:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            stream = follow_anomalies(s, follow=True, from_beginning=False, poll_ms=20)
            lat = []
            for _ in range(a.spikes + 1):  # the first spike's wait includes the follower's own start: not timed
                for _ in range(5):
                    write(2.0 + rng.gauss(0, 0.02))
                t = time.monotonic()
                write(10.0)
                next(stream)
                lat.append(time.monotonic() - t)
            print("each (ms):", [round(x * 1000) for x in lat[1:]])
            lat = sorted(lat[1:])
            p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
            print(f"line written -> anomaly consumed, {len(lat)} spikes: p50 {p(0.5):.0f} ms, "
                  f"p95 {p(0.95):.0f} ms, max {lat[-1] * 1000:.0f} ms")
            sh.stop_event.set()
        finally:
            worker.terminate()
            worker.wait(20)


if __name__ == "__main__":
    main()
