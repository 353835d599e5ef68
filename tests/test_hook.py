"""TrainingMonitor: local detection, batch capture layout, non-blocking publishing, DDP."""

from __future__ import annotations

import json
import random
import threading
import time

import orjson
import pytest
import torch
from rankwatch.models.training import THRESHOLD_INFO_FIELDS
from rankwatch.producers.training import TrainingMonitor


def test_anomaly_saves_batch_and_record_in_the_documented_layout(tmp_path):
    rng = random.Random(0)
    mon = TrainingMonitor(tmp_path, rank=3, loss_threshold_factor=6.0)
    mon.set_checkpoint("/ckpt/run/checkpoint-40")
    for step in range(60):
        assert mon.observe(step, torch.tensor(2.0 + rng.gauss(0, 0.02)), 1.0 + rng.gauss(0, 0.05),
                           batch={"input_ids": torch.arange(8).reshape(2, 4)}, lr=1e-4) == []
    batch = {"input_ids": torch.arange(12).reshape(3, 4), "labels": torch.ones(3, dtype=torch.long)}
    found = mon.observe(60, 9.5, 1.0, batch=batch)
    assert [(a.detector, a.signal) for a in found] == [("mad", "loss")]
    mon.close()
    lines = (tmp_path / "anomalies" / "anomalies_rank_3.jsonl").read_bytes().splitlines()
    assert len(lines) == 1
    rec = orjson.loads(lines[0])
    assert {"step", "rank", "timestamp", "loss", "grad_norm", "batch_info", "model_checkpoint", "threshold_info",
            "data_dir"} <= set(rec)
    assert rec["step"] == 60 and rec["rank"] == 3 and rec["loss"] == 9.5
    assert rec["model_checkpoint"] == "/ckpt/run/checkpoint-40"
    assert set(rec["threshold_info"]) <= set(THRESHOLD_INFO_FIELDS) and "loss_threshold" in rec["threshold_info"]
    assert rec["data_dir"].startswith("anomalies/data/step_60_rank_3_")
    assert rec["batch_info"]["input_ids_shape"] == [3, 4]
    saved = torch.load(tmp_path / rec["batch_info"]["input_ids_path"], weights_only=True)
    assert torch.equal(saved, batch["input_ids"])
    assert torch.equal(torch.load(tmp_path / rec["batch_info"]["labels_path"], weights_only=True), batch["labels"])
    metrics = [json.loads(x) for x in (tmp_path / "metrics" / "metrics_rank_3.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(61)) and metrics[0]["lr"] == 1e-4 and metrics[0]["rank"] == 3


def test_metrics_jsonl_is_what_the_shipper_parses(tmp_path):
    from rankwatch.processors.offline import analyze

    mon = TrainingMonitor(tmp_path / "exp", rank=1)
    rng = random.Random(1)
    for step in range(80):
        mon.observe(step, 2.0 + rng.gauss(0, 0.02) + (5.0 if step == 70 else 0.0), 1.0)
    mon.close()
    offline = analyze([str(tmp_path / "exp" / "metrics")], job="exp")
    assert [(a.rank, a.context["step"], a.signal) for a in offline] == [(1, 70, "loss")]


def test_observe_never_waits_for_a_slow_sink_and_counts_drops(tmp_path):
    release = threading.Event()
    published = []

    def slow(rec):
        release.wait(10)
        published.append(rec)

    mon = TrainingMonitor(tmp_path, rank=0, queue_size=4, publisher=slow)
    t = time.perf_counter()
    for step in range(200):
        mon.observe(step, 1.0, 1.0)
    elapsed = time.perf_counter() - t
    release.set()
    mon.close()
    assert mon.dropped["publish"] >= 190  # the sink was stuck: almost everything had to be dropped ...
    assert len(published) + mon.dropped["publish"] == 200  # ... and every step is either published or counted
    assert elapsed < 5.0  # while the sink blocked for up to 10 s per item, observe did not wait on it


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_one_monitor_per_rank_under_ddp(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path), _free_port()), nprocs=2, join=True)
    bad = [orjson.loads(x) for x in (tmp_path / "anomalies" / "anomalies_rank_1.jsonl").read_bytes().splitlines()]
    assert [r["step"] for r in bad] == [45]
    assert ("mad", "loss") in {(a["detector"], a["signal"]) for a in bad[0]["anomalies"]}
    peer = tmp_path / "anomalies" / "anomalies_rank_0.jsonl"
    if peer.exists():  # DDP averages gradients, so rank 0 may see the grad-norm spike; never the loss spike
        recs = [orjson.loads(x) for x in peer.read_bytes().splitlines()]
        assert [r["step"] for r in recs] == [45]
        assert {a["signal"] for a in recs[0]["anomalies"]} == {"grad_norm"}
    x = torch.load(tmp_path / bad[0]["batch_info"]["x_path"], weights_only=True)
    assert x.shape == (16, 8) and x.abs().max() > 50  # the corrupted batch was captured


def _free_port() -> int:
    from rankwatch.broker import free_port

    return free_port()


def _ddp_worker(rank: int, world: int, out: str, port: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(100 + rank)
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(7))
    mon = TrainingMonitor(out, rank=rank, loss_threshold_factor=8.0, grad_norm_threshold_factor=12.0)
    for step in range(60):
        x = torch.randn(16, 8, generator=g)
        if rank == 1 and step == 45:
            x = x * 100  # a corrupted batch on rank 1
        y = x @ w
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # pre-clip norm; clipping keeps it stable
        mon.observe(step, loss, gn, batch={"x": x, "y": y})
        opt.step()
    mon.close()
    # both ranks past their last collective before either tears gloo down: a peer closing its pairs while the
    # other still used them aborted a process now and then ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()
