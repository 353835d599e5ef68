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
from rankwatch.simulate import Scenario, metric_rows


def _events(port: int, kinds: tuple[str, ...] = ("metrics",)) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if any(line.startswith(f'rankwatch_events_total{{kind="{k}"}}') for k in kinds):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_stream(scenarios: list[Scenario], root: str, bootstrap: str | None = None,
               timeout: float = 600.0) -> dict[str, list[dict]]:
    """The training-metric scenarios: done once the worker has processed every metrics record."""
    return run_stream_jobs(root, sum(len(rows) for sc in scenarios for rows in metric_rows(sc).values()),
                           bootstrap, timeout, kinds=("metrics",))


def run_stream_jobs(root: str, expected: int, bootstrap: str | None = None, timeout: float = 600.0,
                    kinds: tuple[str, ...] = ("metrics", "log", "op", "gpu"), settle_s: float = 1.0
                    ) -> dict[str, list[dict]]:
    """Ship every job folder under `root` (one job per folder) through a fresh broker and worker, wait until
    the worker has processed `expected` records of `kinds`, give the stage-2 timers `settle_s` to judge what the
    end of the input left open (a hang), and return the anomalies per job."""
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
        deadline = time.monotonic() + timeout
        while _events(port, kinds) < expected:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"worker processed {_events(port, kinds):.0f} of {expected} records")
            time.sleep(0.5)
        time.sleep(settle_s)
        found: dict[str, list[dict]] = defaultdict(list)
        for a in follow_anomalies(s):
            found[a["job"]].append(a)
        return found
    finally:
        stop_process(worker, 20)
        if broker is not None:
            broker.stop()
