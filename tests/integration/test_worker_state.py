"""A restarted worker keeps its detectors' learned state (--state-file): no blind warm-up after a restart."""

from __future__ import annotations

import json
import random
import threading
import time

from rankwatch.producers.shipper import Shipper, ShipperConfig

from rankwatch.consume import follow_anomalies

from .conftest import WorkerProcess
from .test_end_to_end import metric_value, scrape, wait_for


def next_within(gen, timeout: float):
    box: list = []
    t = threading.Thread(target=lambda: box.append(next(gen)), daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else None


def test_restarted_worker_detects_at_once_with_its_saved_state(settings, tmp_path):
    state = tmp_path / "worker-state.json"
    logdir = tmp_path / "restart-job"
    logdir.mkdir()
    sh = Shipper([str(logdir)], settings, ShipperConfig(checkpoint=str(tmp_path / "c.json"), metrics_port=0,
                                                          poll_interval_s=0.05))
    threading.Thread(target=sh.run, daemon=True).start()
    rng = random.Random(8)
    f = logdir / "rank_0.log"
    step = 0

    def write(loss: float) -> None:
        nonlocal step
        with open(f, "a") as fh:
            fh.write(json.dumps({"ts": 5000.0 + step, "step": step, "loss": loss}) + "\n")
        step += 1

    for _ in range(60):
        write(2.0 + rng.gauss(0, 0.02))
    first = WorkerProcess(settings, "--state-file", str(state))
    wait_for(lambda: metric_value(scrape(first.metrics_port), "rankwatch_events_total", 'kind="metrics"') >= 60,
             60, "the first worker to learn 60 steps")
    first.stop()  # SIGTERM: the state is saved on the way out
    saved = json.loads(state.read_text())
    assert saved["pipeline"]["handlers"]["metrics/MetricsHandler"]["ranks"][0][:2] == ["restart-job", 0]

    # A new consumer group that starts at the log end sees none of the 60 steps: only the state can help it.
    settings.app_id += "-restarted"
    second = WorkerProcess(settings, "--state-file", str(state), env_extra={"RANKWATCH_START_FROM": "latest"})
    try:
        deadline = time.monotonic() + 60
        while metric_value(scrape(second.metrics_port), "rankwatch_events_total", 'kind="metrics"') < 1:
            assert time.monotonic() < deadline, "second worker never consumed"
            write(2.0 + rng.gauss(0, 0.02))  # until the new group has joined and reads from the end
            time.sleep(0.5)
        anomalies = follow_anomalies(settings, follow=True, from_beginning=False, poll_ms=50)
        spike_step = step
        write(9.0)
        a = next_within(anomalies, 30)
        assert a is not None, "no anomaly: the restarted worker did not restore its state"
        assert a["context"]["step"] == spike_step and a["signal"] == "loss" and a["detector"] == "mad"
        assert metric_value(scrape(second.metrics_port), "rankwatch_events_total", 'kind="metrics"') < 20
    finally:
        second.stop()
        sh.stop_event.set()
