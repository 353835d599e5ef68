"""In-training hook: two lines in a training loop give live, per-rank detection plus the evidence to debug it.

    monitor = TrainingMonitor("runs/exp1", rank=dist.get_rank())
    ...
    monitor.observe(step, loss.item(), grad_norm, batch={"input_ids": x, "labels": y})

Each step's metrics are published (to Kafka when `bootstrap` is set, else as JSON lines under
`output_dir/metrics/` that `producer --tail` ships) and judged locally by the same pipeline as the service. On a
local anomaly the batch is saved, with a record, under `output_dir/anomalies/` (layout in docs/HOOK.md).
Publishing and saving run on a background thread behind a bounded queue: `observe` never waits for I/O, and what
had to be dropped is counted (`monitor.dropped`) and logged.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from rankwatch.processors.pipeline import DetectionConfig, Pipeline

from rankwatch.config import Settings
from rankwatch.records import Anomaly, Record, encode_record

log = logging.getLogger("rankwatch.hook")
_STOP = object()


def _scalar(x: Any) -> float | None:
    if x is None:
        return None
    if hasattr(x, "detach"):  # a torch tensor: one sync, as loss.item() would be
        x = x.detach().float().item()
    return float(x)


def _named_tensors(batch: Any) -> dict[str, Any]:
    if batch is None:
        return {}
    if isinstance(batch, dict):
        return {str(k): v for k, v in batch.items() if hasattr(v, "detach")}
    if isinstance(batch, (list, tuple)):
        return {f"batch_{i}": v for i, v in enumerate(batch) if hasattr(v, "detach")}
    return {"batch": batch} if hasattr(batch, "detach") else {}


class TrainingMonitor:
    """One per rank (DDP: one per process). Same defaults as the service's detectors."""

    def __init__(self, output_dir: str | os.PathLike[str], rank: int, window_size: int = 50,
                 loss_threshold_factor: float | None = None, grad_norm_threshold_factor: float | None = None,
                 fixed_loss_threshold: float | None = None, fixed_grad_norm_threshold: float | None = None,
                 *, job: str | None = None, bootstrap: str | None = None, settings: Settings | None = None,
                 queue_size: int = 1024, save_batches: bool = True,
                 publisher: Callable[[Record], None] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.output_dir = Path(output_dir)
        self.rank = rank
        self.job = job or self.output_dir.resolve().name
        self.clock = clock
        self.save_batches = save_batches
        cfg = DetectionConfig(window=window_size, fixed_loss_threshold=fixed_loss_threshold,
                              fixed_grad_norm_threshold=fixed_grad_norm_threshold)
        if loss_threshold_factor is not None:
            cfg.loss_threshold_factor = loss_threshold_factor
        if grad_norm_threshold_factor is not None:
            cfg.grad_norm_threshold_factor = grad_norm_threshold_factor
        self.pipeline = Pipeline(cfg)
        self.dropped = {"publish": 0, "save": 0}
        self.anomalies_seen = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._producer = None
        self._metrics_fh = None
        settings = settings or Settings()
        if bootstrap:
            settings.bootstrap = bootstrap
        if publisher is not None:
            self._publish = publisher
        elif settings.bootstrap:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(**settings.kafka_kwargs(), acks="all", enable_idempotence=True,
                                           linger_ms=50)
            topic = settings.topic_metrics
            self._publish = lambda rec: self._producer.send(topic, key=rec.key().encode(),
                                                            value=encode_record(rec))
        else:
            self._publish = self._write_jsonl
        self._thread = threading.Thread(target=self._run, name=f"rankwatch-monitor-{rank}", daemon=True)
        self._thread.start()

    # ---- training thread --------------------------------------------------------------------------------
    def set_checkpoint(self, path: str) -> None:
        """Tell the monitor which checkpoint the coming steps start from (recorded with anomalies)."""
        self.pipeline.checkpoints[(self.job, self.rank)] = str(path)

    def observe(self, step: int, loss: Any, grad_norm: Any = None, batch: Any = None, **extra: Any
                ) -> list[Anomaly]:
        """Publish this step's metrics and judge them. Returns the anomalies found (usually none)."""
        data: dict[str, Any] = {"step": int(step)}
        for name, value in (("loss", loss), ("grad_norm", grad_norm), *extra.items()):
            v = _scalar(value) if name in ("loss", "grad_norm") or hasattr(value, "detach") else value
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                data[name] = float(v)
        rec = Record("metrics", self.job, self.rank, self.clock(), "", -1, data)
        self._offer(("publish", rec), "publish")
        found = self.pipeline.process_one(rec)
        if found:
            self.anomalies_seen += len(found)
            tensors = {k: v.detach() for k, v in _named_tensors(batch).items()} if self.save_batches else {}
            self._offer(("anomaly", rec, found, tensors), "save")
        return found

    def _offer(self, item: tuple, kind: str) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped[kind] += 1
            if self.dropped[kind] in (1, 10, 100) or self.dropped[kind] % 1000 == 0:
                log.warning("rank %d: monitor queue full, %d %s items dropped so far (training is not slowed)",
                            self.rank, self.dropped[kind], kind)

    # ---- background thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if item[0] == "publish":
                    self._publish(item[1])
                else:
                    self._save_anomaly(*item[1:])
            except Exception:  # noqa: BLE001 - a broken sink must never take down training
                log.exception("rank %d: monitor could not handle %s", self.rank, item[0])
            finally:
                self._queue.task_done()

    def _write_jsonl(self, rec: Record) -> None:
        if self._metrics_fh is None:
            d = self.output_dir / "metrics"
            d.mkdir(parents=True, exist_ok=True)
            self._metrics_fh = open(d / f"metrics_rank_{self.rank}.jsonl", "ab")  # noqa: SIM115
        line = {"ts": rec.ts, "rank": self.rank, **rec.data}
        self._metrics_fh.write(orjson.dumps(line) + b"\n")
        self._metrics_fh.flush()

    def _save_anomaly(self, rec: Record, found: list[Anomaly], tensors: dict[str, Any]) -> None:
        import torch

        step = rec.data["step"]
        stamp = datetime.fromtimestamp(rec.ts, tz=timezone.utc).strftime("%Y%m%d_%H%M%S")
        base = self.output_dir / "anomalies"
        data_dir = base / "data" / f"step_{step}_rank_{self.rank}_{stamp}"
        batch_info: dict[str, Any] = {}
        if tensors:
            data_dir.mkdir(parents=True, exist_ok=True)
            for name, t in tensors.items():
                path = data_dir / f"{name}.pt"
                torch.save(t.cpu(), path)  # CUDA tensors are copied to CPU here, off the training thread
                batch_info[f"{name}_shape"] = list(t.shape)
                batch_info[f"{name}_path"] = str(path.relative_to(self.output_dir))
        ctx = found[0].context
        record = {
            "step": step, "rank": self.rank, "timestamp": datetime.fromtimestamp(rec.ts, tz=timezone.utc).isoformat(),
            "loss": rec.data.get("loss"), "grad_norm": rec.data.get("grad_norm"), "batch_info": batch_info,
            "model_checkpoint": ctx.get("model_checkpoint"), "threshold_info": ctx.get("threshold_info", {}),
            "data_dir": str(data_dir.relative_to(self.output_dir)) if tensors else None,
            "anomalies": [{"detector": a.detector, "signal": a.signal, "severity": a.severity,
                           "message": a.message} for a in found],
        }
        base.mkdir(parents=True, exist_ok=True)
        with open(base / f"anomalies_rank_{self.rank}.jsonl", "ab") as fh:
            fh.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is published and saved. Returns False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        if self._producer is not None:
            self._producer.flush(timeout=max(0.0, deadline - time.monotonic()))
        return True

    def close(self) -> None:
        self.flush()
        self._queue.put(_STOP)
        self._thread.join(10)
        if self._producer is not None:
            self._producer.close(timeout=10)
        if self._metrics_fh is not None:
            self._metrics_fh.close()
        if any(self.dropped.values()):
            log.warning("rank %d: monitor dropped %s items over the run", self.rank, self.dropped)

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
