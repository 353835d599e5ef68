"""In-training hook: two lines in a training loop give live, per-rank detection plus the evidence to debug it.

    monitor = TrainingMonitor("runs/exp1", rank=dist.get_rank())
    ...
    monitor.observe(step, loss.item(), grad_norm, batch={"input_ids": x, "labels": y})

Each step's metrics are published (to Kafka when `bootstrap` is set, else as JSON lines under
`output_dir/metrics/` that `producer --tail` ships) and judged locally by the same pipeline as the service. On a
local anomaly the batch is saved, with a record, under `output_dir/anomalies/` (layout in docs/HOOK.md).
Publishing and saving run on a background thread behind a bounded queue: `observe` never waits for I/O, and what
had to be dropped is counted (`monitor.dropped`) and logged.

GPU memory (`gpu_memory`, on by default when torch.cuda is in use): every `memory_interval_s` the allocator's
stats are sampled (producers/memory_hook.py), published as a GPU sample and judged locally by the memory
detectors; `add_warning_callback(fn(device, prediction))` lets the training code act on an OOM forecast (e.g.
lower the batch size). With `track_host_memory` the samples carry the process's RSS, and memory anomalies the
top growing Python allocation sites (tracemalloc); `host_memory_report()` gives them on request. With
`memory_peaks` each sample also carries the most allocated since the previous one (torch's peak counters, reset
at each sample): the step's peak, which the OOM forecast then fits instead of whatever phase of the step the
sample caught.
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
from rankwatch.producers.memory_hook import MemoryProbe, cuda_in_use

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
                 publisher: Callable[[Record], None] | None = None, clock: Callable[[], float] = time.time,
                 gpu_memory: bool | None = None, memory_interval_s: float = 1.0,
                 memory_stats: Callable[[], dict[str, Any] | None] | None = None,
                 track_host_memory: bool = False, host: str | None = None, memory_peaks: bool = False) -> None:
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
        # None: decided at the first step (the model may move to the GPU after the monitor is made)
        self.gpu_memory = gpu_memory if memory_stats is None else (gpu_memory is not False)
        self.probe = MemoryProbe(memory_stats, memory_interval_s, host, track_host_memory, memory_peaks)
        self.warning_callbacks: list[Callable[[int | None, Any], None]] = []
        self.dropped = {"publish": 0, "save": 0}
        self.anomalies_seen = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._producer = None
        self._metrics_fh = None
        self._gpu_fh = None
        settings = settings or Settings()
        if bootstrap:
            settings.bootstrap = bootstrap
        if publisher is not None:
            self._publish = publisher
        elif settings.bootstrap:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(**settings.kafka_kwargs(), acks="all", enable_idempotence=True,
                                           linger_ms=50)
            topics = settings.topics()
            self._publish = lambda rec: self._producer.send(topics[rec.family()], key=rec.key().encode(),
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
        return found + self._memory(rec.ts, int(step))

    # ---- GPU memory -------------------------------------------------------------------------------------------
    def add_warning_callback(self, fn: Callable[[int | None, Any], None]) -> None:
        """`fn(device, prediction)` on every OOM forecast this rank's detectors raise or update: `device` is the
        GPU index, `prediction` an `OomPrediction` (`risk_level.value`, `predicted_oom_time_seconds`,
        `growth_rate_mb_per_sec`, `recommendation`, ...). Runs in the training thread, so it may act there."""
        self.warning_callbacks.append(fn)

    def host_memory_report(self, top: int = 10) -> dict[str, Any]:
        """RSS and the Python allocation sites that grew most since the last report (needs track_host_memory)."""
        if self.probe.tracker is None:
            raise RuntimeError("TrainingMonitor(..., track_host_memory=True) is needed for tracemalloc sites")
        return self.probe.tracker.report(top)

    def _memory(self, now: float, step: int) -> list[Anomaly]:
        if self.gpu_memory is None:
            self.gpu_memory = cuda_in_use()
        if not self.gpu_memory:
            return []
        data = self.probe.sample(now)
        if data is None:
            return []
        rec = Record("gpu", self.job, self.rank, now, "", -1, data)
        self._offer(("publish", rec), "publish")
        found = self.pipeline.process_one(rec)
        if not found:
            return []
        self.anomalies_seen += len(found)
        host_mem = self.probe.tracker.report() if self.probe.tracker is not None else None
        for a in found:
            a.context["step"] = step
            if host_mem is not None and a.detector in ("leak", "oom"):
                a.context["host_memory"] = host_mem
            if a.detector == "oom":
                self._warn(a)
        self._offer(("memory_anomaly", found), "save")
        return found

    def _warn(self, a: Anomaly) -> None:
        from rankwatch.processors.memory_stage import GpuMemoryHandler
        handler = self.pipeline.handler(GpuMemoryHandler)
        det = handler.gpus.get((a.job, str(a.host), int(a.gpu or 0)))  # type: ignore[attr-defined]
        prediction = det.prediction if det is not None else None
        for fn in self.warning_callbacks:
            try:
                fn(a.gpu, prediction)
            except Exception:  # noqa: BLE001 - a user's callback must not end training
                log.exception("rank %d: OOM warning callback failed", self.rank)

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
                elif item[0] == "memory_anomaly":
                    self._save_memory_anomalies(item[1])
                else:
                    self._save_anomaly(*item[1:])
            except Exception:  # noqa: BLE001 - a broken sink must never take down training
                log.exception("rank %d: monitor could not handle %s", self.rank, item[0])
            finally:
                self._queue.task_done()

    def _write_jsonl(self, rec: Record) -> None:
        # metrics/metrics_rank_N.jsonl and gpu/gpu_rank_N.jsonl: lines `producer --tail` ships as they are
        name = "gpu" if rec.kind == "gpu" else "metrics"
        fh = self._gpu_fh if rec.kind == "gpu" else self._metrics_fh
        if fh is None:
            d = self.output_dir / name
            d.mkdir(parents=True, exist_ok=True)
            fh = open(d / f"{name}_rank_{self.rank}.jsonl", "ab")  # noqa: SIM115
            if rec.kind == "gpu":
                self._gpu_fh = fh
            else:
                self._metrics_fh = fh
        line = {"ts": rec.ts, "rank": self.rank, **rec.data}
        fh.write(orjson.dumps(line) + b"\n")
        fh.flush()

    def _save_memory_anomalies(self, found: list[Anomaly]) -> None:
        base = self.output_dir / "anomalies"
        base.mkdir(parents=True, exist_ok=True)
        with open(base / f"memory_anomalies_rank_{self.rank}.jsonl", "ab") as fh:
            for a in found:
                fh.write(a.encode() + b"\n")

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
        for fh in (self._metrics_fh, self._gpu_fh):
            if fh is not None:
                fh.close()
        self.probe.close()
        if any(self.dropped.values()):
            log.warning("rank %d: monitor dropped %s items over the run", self.rank, self.dropped)

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
