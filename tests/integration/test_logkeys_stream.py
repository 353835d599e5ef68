"""Log keys through the real stream: two workers in one group share one vocabulary per job (the job's stage 2
lives on one of them) and give the verdicts `rankwatch analyze` gives; a known-good run's topics train a model
whose key ids are the ones the stream published."""

from __future__ import annotations

import time
import urllib.request

import orjson
import pytest
from kafka import KafkaProducer
from rankwatch.processors.logkey_stage import LogKeyJob
from rankwatch.processors.offline import read_records, run_pipeline
from rankwatch.processors.pipeline import DetectionConfig, Pipeline

from rankwatch.deeplog.config import load_deeplog_config
from rankwatch.deeplog.model import load_checkpoint
from rankwatch.records import encode_record
from rankwatch.sim_logs import LogFault, LogScenario, write_log_job

from .conftest import WorkerProcess, make_settings, read_topic

ENV = {"RANKWATCH_DEEPLOG_BOOTSTRAP_LINES": "800", "RANKWATCH_DEEPLOG_BOOTSTRAP_STEPS": "200"}


def _events(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("rankwatch_events_total{"))


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _send(settings, records) -> None:
    producer = KafkaProducer(**settings.kafka_kwargs(), acks="all", linger_ms=5)
    topics = settings.topics()
    for rec in records:
        producer.send(topics[rec.family()], key=rec.key().encode(), value=encode_record(rec))
    producer.flush()
    producer.close()


@pytest.mark.timeout(240)
def test_two_workers_one_vocabulary_same_verdicts_as_analyze(broker, tmp_path):
    settings = make_settings(broker.bootstrap, partitions=4)
    sc = LogScenario(ranks=4, steps=1500, seed=5, checkpoint_every=1000, eval_every=800, eval_offset=800,
                     lr_milestones=(1300,), epoch_steps=1200)
    sc.faults = [LogFault("nccl_net", 2, 1000, 2), LogFault("out_of_order", 1, 1200, 3),
                 LogFault("cuda_error", 3, 1450, 2)]
    write_log_job(sc, tmp_path / "job")
    records = list(read_records([str(tmp_path / "job")]))
    ref_pipe = Pipeline(DetectionConfig(deeplog_bootstrap_lines=800, deeplog_bootstrap_steps=200))
    ref = [a for a in run_pipeline(ref_pipe, records) if a.detector == "deeplog"]
    ref_templates = ref_pipe.jobs["job"].detector(LogKeyJob).det.miner.templates()
    assert len(ref) >= 3

    workers = [WorkerProcess(settings, env_extra=ENV) for _ in range(2)]
    try:
        # both workers consuming before the job starts (a group forms in ~5 s on the embedded broker)
        warmup = [r for r in read_records([str(tmp_path / "job")], job="warmup") if r.kind == "log"][:400]
        for i, r in enumerate(warmup):
            r.rank = i % 8
        _send(settings, warmup)
        _wait(lambda: all(_events(w.metrics_port) > 0 for w in workers), 90, "both workers to consume")
        _send(settings, records)  # event-time order, ranks interleaved: as live shippers deliver them

        def deeplog_anomalies():
            found = [a for a in read_topic(settings, settings.topic_anomalies)
                     if a["detector"] == "deeplog" and a["job"] == "job"]
            return found if len(found) >= len(ref) else None

        _wait(deeplog_anomalies, 90, f"{len(ref)} log-key anomalies")
        time.sleep(3)  # nothing more arrives
        got = deeplog_anomalies()
    finally:
        for w in workers:
            w.stop()
    assert sorted(a["id"] for a in got) == sorted(a.id for a in ref)
    published: dict[int, str] = {}
    for value in read_topic(settings, settings.topic_logkeys):
        if value["job"] == "job":
            published[value["template_id"]] = value["template"]  # compacted: the latest per id wins
    assert published == ref_templates

    # a known-good run's topics train a model whose keys are the ids the stream published
    cfg = load_deeplog_config(None, {"output_dir": str(tmp_path / "model"), "training.num_epochs": 1,
                                     "training.batch_size": 64, "training.threads": 1, "training.device": "cpu",
                                     "model.hidden_size": 16, "model.embedding_dim": 8, "data.job": "job"})
    from rankwatch.deeplog.train import train

    res = train(cfg, settings=settings, evaluate_after=False)
    _, vocab, _ = load_checkpoint(res["best_model"])
    assert {int(k): t for k, t in vocab.templates.items()} == ref_templates
    assert vocab.keys[2:] and all(int(k) in ref_templates for k in vocab.keys[2:])
    assert orjson.dumps(vocab.miner)  # the miner travels with the model
