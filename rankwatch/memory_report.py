"""GPU memory reports: the JSON the users' memory tool wrote (kept: same keys), and a PNG per GPU with memory
over time, the per-minute peaks, total memory, the forecast line and the anomalies.

JSON (`rankwatch memory report`, and `--output` of `rankwatch memory profile|oom|leak|fragment`):
    {"timestamp": ISO time,
     "devices": {"<host>/<gpu>": {
         "rank": int | null,
         "current_memory": {"allocated": used bytes (NVML), "free", "total", "utilization": used %,
                            "reserved"?: bytes (allocator), "torch_allocated"?: bytes (allocator)},
         "peak_memory": bytes,
         "statistics": {"avg_utilization": %, "max_utilization": %, "avg_fragmentation": % | null,
                        "num_snapshots": int, "avg_gpu_util_pct"?: %},
         "risk_assessment": {"risk_level", "confidence", "current_usage_percent", "growth_rate_mb_per_sec",
                             "predicted_oom_time_seconds", "recommendation", ...},
         "leak": {...} | null, "fragmentation": {...} | null}},
     "anomalies": [anomaly records (rankwatch.anomaly/v1)]}
"Utilization" is memory used / total (as in the users' tool), not the GPU's compute utilisation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rankwatch.models.gpu_memory import GpuMemoryDetector
from rankwatch.models.memory_series import GIB
from rankwatch.processors.pipeline import Pipeline
from rankwatch.records import Anomaly, Record


@dataclass
class DeviceSeries:
    """Everything plotted and summarised for one GPU."""

    job: str
    host: str
    gpu: int
    rank: int | None = None
    ts: list[float] = field(default_factory=list)
    used: list[float] = field(default_factory=list)
    total: float = 0.0
    usage_sum: float = 0.0
    usage_max: float = 0.0
    frag_sum: float = 0.0
    frag_n: int = 0
    util_sum: float = 0.0
    util_n: int = 0
    latest: dict[str, Any] = field(default_factory=dict)
    max_points: int = 500_000

    @property
    def name(self) -> str:
        return f"{self.host}/{self.gpu}"

    def add(self, rec: Record) -> None:
        d = rec.data
        used, total = float(d["mem_used_bytes"]), float(d.get("mem_total_bytes") or 0.0)
        if rec.rank is not None:
            self.rank = rec.rank
        if len(self.ts) < self.max_points:
            self.ts.append(rec.ts)
            self.used.append(used)
        self.total = total or self.total
        pct = 100.0 * used / total if total > 0 else 0.0
        self.usage_sum += pct
        self.usage_max = max(self.usage_max, pct)
        alloc, reserved = d.get("allocated_bytes"), d.get("reserved_bytes")
        if isinstance(alloc, (int, float)) and isinstance(reserved, (int, float)) and reserved > 0:
            self.frag_sum += 100.0 * max(0.0, 1.0 - alloc / reserved)
            self.frag_n += 1
        if isinstance(d.get("util_pct"), (int, float)):
            self.util_sum += float(d["util_pct"])
            self.util_n += 1
        self.latest = {"ts": rec.ts, **d}

    @property
    def n(self) -> int:
        return len(self.ts)


class MemoryTimeline:
    """Collects per-GPU series from the GPU records that pass by (wrap the record stream with `watch`)."""

    def __init__(self) -> None:
        self.devices: dict[tuple[str, str, int], DeviceSeries] = {}
        self.snapshots: dict[tuple[str, str, int], int] = {}

    def add(self, rec: Record) -> None:
        if rec.kind != "gpu":
            return
        key = (rec.job, str(rec.data.get("host")), int(rec.data.get("gpu", -1)))
        dev = self.devices.get(key)
        if dev is None:
            dev = self.devices[key] = DeviceSeries(*key)
        dev.add(rec)
        self.snapshots[key] = self.snapshots.get(key, 0) + 1

    def watch(self, records: Iterable[Record]) -> Iterator[Record]:
        for rec in records:
            self.add(rec)
            yield rec


def _detector(pipeline: Pipeline, key: tuple[str, str, int]) -> GpuMemoryDetector | None:
    from rankwatch.processors.memory_stage import GpuMemoryHandler
    return pipeline.handler(GpuMemoryHandler).gpus.get(key)  # type: ignore[attr-defined]


def device_report(dev: DeviceSeries, det: GpuMemoryDetector | None, snapshots: int) -> dict[str, Any]:
    d = dev.latest
    used, total = float(d.get("mem_used_bytes", 0.0)), float(d.get("mem_total_bytes") or dev.total or 0.0)
    current = {"allocated": int(used), "free": int(max(0.0, total - used)), "total": int(total),
               "utilization": round(100.0 * used / total, 2) if total > 0 else None}
    if isinstance(d.get("reserved_bytes"), (int, float)):
        current["reserved"] = int(d["reserved_bytes"])
    if isinstance(d.get("allocated_bytes"), (int, float)):
        current["torch_allocated"] = int(d["allocated_bytes"])
    stats: dict[str, Any] = {
        "avg_utilization": round(dev.usage_sum / snapshots, 2) if snapshots else None,
        "max_utilization": round(dev.usage_max, 2),
        "avg_fragmentation": round(dev.frag_sum / dev.frag_n, 2) if dev.frag_n else None,
        "num_snapshots": snapshots}
    if dev.util_n:
        stats["avg_gpu_util_pct"] = round(dev.util_sum / dev.util_n, 2)
    pred = det.prediction if det is not None else None
    risk = pred.to_dict() if pred is not None else None
    if risk is not None:
        risk.pop("ts", None)
    return {"rank": dev.rank, "current_memory": current, "peak_memory": int(max(dev.used, default=0.0)),
            "statistics": stats, "risk_assessment": risk,
            "leak": det.leak.last if det is not None else None,
            "fragmentation": det.frag.last if det is not None else None}


def build_report(timeline: MemoryTimeline, pipeline: Pipeline, anomalies: list[Anomaly]) -> dict[str, Any]:
    devices = {}
    for key, dev in sorted(timeline.devices.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        name = dev.name if len({k[0] for k in timeline.devices}) == 1 else f"{key[0]}:{dev.name}"
        devices[name] = device_report(dev, _detector(pipeline, key), timeline.snapshots.get(key, 0))
    return {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "devices": devices, "anomalies": [a.to_dict() for a in anomalies]}


def _minute_peaks(ts: list[float], used: list[float]) -> tuple[list[float], list[float]]:
    peaks: dict[int, tuple[float, float]] = {}
    for t, u in zip(ts, used, strict=True):
        k = int(t // 60)
        if k not in peaks or u > peaks[k][1]:
            peaks[k] = (t, u)
    pts = [peaks[k] for k in sorted(peaks)]
    return [p[0] for p in pts], [p[1] for p in pts]


_MARKS = {"oom": ("red", "v"), "leak": ("darkorange", "^"), "fragmentation": ("purple", "s"),
          "imbalance": ("brown", "D")}


def plot_device(dev: DeviceSeries, det: GpuMemoryDetector | None, anomalies: list[Anomaly], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = dev.ts[0]
    x = [(t - t0) / 60 for t in dev.ts]
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.plot(x, [u / GIB for u in dev.used], linewidth=0.5, color="tab:blue", alpha=0.7, label="used")
    pt, pu = _minute_peaks(dev.ts, dev.used)
    ax.scatter([(t - t0) / 60 for t in pt], [u / GIB for u in pu], s=6, color="navy", zorder=3,
               label="per-minute peak")
    if dev.total:
        ax.axhline(dev.total / GIB, color="black", linewidth=1, label=f"total {dev.total / GIB:.1f} GiB")
    pred = det.prediction if det is not None else None
    if pred is not None and pred.growth_bytes_per_s > 0 and pred.window_s:
        # forecast: the peak envelope along the fitted slope, from the window's start to the predicted OOM
        start = pred.ts - pred.window_s
        eta = pred.predicted_oom_time_seconds
        end = pred.ts + (eta if eta is not None else pred.window_s)  # to where the peak meets total memory
        slope = pred.growth_bytes_per_s
        xs = [(start - t0) / 60, (end - t0) / 60]
        ys = [(pred.peak_bytes - slope * pred.window_s) / GIB, (pred.peak_bytes + slope * (end - pred.ts)) / GIB]
        ax.plot(xs, ys, "--", color="red", linewidth=1.5,
                label=f"forecast {pred.growth_rate_mb_per_sec:.2f} MB/s" + (f", OOM in {eta:.0f} s" if eta else ""))
    for a in anomalies:
        if a.host == dev.host and a.gpu == dev.gpu and a.job == dev.job and a.detector in _MARKS:
            color, marker = _MARKS[a.detector]
            y = (a.context.get("peak_bytes") or dev.total or 0) / GIB
            ax.scatter([(a.event_time - t0) / 60], [y], color=color, marker=marker, s=60, zorder=5)
            ax.axvline((a.event_time - t0) / 60, color=color, linewidth=0.6, alpha=0.5)
    handles = [plt.Line2D([], [], color=c, marker=m, linestyle="", label=k) for k, (c, m) in _MARKS.items()
               if any(a.detector == k and a.host == dev.host and a.gpu == dev.gpu for a in anomalies)]
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, loc="lower right", fontsize=7)
    ax.set_xlabel("minutes since the first sample")
    ax.set_ylabel("GiB")
    rank = f" (rank {dev.rank})" if dev.rank is not None else ""
    ax.set_title(f"{dev.job} {dev.name}{rank}: GPU memory, peaks, forecast and anomalies")
    if dev.total and not math.isnan(dev.total):
        ax.set_ylim(0, dev.total / GIB * 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_devices(timeline: MemoryTimeline, pipeline: Pipeline, anomalies: list[Anomaly], out: Path,
                 prefix: str = "") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    several_jobs = len({k[0] for k in timeline.devices}) > 1
    for key, dev in sorted(timeline.devices.items()):
        if not dev.ts:
            continue
        path = out / f"{prefix}{dev.job + '-' if several_jobs else ''}{dev.host}-gpu{dev.gpu}.png"
        plot_device(dev, _detector(pipeline, key), anomalies, path)
        paths.append(path)
    return paths
