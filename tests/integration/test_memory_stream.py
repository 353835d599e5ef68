"""GPU samples through the real broker and worker: `producer --gpu --replay` -> OOM forecast anomaly; and the
cross-GPU imbalance verdict with two workers equals `rankwatch analyze`'s."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from rankwatch.processors.offline import analyze
from rankwatch.producers.shipper import Shipper, ShipperConfig

from rankwatch.sim_memory import imbalance_job, leak_run, write_jsonl

from .conftest import WorkerProcess, read_topic, settings_env
from .test_end_to_end import metric_value, scrape, wait_for


def test_producer_gpu_replay_through_the_worker_gives_an_oom_forecast(settings, worker, tmp_path):
    run = leak_run(3, "50MB/s")
    rec = tmp_path / "node000-gpu0.jsonl"
    n = write_jsonl(run, str(rec))
    logs = tmp_path / "llm-memory"
    logs.mkdir()
    (logs / "rank_0.log").write_text("".join(f'{{"ts": {1e9 + i}, "step": {i}, "loss": 2.0}}\n' for i in range(30)))
    # one process tails the logs and replays the GPU samples (as it would sample the GPUs)
    p = subprocess.run([sys.executable, "-m", "rankwatch.producers.shipper", "--tail", str(logs), "--once",
                        "--checkpoint", str(tmp_path / "c.json"), "--gpu", "--replay", str(rec), "--speed", "0",
                        "--job", "llm-memory", "--metrics-port", "0"],
                       env=settings_env(settings), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    wait_for(lambda: metric_value(scrape(worker.metrics_port), "rankwatch_events_total", 'kind="gpu"') >= n, 90,
             "the worker to consume every GPU sample")
    assert metric_value(scrape(worker.metrics_port), "rankwatch_events_total", 'kind="metrics"') >= 30

    def forecasts():
        return [a for a in read_topic(settings, settings.topic_anomalies) if a["detector"] == "oom"] or None

    ooms = wait_for(forecasts, 30, "an oom anomaly")
    first = min(ooms, key=lambda a: a["event_time"])
    assert first["job"] == "llm-memory" and first["host"] == "node000" and first["gpu"] == 0
    ctx = first["context"]
    assert ctx["risk_level"] in ("high", "critical") and ctx["predicted_oom_time_seconds"] > 0
    assert {"growth_rate_mb_per_sec", "current_usage_percent", "recommendation", "confidence"} <= set(ctx)
    assert len(ooms) <= 8  # raised, then updated as the ETA shrinks: not one per sample
    text = scrape(worker.metrics_port)
    assert 'rankwatch_gpu_memory_used_ratio{gpu="0",host="node000",job="llm-memory"}' in text
    assert "rankwatch_gpu_oom_risk_level" in text and "rankwatch_gpu_memory_peak_bytes" in text
    # the memory report from the GPU topic: the users' JSON and a plot of the GPU with its forecast
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "rankwatch.cli", "memory", "report", "--from-topic", "--out", str(out)],
                       env=settings_env(settings), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "memory_report.json").read_text())
    dev = report["devices"]["node000/0"]
    assert dev["statistics"]["num_snapshots"] == n and dev["risk_assessment"]["risk_level"] in ("high", "critical")
    assert (out / "node000-gpu0.png").stat().st_size > 10_000


def test_imbalance_verdict_with_two_workers_equals_analyze(settings, tmp_path):
    runs = imbalance_job(4, True, duration=420.0)
    job = tmp_path / "imb-job"
    job.mkdir()
    n = sum(write_jsonl(r, str(job / f"{r.host}-gpu{r.gpu}.jsonl")) for r in runs)
    offline = {a.id: a for a in analyze([str(job)])}
    imbalanced = [a for a in offline.values() if a.detector == "imbalance"]
    assert [f"{a.host}/{a.gpu}" for a in imbalanced] == [runs[0].labels["victim"]]
    workers = [WorkerProcess(settings), WorkerProcess(settings)]  # one consumer group, 4 partitions
    try:
        sh = Shipper([str(job)], settings, ShipperConfig(checkpoint=str(tmp_path / "c.json"), metrics_port=0))
        assert sh.run_until_idle(0.5) == n
        sh.close()

        def consumed() -> float:
            return sum(metric_value(scrape(w.metrics_port), "rankwatch_events_total", 'kind="gpu"') for w in workers)

        wait_for(lambda: consumed() >= n, 120, "both workers to consume every GPU sample")
        assert all(metric_value(scrape(w.metrics_port), "rankwatch_events_total", 'kind="gpu"') > 0
                   for w in workers), "one worker took every partition: not a two-worker run"
        deadline = time.monotonic() + 30
        while True:
            streamed = {a["id"]: a for a in read_topic(settings, settings.topic_anomalies)}
            if {a.id for a in imbalanced} <= set(streamed) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    finally:
        for w in workers:
            w.stop()
    verdict = lambda xs: sorted((a["detector"], a["host"], a["gpu"], a["rank"], a["event_time"]) for a in xs  # noqa: E731
                                if a["detector"] == "imbalance")
    assert verdict(streamed.values()) == verdict(a.to_dict() for a in imbalanced)
    assert set(streamed) == set(offline)  # the per-GPU detectors agree as well
