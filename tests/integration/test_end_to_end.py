"""Lines written to files become anomalies on the topic, through the real shipper, broker and Faust worker."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request

import jsonschema
import pytest
from kafka import KafkaProducer
from rankwatch.processors.offline import analyze
from rankwatch.producers.shipper import Shipper, ShipperConfig

from rankwatch.consume import follow_anomalies
from rankwatch.simulate import Fault, Scenario, write_job

from .conftest import read_topic


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""  # the worker is still starting


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` whose labels include every `k="v"` in `labels`."""
    wanted = [lab for lab in labels.split(",") if lab]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            series, value = line.rsplit(" ", 1)
            if all(w in series for w in wanted):
                total += float(value)
    return total


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_line_written_becomes_anomaly_within_seconds(settings, worker, tmp_path, anomaly_schema):
    logdir = tmp_path / "e2e-job"
    logdir.mkdir()
    sh = Shipper([str(logdir)], settings, ShipperConfig(checkpoint=str(tmp_path / "c.json"), metrics_port=0,
                                                          poll_interval_s=0.02))
    threading.Thread(target=sh.run, daemon=True).start()
    rng = random.Random(3)
    f = logdir / "rank_1.log"
    with open(f, "a") as fh:
        for step in range(60):
            fh.write(json.dumps({"ts": 1000.0 + step, "step": step, "loss": 2.0 + rng.gauss(0, 0.02),
                                 "grad_norm": 1.0 + rng.gauss(0, 0.05)}) + "\n")
    wait_for(lambda: metric_value(scrape(worker.metrics_port), "rankwatch_events_total", 'kind="metrics"') >= 60,
             60, "the worker to consume the baseline")
    latencies = []
    anomalies = follow_anomalies(settings, follow=True, from_beginning=False, poll_ms=50)
    for i, step in enumerate((60, 61)):
        with open(f, "a") as fh:
            fh.write(json.dumps({"ts": 1000.0 + step, "step": step, "loss": 9.0 + i, "grad_norm": 1.0}) + "\n")
        t0 = time.monotonic()
        a = next(anomalies)
        latencies.append(time.monotonic() - t0)
        assert a["rank"] == 1 and a["signal"] == "loss" and a["detector"] == "mad" and a["context"]["step"] == step
        assert a["source"]["file"] == str(f) and a["job"] == "e2e-job"
        jsonschema.validate(a, anomaly_schema)
    print(f"line-written -> anomaly-published latency: {[round(x * 1000) for x in latencies]} ms")
    assert max(latencies) < 5.0

    # A message that is not a record: dead-lettered and counted, and the worker keeps going.
    p = KafkaProducer(**settings.kafka_kwargs())
    p.send(settings.topic_metrics, key=b"x/1", value=b"\x00garbage")
    p.flush()
    p.close()
    with open(f, "a") as fh:
        fh.write('{"step": "eleven", "loss": 1.0}\n')  # the shipper dead-letters it; the worker counts it

    def decode_error_counted() -> str | None:
        t = scrape(worker.metrics_port)
        # the dead-letter counter sees each dead letter when its own agent reads the topic, in no fixed order
        ok = (metric_value(t, "rankwatch_decode_errors_total") >= 1
              and metric_value(t, "rankwatch_parse_errors_total", 'stage="parse",job="e2e-job"') >= 1
              and metric_value(t, "rankwatch_parse_errors_total", 'stage="decode"') >= 1)
        return t if ok else None

    text = wait_for(decode_error_counted, 30, "the decode error to be counted")
    dl = [d for d in read_topic(settings, settings.topic_deadletter) if d.get("stage") == "decode"]
    assert len(dl) == 1 and dl[0]["raw"].endswith("garbage")
    assert metric_value(text, "rankwatch_anomalies_total", 'detector="mad",severity="critical"') >= 2
    # every record counted; the latency histogram observes each message once (a pack's records share its age)
    assert metric_value(text, "rankwatch_events_total", 'kind="metrics"') >= 62
    assert 1 <= metric_value(text, "rankwatch_processing_latency_seconds_count") <= 62
    assert 'rankwatch_latest_score{detector="mad",job="e2e-job",signal="loss"}' in text
    assert "rankwatch_consumer_lag" in text
    sh.stop_event.set()


def test_streaming_and_offline_give_the_same_anomalies(settings, worker, tmp_path, anomaly_schema):
    job = tmp_path / "parity-job"
    sc = Scenario(ranks=4, steps=160, seed=11, faults=[
        Fault("loss_spike", 1, 90, magnitude=2.5), Fault("grad_explosion", 2, 120, magnitude=10.0),
        Fault("nonfinite", 3, 140)])
    n_lines = write_job(sc, job)
    sh = Shipper([str(job)], settings, ShipperConfig(checkpoint=str(tmp_path / "c.json"), metrics_port=0))
    assert sh.run_until_idle(0.5) == n_lines
    sh.close()
    offline = {a.id: a.to_dict() for a in analyze([str(job)])}
    assert len(offline) >= 3
    wait_for(lambda: metric_value(scrape(worker.metrics_port), "rankwatch_events_total", 'kind="metrics"')
             >= sc.ranks * sc.steps, 90, "the worker to process every metrics record")
    # the counter moves when a batch is decoded; its anomalies are published after detection
    streamed = wait_for(lambda: (d := {a["id"]: a for a in read_topic(settings, settings.topic_anomalies)})
                        and len(d) >= len(offline) and d, 30, "the anomalies to reach the topic")
    time.sleep(1.0)
    streamed = {a["id"]: a for a in read_topic(settings, settings.topic_anomalies)}
    assert set(streamed) == set(offline)
    for aid, a in streamed.items():
        jsonschema.validate(a, anomaly_schema)
        b = offline[aid]
        assert {k: v for k, v in a.items() if k != "detected_at"} == {
            k: v for k, v in b.items() if k != "detected_at"}
    found = {(a["rank"], a["signal"], a["detector"], a["context"]["step"]) for a in streamed.values()}
    assert {(1, "loss", "mad", 90), (2, "grad_norm", "mad", 120), (3, "loss", "nonfinite", 140)} <= found
    assert all(a["context"]["lr"] == pytest.approx(3e-4) for a in streamed.values())  # lr is kept for context
    ckpt = {a["context"]["step"]: a["context"]["model_checkpoint"] for a in streamed.values()}
    assert ckpt[90] is None and ckpt[120] == ckpt[140] == "/ckpt/run/checkpoint-100"  # announced at step 100


@pytest.fixture(scope="session")
def anomaly_schema():
    from importlib.resources import files

    return json.loads(files("rankwatch").joinpath("schema/anomaly.v1.json").read_text())
