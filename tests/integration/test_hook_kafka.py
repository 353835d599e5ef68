"""TrainingMonitor publishing straight to Kafka, read back by the worker's topic contract."""

from __future__ import annotations

from rankwatch.producers.training import TrainingMonitor

from .conftest import read_topic


def test_monitor_publishes_step_metrics_to_the_metrics_topic(settings, tmp_path):
    mon = TrainingMonitor(tmp_path / "exp9", rank=5, settings=settings)
    for step in range(30):
        mon.observe(step, 2.0 - step * 0.01, 1.0, lr=3e-4)
    mon.close()
    recs = read_topic(settings, settings.topic_metrics)
    assert sorted(r["data"]["step"] for r in recs) == list(range(30))
    assert all(r["job"] == "exp9" and r["rank"] == 5 and r["kind"] == "metrics" for r in recs)
    assert recs[0]["data"]["lr"] == 3e-4
    assert not (tmp_path / "exp9" / "metrics").exists()  # Kafka configured: no JSON lines written
