"""The streaming half of `rankwatch eval`: labelled scenarios through the real shipper, broker and worker."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict

from rankwatch.broker import EmbeddedBroker, die_with_parent, ensure_topics, free_port, stop_process
from rankwatch.config import Settings
from rankwatch.consume import follow_anomalies
from rankwatch.simulate import Scenario


def _events(port: int) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith('rankwatch_events_total{kind="metrics"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def run_stream(scenarios: list[Scenario], root: str, bootstrap: str | None = None,
               timeout: float = 600.0) -> dict[str, list[dict]]:
    from rankwatch.producers.shipper import Shipper, ShipperConfig

    broker = None
    worker = None
    try:
        if not bootstrap:
            broker = EmbeddedBroker().start()
            bootstrap = broker.bootstrap
        s = Settings(bootstrap=bootstrap, app_id=f"rankwatch-eval-{int(time.time())}")
        tag = s.app_id.rsplit("-", 1)[1]
        s.use_topic_prefix(f"eval{tag}")
        ensure_topics(s)
        port = free_port()
        env = {**os.environ, **s.env()}
        worker = subprocess.Popen([sys.executable, "-m", "rankwatch.cli", "worker", "--embedded",
                                   "--metrics-port", str(port)], env=env, preexec_fn=die_with_parent,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with tempfile.TemporaryDirectory() as state:
            sh = Shipper([root], s, ShipperConfig(checkpoint=os.path.join(state, "c.json"), metrics_port=0))
            sh.config.job = None
            sh.resolver.job = None
            # one job per scenario folder: the job is the first folder below the root
            sh.resolver.roots = [os.path.join(root, d) for d in sorted(os.listdir(root))]
            sh.run_until_idle(1.0)
            sh.close()
        want = sum(sc.ranks * sc.steps for sc in scenarios)
        deadline = time.monotonic() + timeout
        while _events(port) < want:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"worker processed {_events(port):.0f} of {want} metric records")
            time.sleep(0.5)
        time.sleep(1.0)
        found: dict[str, list[dict]] = defaultdict(list)
        for a in follow_anomalies(s):
            found[a["job"]].append(a)
        return found
    finally:
        stop_process(worker, 20)
        if broker is not None:
            broker.stop()
