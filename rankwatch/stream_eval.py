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


def _scrape(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return ""


def events_processed(port: int, kinds: tuple[str, ...] = ("metrics",)) -> float:
    """Records of these kinds a worker has processed, from its /metrics."""
    total = 0.0
    for line in _scrape(port).splitlines():
        if any(line.startswith(f'rankwatch_events_total{{kind="{k}"}}') for k in kinds):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _behind(port: int) -> float:
    """Messages the worker has not read yet, over every topic it consumes (stage 2's summaries included)."""
    lines = [ln for ln in _scrape(port).splitlines() if ln.startswith("rankwatch_consumer_lag{")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) if lines else float("inf")


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
    """The training-metric scenarios: done once the worker has seen `expected_metrics` metrics records
    (default: every step of every rank of the scenarios)."""
    if expected_metrics is None:
        expected_metrics = sum(len(rows) for sc in scenarios for rows in metric_rows(sc).values())
    return run_stream_jobs(root, expected_metrics, bootstrap, timeout, kinds=("metrics",))


def run_stream_jobs(root: str, expected: int, bootstrap: str | None = None, timeout: float = 600.0,
                    kinds: tuple[str, ...] = ("metrics", "log", "op", "gpu"), settle_s: float = 0.0
                    ) -> dict[str, list[dict]]:
    """Ship every job folder under `root` (one job per folder) through a broker and a fresh worker, wait until
    the worker has processed `expected` records of `kinds`, give the stage-2 timers `settle_s` to judge what the
    end of the input left open (a hang), and return the anomalies per job."""
    from rankwatch.producers.shipper import Shipper, ShipperConfig

    broker = None
    worker = None
    try:
        if not bootstrap:
            broker = EmbeddedBroker().start()
            bootstrap = broker.bootstrap
        s = Settings(bootstrap=bootstrap, app_id=f"rankwatch-eval-{int(time.time() * 1000)}")
        s.use_topic_prefix(f"eval{s.app_id.rsplit('-', 1)[1]}")
        ensure_topics(s)
        with tempfile.TemporaryDirectory() as state:
            sh = Shipper([root], s, ShipperConfig(checkpoint=os.path.join(state, "c.json"), metrics_port=0))
            sh.config.job = None
            sh.resolver.job = None
            # one job per scenario folder: the job is the first folder below the root
            sh.resolver.roots = [os.path.join(root, d) for d in sorted(os.listdir(root))]
            sh.run_until_idle(1.0)
            sh.close()
        # The worker starts on the full backlog, as after a restart: one shipper reading hundreds of files of
        # a dozen jobs would otherwise deliver ranks far apart (live, each node's shipper keeps up with its own).
        port = free_port()
        env = {**os.environ, **s.env()}
        worker = subprocess.Popen([sys.executable, "-m", "rankwatch.cli", "worker", "--embedded",
                                   "--metrics-port", str(port)], env=env, preexec_fn=die_with_parent,
                                  stdout=subprocess.DEVNULL, stderr=_worker_log())
        deadline = time.monotonic() + timeout
        while events_processed(port, kinds) < expected:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"worker processed {events_processed(port, kinds):.0f} of {expected} records")
            time.sleep(0.5)
        while _behind(port) > 0 and time.monotonic() < deadline:  # stage 2 may still be reading summaries
            time.sleep(0.5)
        time.sleep(settle_s)
        # The counter moves when a batch is decoded; its anomalies are produced after detection and handed to
        # Faust's producer, which can hold a send for seconds on a busy machine. Read the topic until it holds
        # every anomaly the worker published and nothing new has been published or read for 5 s.
        found: dict[str, list[dict]] = defaultdict(list)
        settle_until = time.monotonic() + 180.0
        last, quiet = (-1.0, -1), 0
        anomalies: list[dict] = []
        while quiet < 5 and time.monotonic() < settle_until:
            time.sleep(1.0)
            anomalies = list(follow_anomalies(s))
            now = (_published(port), len(anomalies))
            quiet = quiet + 1 if now == last and now[1] >= now[0] else 0
            last = now
        if os.environ.get("RANKWATCH_EVAL_WORKER_LOG"):
            print(f"stream eval: {events_processed(port, kinds):.0f} of {expected} records, {last[0]:.0f} anomalies "
                  f"published, {last[1]} read", file=sys.stderr)
        for a in anomalies:
            found[a["job"]].append(a)
        return found
    finally:
        stop_process(worker, 20)
        if broker is not None:
            broker.stop()
