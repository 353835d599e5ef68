"""GPU memory detectors of one GPU (job/host/gpu): their settings, the leak and fragmentation detectors.
The OOM forecast is in models/oom.py, the per-cycle peak series and the robust slope in models/memory_series.py,
all of one GPU together in models/gpu_memory.py. Plain classes, no I/O.

- **Leak** (`LeakDetector`): the per-minute troughs (what stays allocated between steps; torch's allocated
  bytes when the hook sends them, else NVML's used) grow faster than `leak_threshold_mb_per_min` over
  `leak_window_s`, steadily (both halves of the window grow: the allocator settling after start or taking a
  larger segment once is a new plateau, not a leak) while the step pattern is otherwise periodic (the
  sawtooth's amplitude is the same in each third of the window).
- **Fragmentation** (`FragmentationDetector`, needs allocator stats): `1 - allocated/reserved` measured at each
  bucket's peak (at the trough of a step the cache legitimately holds the freed activations), inactive split
  bytes, and allocation retries (cudaMalloc failed, the cache was flushed and the call retried). Level over
  `frag_window_s` and trend over the last hour.

MB in rates means MiB (2^20 bytes).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from rankwatch.models.memory_series import (
    GIB,
    MIB,
    PeakSeries,
    duration_text,
    median,
    repeated_median_slope,
    series_noise,
)
from rankwatch.models.training import Finding


@dataclass
class MemoryDetectorConfig:
    """Settings of the GPU memory detectors ([detection] section; prefixes mem_, oom_, leak_, frag_, imbalance_)."""

    mem_bucket_s: float = 5.0  # fine peak buckets (a few steps at 1 Hz sampling)
    mem_coarse_bucket_s: float = 60.0  # coarse buckets for the long windows and the leak
    mem_noise_floor_bytes: float = 8 * MIB  # NVML is exact; below this a slope is not told from rounding
    mem_noise_span_s: float = 1200.0  # history of fine peaks the noise scale is measured on
    mem_settle_s: float = 600.0  # a GPU's first minutes (weights loaded, allocator settling) are no leak
    mem_gauge_max_gpus: int = 1024  # per worker: Prometheus series per GPU stay bounded
    mem_stale_after_s: float = 600.0  # a GPU silent this long (event time) loses its gauges
    oom_windows_s: tuple[float, ...] = (40.0, 80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0, 5120.0, 10240.0)
    oom_fit_troughs: bool = True  # also fit the per-bucket troughs (persistent memory); the surer fit counts
    oom_min_z: float = 5.0  # slope / its standard error, for a forecast to count (critical: minutes left)
    oom_high_min_z: float = 6.0  # ... to raise a high-risk one (ETA within 15 min: time to be surer)
    oom_medium_min_z: float = 10.0  # ... and a medium one (hours ahead: no hurry, so be sure)
    oom_agree_z: float = 2.0  # a longer window is used while its slope agrees with the shorter one's
    oom_max_extrapolation: float = 4.0  # an ETA is alarm-grade up to this many times the fitted window
    # the ordinary steps' peak: the median of the maxima of blocks this long (a checkpoint's buffers top one
    # block); only it raises the risk to critical (models/oom_prediction.py, forecast_level)
    oom_recur_s: float = 300.0
    # NVML's used memory this close to total (% of it) at the troughs too, over the last minute: the GPU is
    # full, its real headroom inside the allocator's cache (no critical risk from NVML alone)
    oom_full_margin_pct: float = 2.0
    oom_critical_eta_s: float = 120.0
    oom_high_eta_s: float = 900.0
    oom_medium_eta_s: float = 7200.0
    oom_usage_threshold_pct: float = 90.0  # at least medium risk above this usage (the users' --threshold)
    oom_alert_on_usage: bool = False  # also raise an `oom` warning when usage crosses the threshold
    oom_alert_level: str = "medium"  # the lowest forecast risk that raises an `oom` anomaly (medium: info)
    oom_confirm: int = 3  # evaluations in a row at that risk before raising (1 when the evidence is 3x as strong)
    oom_need_min_window_s: float = 1200.0  # the allocator stats' forecast needs this long a window (aliasing)
    oom_warmup_s: float = 300.0  # a GPU's first samples: the allocator is still settling
    oom_clear_s: float = 300.0  # calm this long ends an episode (a later one is raised afresh)
    leak_threshold_mb_per_min: float = 10.0
    leak_window_s: float = 1800.0
    leak_min_z: float = 5.0
    frag_ratio_threshold: float = 0.3
    frag_min_reserved_pct: float = 50.0  # fragmentation matters when memory is tight
    frag_window_s: float = 300.0
    frag_retries_threshold: int = 1  # allocation retries within the window
    frag_trend_per_hour: float = 0.1  # rising this fast, at half the threshold, is reported early
    imbalance_gap_pct: float = 10.0  # a GPU this many points of total memory above its peers' median ...
    imbalance_k: float = 6.0  # ... and beyond k robust sigmas of the peers' spread
    imbalance_min_gpus: int = 3
    imbalance_bucket_s: float = 30.0
    imbalance_persist: int = 3  # buckets in a row
    imbalance_grace_s: float = 30.0  # a quiet GPU is waited for this long (in buckets, rounded up) + 1


class LeakDetector:
    """Sustained, steady growth of the per-minute troughs while the step pattern repeats (see module)."""

    def __init__(self, config: MemoryDetectorConfig) -> None:
        self.config = config
        self.raised = False
        self.last: dict[str, Any] | None = None

    def evaluate(self, series: PeakSeries, now: float, total: float, source: str, first_ts: float
                 ) -> Finding | None:
        c = self.config
        w = c.leak_window_s
        t, hi, lo = series.arrays(True, now - w)
        if len(t) < 9 or t[-1] - t[0] < 0.85 * w or t[0] < first_ts + c.mem_settle_s:
            return None
        threshold = c.leak_threshold_mb_per_min * MIB / 60.0
        slope = repeated_median_slope(t, lo)
        se = 1.28 * series_noise(t, lo, c.mem_noise_floor_bytes) / math.sqrt(float(np.sum((t - t.mean()) ** 2)))
        z = slope / se if se > 0 else 0.0
        halves = np.array_split(np.arange(len(t)), 2)
        levels = [median(lo[i]) for i in halves]
        # steady: both halves of the window grow at half the threshold or more (a leak accrues every step;
        # the allocator settling after start, or caching a checkpoint's buffers once, grows in one half only)
        half_slopes = [repeated_median_slope(t[i], lo[i]) for i in halves]
        # ... and not in a few jumps: no single minute (of the 3-minute running median) carries half the growth
        smooth = np.array([median(lo[max(0, i - 1):i + 2]) for i in range(len(lo))])
        growth = slope * (t[-1] - t[0])
        steady = bool(min(half_slopes) >= 0.5 * threshold and float(np.max(np.diff(smooth))) <= 0.5 * growth)
        thirds = np.array_split(np.arange(len(t)), 3)
        amps = [median(hi[i] - lo[i]) for i in thirds]
        periodic = bool(max(amps) - min(amps) <= max(256 * MIB, 0.5 * max(amps)))
        peak_slope = repeated_median_slope(t, hi)
        self.last = {"growth_rate_mb_per_min": slope * 60 / MIB, "peak_growth_rate_mb_per_min": peak_slope * 60 / MIB,
                     "trend_z": z, "steady": steady, "periodic": periodic, "window_s": w, "series": source}
        if slope < 0.5 * threshold:
            self.raised = False  # re-armed: a later leak is reported afresh
            self.last["leaking"] = False
            return None
        # what stays allocated between steps is there at the peaks too: a leak lifts both (troughs alone
        # rising while the peaks stay flat is sampling noise, e.g. a sawtooth aliased by a fixed interval)
        lifts_peaks = bool(peak_slope >= 0.5 * threshold)
        leaking = slope >= threshold and z >= c.leak_min_z and steady and periodic and lifts_peaks
        self.last["leaking"] = leaking
        if self.raised or not leaking:
            return None
        self.raised = True
        full_in = (total - float(hi[-1])) / slope if total > 0 else None
        rate = slope * 60 / MIB
        msg = (f"memory leak: what stays allocated between steps grew {rate:.1f} MB/min over the last "
               f"{duration_text(w)} ({(levels[-1] - levels[0]) / MIB:.0f} MB), steadily, while the step pattern "
               f"repeats" + (f"; at this rate the peak reaches total memory in ~{duration_text(full_in)}"
                             if full_in is not None and full_in > 0 else ""))
        ctx = {**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.last.items()},
               "growth_bytes": levels[-1] - levels[0], "threshold_mb_per_min": c.leak_threshold_mb_per_min,
               "projected_full_seconds": None if full_in is None else round(max(0.0, full_in), 1)}
        return Finding("leak", "gpu_memory", rate, 0.0, c.leak_threshold_mb_per_min, z, "warning", msg, ctx)

    def save_state(self) -> dict[str, Any]:
        return {"raised": self.raised}

    def load_state(self, state: dict[str, Any]) -> None:
        self.raised = bool(state.get("raised", False))


class FragmentationDetector:
    """Allocator fragmentation from the hook's stats: level, trend and allocation retries (see module)."""

    def __init__(self, config: MemoryDetectorConfig) -> None:
        self.config = config
        n = int(math.ceil(config.frag_window_s / config.mem_bucket_s)) + 1
        self.window: deque[tuple[float, float, float, float]] = deque(maxlen=n)  # t, ratio, split, reserved
        self.minutes: deque[tuple[float, float]] = deque(maxlen=61)  # per-minute median ratio, for the trend
        self.retries: deque[tuple[float, float]] = deque(maxlen=n)
        self.open: list[float] | None = None  # index, max alloc, max reserved, max split, ts
        self._minute: list[Any] = [None, []]
        self.raised = False
        self.last: dict[str, Any] | None = None

    def add(self, ts: float, data: dict[str, Any]) -> None:
        alloc, reserved = data.get("allocated_bytes"), data.get("reserved_bytes")
        if alloc is None or reserved is None or reserved <= 0:
            return
        idx = math.floor(ts / self.config.mem_bucket_s)
        split = float(data.get("inactive_split_bytes") or 0.0)
        if self.open is not None and idx > self.open[0]:
            self._close()
        if self.open is None:
            self.open = [idx, alloc, reserved, split, ts]
        else:
            o = self.open
            o[1], o[2], o[3], o[4] = max(o[1], alloc), max(o[2], reserved), max(o[3], split), ts
        if data.get("num_alloc_retries") is not None:
            self.retries.append((ts, float(data["num_alloc_retries"])))

    def _close(self) -> None:
        _, alloc, reserved, split, ts = self.open  # type: ignore[misc]
        ratio = max(0.0, 1.0 - alloc / reserved)
        self.window.append((ts, ratio, split / reserved, reserved))
        minute = math.floor(ts / 60.0)
        if self._minute[0] is not None and minute != self._minute[0] and self._minute[1]:
            self.minutes.append((self._minute[0] * 60.0 + 30.0, median(np.array(self._minute[1]))))
            self._minute = [minute, []]
        if self._minute[0] is None:
            self._minute = [minute, []]
        self._minute[1].append(ratio)
        self.open = None

    @property
    def ratio(self) -> float | None:
        return self.window[-1][1] if self.window else None

    def evaluate(self, now: float, total: float) -> Finding | None:
        c = self.config
        if len(self.window) < 3 or now - self.window[0][0] < 0.8 * c.frag_window_s:
            return None
        level = median(np.array([w[1] for w in self.window]))
        split = median(np.array([w[2] for w in self.window]))
        reserved = median(np.array([w[3] for w in self.window]))
        reserved_pct = 100.0 * reserved / total if total > 0 else 0.0
        retries = (self.retries[-1][1] - self.retries[0][1]) if len(self.retries) >= 2 else 0.0
        trend = None
        if len(self.minutes) >= 30:
            tm = np.array([m[0] for m in self.minutes])
            trend = repeated_median_slope(tm, np.array([m[1] for m in self.minutes])) * 3600.0
        self.last = {"fragmentation_ratio": level, "split_ratio": split, "reserved_percent": reserved_pct,
                     "alloc_retries": retries, "trend_per_hour": trend}
        tight = reserved_pct >= c.frag_min_reserved_pct
        reasons = []
        if level >= c.frag_ratio_threshold and tight:
            reasons.append(f"{level:.0%} of reserved memory is unused at the peak")
        if retries >= c.frag_retries_threshold:
            reasons.append(f"{retries:.0f} allocation retries (cudaMalloc failed, the cache was flushed)")
        if (trend is not None and trend >= c.frag_trend_per_hour and level >= 0.5 * c.frag_ratio_threshold
                and tight):
            reasons.append(f"fragmentation rising {trend:.2f}/h, now {level:.0%}")
        if not reasons:
            if level < 0.5 * c.frag_ratio_threshold and retries == 0:
                self.raised = False
            return None
        if self.raised:
            return None
        self.raised = True
        msg = ("allocator fragmentation: " + "; ".join(reasons) + f" (reserved {reserved / GIB:.1f} GiB, "
               f"{reserved_pct:.0f}% of total, inactive split blocks {split:.0%} of it). Try "
               "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True or fewer differently-sized allocations.")
        ctx = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.last.items()}
        ctx["reasons"] = reasons
        return Finding("fragmentation", "gpu_memory", level, None, c.frag_ratio_threshold, None,
                       "critical" if retries >= c.frag_retries_threshold else "warning", msg, ctx)

    def save_state(self) -> dict[str, Any]:
        return {"window": [list(w) for w in self.window], "minutes": [list(m) for m in self.minutes],
                "retries": [list(r) for r in self.retries], "open": self.open, "minute": self._minute,
                "raised": self.raised}

    def load_state(self, state: dict[str, Any]) -> None:
        self.window.extend(tuple(w) for w in state.get("window", []))  # type: ignore[misc]
        self.minutes.extend(tuple(m) for m in state.get("minutes", []))  # type: ignore[misc]
        self.retries.extend(tuple(r) for r in state.get("retries", []))  # type: ignore[misc]
        self.open = state.get("open")
        self._minute = state.get("minute", [None, []])
        self.raised = bool(state.get("raised", False))
