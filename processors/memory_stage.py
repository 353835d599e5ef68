"""GPU memory in the two stages: per-GPU detectors (stage 1, key job/host/gpu) and cross-GPU imbalance (stage 2).

Stage 1 runs `GpuMemoryDetector` (OOM forecast, leak, fragmentation) for each GPU, exports its gauges and
summarises each GPU's peak per `imbalance_bucket_s` as `{type: "gpu_mem", host, gpu, rank, bucket, share, ...}`
for stage 2, where `MemoryImbalanceDetector` compares the GPUs of a job wherever their partitions are. A GPU
whose process exited sends `{type: "gpu_exit", host, gpu, rank, ts}`: the collective stage tells a stopped
job from a hung one by them (models/gpu_release.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rankwatch.models.gpu_memory import GpuMemoryDetector
from rankwatch.models.imbalance import ImbalanceConfig, ImbalanceFinding, MemoryImbalanceDetector
from rankwatch.models.memory import MemoryDetectorConfig
from rankwatch.models.training import Finding
from rankwatch.processors.stages import Summary, finite, take_each

from rankwatch.records import Anomaly, Record

if TYPE_CHECKING:
    from rankwatch.processors.pipeline import StageContext

GpuKey = tuple[str, str, int]  # job, host, gpu
GAUGE_LABELS = ("job", "host", "gpu")
GAUGES = {
    "rankwatch_gpu_memory_used_ratio": "GPU memory used / total (latest sample)",
    "rankwatch_gpu_memory_used_bytes": "GPU memory used (latest sample)",
    "rankwatch_gpu_memory_total_bytes": "GPU memory total",
    "rankwatch_gpu_memory_peak_bytes": "Upper envelope of the per-step peaks now (what runs out of memory)",
    "rankwatch_gpu_memory_growth_bytes_per_second": "Growth of the per-step peaks (0 unless significant)",
    "rankwatch_gpu_oom_eta_seconds": "Seconds until the peak reaches total memory (absent: no growth)",
    "rankwatch_gpu_oom_ordinary_eta_seconds": "Seconds until the ordinary steps' peaks reach total memory (the "
                                              "ETA above may be a transient's, e.g. a checkpoint's buffers)",
    "rankwatch_gpu_oom_risk_level": "OOM risk: 0 low, 1 medium, 2 high, 3 critical",
    "rankwatch_gpu_memory_fragmentation_ratio": "1 - allocated/reserved at the peak (allocator stats only)",
    "rankwatch_gpu_memory_leak_bytes_per_second": "Growth between steps while the leak detector judges it a leak "
                                                 "(else 0)",
}


def _no_process(d: dict[str, Any]) -> bool:
    """NVML lists no process holding memory (`proc_used_bytes` absent: none listed, or a container that cannot
    see them; or under 5% of the GPU). Memory that fell while the process lives on (its cache emptied for an
    evaluation) is no exit."""
    proc, total = d.get("proc_used_bytes"), d.get("mem_total_bytes")
    if not isinstance(proc, (int, float)) or not isinstance(total, (int, float)) or total <= 0:
        return True
    return proc < 0.05 * total


def gpu_fields(s: Summary) -> tuple[str, float, int | None]:
    """("host/gpu", ts, rank or None) of a GPU summary (`gpu_mem`, `gpu_exit`); raises on a malformed one."""
    rank = s.get("rank")
    return f"{s['host']}/{int(s['gpu'])}", finite(s["ts"]), None if rank is None else int(rank)


def gpu_mem_fields(s: Summary) -> tuple[str, float, int | None, int, float]:
    """`gpu_fields` and (bucket, share) of a `gpu_mem` summary: every field a stage-2 reader uses, so a malformed
    one is refused by all readers alike and counted once (by GpuImbalanceJob)."""
    gpu, ts, rank = gpu_fields(s)
    int(s.get("offset", -1))  # the anomaly's source
    return gpu, ts, rank, int(s["bucket"]), finite(s["share"])


def finding_anomaly(rec: Record, key: GpuKey, rank: int | None, f: Finding) -> Anomaly:
    ctx = {"device": f"{key[1]}/{key[2]}", **f.context}
    return Anomaly(f.detector, f.signal, rec.job, rank, rec.ts, f.value, f.expected, f.score, f.threshold,
                   f.severity, f"GPU {key[1]}/{key[2]}" + (f" (rank {rank})" if rank is not None else "") + ": "
                   + f.message, ctx, source_file=rec.file, source_offset=rec.offset, host=key[1], gpu=key[2])


class GpuMemoryHandler:
    """Stage 1 for the gpu family, keyed by job/host/gpu."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.config: MemoryDetectorConfig = ctx.config  # DetectionConfig includes the memory settings
        self.gpus: dict[GpuKey, GpuMemoryDetector] = {}
        self.ranks: dict[GpuKey, int] = {}
        self.open: dict[GpuKey, list[Any]] = {}  # imbalance bucket: [bucket, peak, total, ts, file, offset]
        self.last_seen: dict[GpuKey, float] = {}
        self.exported: set[GpuKey] = set()
        self.latest_ts = -math.inf

    def detector(self, key: GpuKey) -> GpuMemoryDetector:
        det = self.gpus.get(key)
        if det is None:
            det = self.gpus[key] = GpuMemoryDetector(self.config)
        return det

    def process(self, records: list[Record]) -> tuple[list[Anomaly], list[Summary]]:
        out: list[Anomaly] = []
        summaries: list[Summary] = []
        for rec in records:
            try:
                out.extend(self._sample(rec, summaries))
            except (TypeError, ValueError, KeyError) as exc:
                self.ctx.skip(rec, exc)
        self._expire_gauges()
        return out, summaries

    def _sample(self, rec: Record, summaries: list[Summary]) -> list[Anomaly]:
        d = rec.data
        key: GpuKey = (rec.job, str(d["host"]), int(d["gpu"]))
        if rec.rank is not None:
            self.ranks[key] = rec.rank
        rank = self.ranks.get(key)
        det = self.detector(key)
        evaluated_before = det.prediction.ts if det.prediction else None
        restarts = det.restarts
        found = det.update(rec.ts, d)
        if det.restarts > restarts and det.exited_at is not None and self.ctx.wants("gpu_exit") and _no_process(d):
            # the process on this GPU is gone: with all of a job's GPUs, the job was stopped (models/gpu_release.py)
            summaries.append({"type": "gpu_exit", "job": key[0], "host": key[1], "gpu": key[2], "rank": rank,
                              "ts": det.exited_at, "file": rec.file, "offset": rec.offset})
        self.last_seen[key] = rec.ts
        self.latest_ts = max(self.latest_ts, rec.ts)
        if det.prediction is not None and det.prediction.ts != evaluated_before:
            self._gauges(key, det)
        self._bucket(rec, key, rank, det, summaries)
        return [finding_anomaly(rec, key, rank, f) for f in found]

    # ---- stage-2 summaries ----------------------------------------------------------------------------------
    def _bucket(self, rec: Record, key: GpuKey, rank: int | None, det: GpuMemoryDetector,
                summaries: list[Summary]) -> None:
        if not self.ctx.wants("gpu_mem"):
            return
        b = int(math.floor(rec.ts / self.config.imbalance_bucket_s))
        used, total = float(rec.data["mem_used_bytes"]), float(rec.data.get("mem_total_bytes") or 0.0)
        cur = self.open.get(key)
        if cur is not None and b > cur[0]:
            peak, tot = cur[1], cur[2]
            if tot > 0:
                p = det.prediction
                summaries.append({"type": "gpu_mem", "job": key[0], "host": key[1], "gpu": key[2], "rank": rank,
                                  "ts": cur[3], "bucket": cur[0], "share": peak / tot, "peak": peak, "total": tot,
                                  "file": cur[4], "offset": cur[5],
                                  "eta": p.predicted_oom_time_seconds if p else None})
            cur = None
        if cur is None:
            self.open[key] = [b, used, total, rec.ts, rec.file, rec.offset]
        elif used > cur[1]:
            cur[1:] = [used, total, rec.ts, rec.file, rec.offset]

    # ---- gauges ---------------------------------------------------------------------------------------------
    def _gauges(self, key: GpuKey, det: GpuMemoryDetector) -> None:
        if key not in self.exported:
            if len(self.exported) >= self.config.mem_gauge_max_gpus:
                return  # bounded series per worker; the anomalies still name every GPU
            self.exported.add(key)
        g, labels = self.ctx.gauges, (key[0], key[1], str(key[2]))
        p = det.prediction
        assert p is not None
        used = float(det.latest.get("mem_used_bytes", 0.0))
        g.set("rankwatch_gpu_memory_used_ratio", labels, used / p.total_bytes if p.total_bytes > 0 else 0.0)
        g.set("rankwatch_gpu_memory_used_bytes", labels, used)
        g.set("rankwatch_gpu_memory_total_bytes", labels, p.total_bytes)
        g.set("rankwatch_gpu_memory_peak_bytes", labels, p.peak_bytes)
        g.set("rankwatch_gpu_memory_growth_bytes_per_second", labels, p.growth_bytes_per_s)
        for name, eta in (("rankwatch_gpu_oom_eta_seconds", p.predicted_oom_time_seconds),
                          ("rankwatch_gpu_oom_ordinary_eta_seconds", p.ordinary_oom_time_seconds)):
            if eta is not None:
                g.set(name, labels, eta)
            else:
                g.remove(name, labels)
        g.set("rankwatch_gpu_oom_risk_level", labels, p.risk_level.rank)
        if det.frag.ratio is not None:
            g.set("rankwatch_gpu_memory_fragmentation_ratio", labels, det.frag.ratio)
        lk = det.leak.last
        if lk is not None:
            rate = lk["growth_rate_mb_per_min"] * 2**20 / 60 if lk.get("leaking") else 0.0
            g.set("rankwatch_gpu_memory_leak_bytes_per_second", labels, rate)

    def _expire_gauges(self) -> None:
        for key in [k for k in self.exported if self.latest_ts - self.last_seen.get(k, -math.inf)
                    > self.config.mem_stale_after_s]:
            labels = (key[0], key[1], str(key[2]))
            for name in GAUGES:
                self.ctx.gauges.remove(name, labels)
            self.exported.discard(key)

    # ---- persistence ----------------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return {"gpus": [[*k, d.save_state()] for k, d in self.gpus.items()],
                "ranks": [[*k, r] for k, r in self.ranks.items()],
                "open": [[*k, v] for k, v in self.open.items()]}

    def load_state(self, state: dict[str, Any]) -> None:
        for job, host, gpu, st in state.get("gpus", []):
            self.detector((job, host, int(gpu))).load_state(st)
        for job, host, gpu, r in state.get("ranks", []):
            self.ranks[(job, host, int(gpu))] = int(r)
        for job, host, gpu, v in state.get("open", []):
            self.open[(job, host, int(gpu))] = list(v)


class GpuImbalanceJob:
    """Stage 2: a GPU whose peak is far above its peers' median in the same job (models/imbalance.py)."""

    summary_types = ("gpu_mem",)

    def __init__(self, job: str, ctx: StageContext) -> None:
        c: MemoryDetectorConfig = ctx.config
        self.job = job
        self.ctx = ctx
        self.bucket_s = c.imbalance_bucket_s
        self.detector: MemoryImbalanceDetector[Summary] = MemoryImbalanceDetector(ImbalanceConfig(
            gap_pct=c.imbalance_gap_pct, k=c.imbalance_k, min_gpus=c.imbalance_min_gpus, persist=c.imbalance_persist,
            stale_buckets=max(2, int(math.ceil(c.imbalance_grace_s / c.imbalance_bucket_s)) + 1)))

    def process(self, summaries: list[Summary]) -> list[Anomaly]:
        out: list[Anomaly] = []

        def take(s: Summary) -> None:
            gpu, _, _, bucket, share = gpu_mem_fields(s)
            out.extend(self._anomaly(f) for f in self.detector.add(gpu, bucket, share, s))

        take_each(summaries, take, self.ctx.skip_summary)
        return out

    def _anomaly(self, f: ImbalanceFinding[Summary]) -> Anomaly:
        s = f.ref
        rank = s.get("rank")
        gap = 100 * (f.share - f.median)
        eta = s.get("eta")
        msg = (f"GPU {f.gpu}" + (f" (rank {rank})" if rank is not None else "") + f" peaks at {100 * f.share:.1f}% "
               f"of its memory, {gap:.1f} points above the median {100 * f.median:.1f}% of the job's {f.gpus} GPUs: "
               "it will run out of memory first" + (f" (forecast: ~{eta:.0f} s)" if eta is not None else "")
               + ". Rebalance the work (pipeline stage split, embedding placement, routing) or its batch.")
        ctx = {"device": f.gpu, "gpus_compared": f.gpus, "median_percent": round(100 * f.median, 2),
               "gap_percent_points": round(gap, 2), "peak_bytes": s.get("peak"), "total_bytes": s.get("total"),
               "bucket_s": self.bucket_s, "predicted_oom_time_seconds": eta}
        return Anomaly("imbalance", "gpu_memory", self.job, rank, float(s["ts"]), 100 * f.share, 100 * f.median,
                       f.score, 100 * f.threshold, "critical" if f.share >= 0.97 else "warning", msg, ctx,
                       source_file=str(s.get("file", "")), source_offset=int(s.get("offset", -1)),
                       host=str(s["host"]), gpu=int(s["gpu"]))

    def tick(self, now: float) -> list[Anomaly]:
        return []  # judged on completeness or staleness of buckets, never on the clock: order-independent

    def finish(self, wall: float | None = None) -> list[Anomaly]:
        return [self._anomaly(f) for f in self.detector.finish()]

    def save_state(self) -> dict[str, Any]:
        return self.detector.save_state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.detector.load_state(state)
