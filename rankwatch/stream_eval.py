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


def _scrape(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return ""


def _events(port: int) -> float:
    for line in _scrape(port).splitlines():
        if line.startswith('rankwatch_events_total{kind="metrics"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _published(port: int) -> float:
    """Anomalies the worker has handed to its producer (they reach the topic later, when flushed)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in _scrape(port).splitlines()
               if line.startswith("rankwatch_anomalies_total{"))


def _worker_log():
    """The worker's stderr: discarded, or kept in RANKWATCH_EVAL_WORKER_LOG to diagnose a run."""
    path = os.environ.get("RANKWATCH_EVAL_WORKER_LOG")
    return open(path, "ab") if path else subprocess.DEVNULL  # noqa: SIM115 - the child owns the handle


def run_stream(scenarios: list[Scenario], root: str, bootstrap: str | None = None,
               timeout: float = 600.0, expected_metrics: int | None = None) -> dict[str, list[dict]]:
    """Ship every job folder below `root` through a real broker and worker; anomalies by job. The worker is done
    when it has seen `expected_metrics` metrics records (default: one per rank and step of the scenarios)."""
    from rankwatch.producers.shipper import Shipper, ShipperConfig

    broker = None
    worker = None
    try:
        if not bootstrap:
            broker = EmbeddedBroker().start()
            bootstrap = broker.bootstrap
        s = Settings(bootstrap=bootstrap, app_id=f"rankwatch-eval-{int(time.time())}")
        tag = s.app_id.rsplit("-", 1)[1]
        for name in ("logs", "metrics", "ops", "gpu", "logkeys", "deadletter"):
            setattr(s, f"topic_{name}", f"eval{tag}.{name}")
        s.topic_anomalies = f"eval{tag}.anomalies"
        ensure_topics(s)
        port = free_port()
        env = {**os.environ, **s.env()}
        worker = subprocess.Popen([sys.executable, "-m", "rankwatch.cli", "worker", "--embedded",
                                   "--metrics-port", str(port)], env=env, preexec_fn=die_with_parent,
                                  stdout=subprocess.DEVNULL, stderr=_worker_log())
        with tempfile.TemporaryDirectory() as state:
            sh = Shipper([root], s, ShipperConfig(checkpoint=os.path.join(state, "c.json"), metrics_port=0))
            sh.config.job = None
            sh.resolver.job = None
            # one job per scenario folder: the job is the first folder below the root
            sh.resolver.roots = [os.path.join(root, d) for d in sorted(os.listdir(root))]
            sh.run_until_idle(1.0)
            sh.close()
        want = expected_metrics if expected_metrics is not None else sum(sc.ranks * sc.steps for sc in scenarios)
        deadline = time.monotonic() + timeout
        while _events(port) < want:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"worker processed {_events(port):.0f} of {want} metric records")
            time.sleep(0.5)
        # The counter moves when a batch is decoded; its anomalies are produced after detection and handed to
        # Faust's producer, which can hold a send for seconds on a busy machine. Read the topic until it holds
        # every anomaly the worker published and nothing new has been published or read for 5 s.
        found: dict[str, list[dict]] = defaultdict(list)
        settle_until = time.monotonic() + 180.0
        last, quiet = (-1.0, -1), 0
        while quiet < 5 and time.monotonic() < settle_until:
            time.sleep(1.0)
            anomalies = list(follow_anomalies(s))
            now = (_published(port), len(anomalies))
            quiet = quiet + 1 if now == last and now[1] >= now[0] else 0
            last = now
        if os.environ.get("RANKWATCH_EVAL_WORKER_LOG"):
            print(f"stream eval: {_events(port):.0f} of {want} metrics records, {last[0]:.0f} anomalies "
                  f"published, {last[1]} read", file=sys.stderr)
        for a in anomalies:
            found[a["job"]].append(a)
        return found
    finally:
        stop_process(worker, 20)
        if broker is not None:
            broker.stop()
