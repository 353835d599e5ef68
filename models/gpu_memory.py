"""All memory detectors of one GPU behind one `update(ts, sample) -> list[Finding]` (models/memory.py).

Used memory (NVML) feeds the peak series that the forecast and the leak judge. When the in-training hook sends
allocator stats, two better series come with them: what the process needs (allocated + the memory outside the
allocator, used - reserved), which the forecast then judges (a caching allocator holds NVML's figure flat at
its last reserved segment while allocations keep growing inside it), and allocated bytes, whose troughs the
leak then judges; and the fragmentation detector gets its input. With the hook's `peak_allocated_bytes` (the
most allocated since its previous sample) the needed series' buckets hold the steps' real peaks, and the
forecast prefers it. Detectors re-evaluate when a fine bucket closes (every 5 s
of event time), the leak when a coarse one closes (every minute), so the cost per sample stays small.
"""

from __future__ import annotations

import math
from typing import Any

from rankwatch.models.memory import FragmentationDetector, LeakDetector, MemoryDetectorConfig
from rankwatch.models.memory_series import PeakSeries
from rankwatch.models.oom import OomForecaster, OomPrediction
from rankwatch.models.training import Finding


class GpuMemoryDetector:
    def __init__(self, config: MemoryDetectorConfig | None = None) -> None:
        self.config = c = config or MemoryDetectorConfig()
        self.forecaster = OomForecaster(c)
        self.leak = LeakDetector(c)
        self.frag = FragmentationDetector(c)
        coarse_span = max(max(float(w) for w in c.oom_windows_s), c.leak_window_s)
        fine_span = max(self.forecaster.fine_span, c.mem_noise_span_s)
        self.used = PeakSeries(c.mem_bucket_s, c.mem_coarse_bucket_s, fine_span, coarse_span)
        self.need = PeakSeries(c.mem_bucket_s, c.mem_coarse_bucket_s, fine_span, coarse_span)
        self.alloc = PeakSeries(c.mem_bucket_s, c.mem_coarse_bucket_s, c.mem_coarse_bucket_s, c.leak_window_s)
        self.latest: dict[str, Any] = {}  # the last sample's fields (for reports and gauges)
        self.samples = 0
        self.num_ooms: float | None = None
        self.first_ts: float | None = None
        self.usage_raised = False
        self.restarts = 0
        self.low_since: float | None = None
        self.exited_at: float | None = None  # when the last exit (see _restarted) began: the memory fell

    @property
    def prediction(self) -> OomPrediction | None:
        return self.forecaster.last

    def update(self, ts: float, data: dict[str, Any]) -> list[Finding]:
        used, total = float(data["mem_used_bytes"]), float(data.get("mem_total_bytes") or 0.0)
        if not math.isfinite(used) or not math.isfinite(total):
            raise ValueError(f"non-finite memory figures: used {used}, total {total}")
        self.samples += 1
        if self._restarted(ts, used, total):
            exited = self.low_since
            self._reset()
            self.exited_at = exited
        if self.first_ts is None:
            self.first_ts = ts
        self.latest = {"ts": ts, **data}
        out: list[Finding] = []
        closed_used = self.used.add(ts, used)
        closed_need = False
        peaked = False  # the hook sent this interval's peak (`peak_allocated_bytes`)
        alloc, reserved = data.get("allocated_bytes"), data.get("reserved_bytes")
        if _finite(alloc):
            self.alloc.add(ts, float(alloc))
            if _finite(reserved):
                outside = max(0.0, used - float(reserved))  # the CUDA context, other libraries' memory
                closed_need = self.need.add(ts, float(alloc) + outside)
                peak = data.get("peak_allocated_bytes")  # the most allocated since the last sample (the hook)
                if _finite(peak) and float(peak) >= float(alloc):
                    self.need.add(ts, float(peak) + outside)  # the bucket's high: the step's real peak
                    peaked = True
        self.frag.add(ts, data)
        out.extend(self._allocator_ooms(data))
        if not (closed_used or closed_need):
            return out
        c = self.config
        f = self.frag.evaluate(ts, total)
        if f is not None:
            out.append(f)
        if closed_used and self.used.coarse_closed:
            covered = len(self.alloc.coarse) and ts - self.alloc.coarse[0].t_max >= 0.85 * c.leak_window_s
            f = self.leak.evaluate(self.alloc if covered else self.used, ts, total,
                                   "allocated" if covered else "used", self.first_ts or ts)
            if f is not None:
                out.append(f)
        pred = None
        for name, series, closed in (("used", self.used, closed_used), ("need", self.need, closed_need)):
            if closed:
                pred = self.forecaster.evaluate(name, series, ts, used, total, self.leak.raised,
                                                self.frag.raised, exact_peaks=name == "need" and peaked)
        assert pred is not None
        # memory far under the recent peaks may be the process gone (an OOM, a crash: reset after 10 s): no
        # forecast is raised from before while that is undecided
        f = None if self.low_since is not None else self.forecaster.judge(pred)[0]
        if f is not None:
            out.append(f)
        usage = pred.current_usage_percent
        if c.oom_alert_on_usage and usage >= c.oom_usage_threshold_pct and not self.usage_raised:
            self.usage_raised = True
            out.append(Finding("oom", "gpu_memory", usage, None, c.oom_usage_threshold_pct, None, "warning",
                               f"memory usage {usage:.1f}% is above the {c.oom_usage_threshold_pct:g}% threshold "
                               f"({pred.recommendation})", {**pred.to_dict(), "update": "usage_threshold"}))
        elif usage < c.oom_usage_threshold_pct - 5:
            self.usage_raised = False
        return out

    def _restarted(self, ts: float, used: float, total: float) -> bool:
        """Used memory stayed below a quarter of the recent peaks, by a fifth of the GPU or more, for 10 s:
        the process exited (an OOM, a crash) or restarted; a sawtooth's trough does not last that long.
        What came before says nothing about the new process."""
        recent = [b.hi for b in list(self.used.fine)[-12:]]
        if self.used.open_fine is not None:
            recent.append(self.used.open_fine.hi)
        peak = max(recent, default=0.0)
        if not (peak > 0 and used < 0.25 * peak and peak - used > 0.2 * total):
            self.low_since = None
            return False
        self.low_since = ts if self.low_since is None else self.low_since
        return ts - self.low_since >= 10.0

    def _reset(self) -> None:
        c, keep = self.config, (self.forecaster.raised, self.forecaster.raised_eta)
        fine_span = max(self.forecaster.fine_span, c.mem_noise_span_s)
        coarse_span = max(max(float(w) for w in c.oom_windows_s), c.leak_window_s)
        self.used = PeakSeries(c.mem_bucket_s, c.mem_coarse_bucket_s, fine_span, coarse_span)
        self.need = PeakSeries(c.mem_bucket_s, c.mem_coarse_bucket_s, fine_span, coarse_span)
        self.alloc = PeakSeries(c.mem_bucket_s, c.mem_coarse_bucket_s, c.mem_coarse_bucket_s, c.leak_window_s)
        self.forecaster = OomForecaster(c)
        self.forecaster.raised, self.forecaster.raised_eta = keep  # the episode ends by calm, as always
        self.leak = LeakDetector(c)
        self.frag = FragmentationDetector(c)
        self.first_ts = None
        self.low_since = None
        self.restarts += 1

    def _allocator_ooms(self, data: dict[str, Any]) -> list[Finding]:
        n = data.get("num_ooms")
        if not isinstance(n, (int, float)):
            return []
        before, self.num_ooms = self.num_ooms, float(n)
        if before is None or n <= before:
            return []
        return [Finding("oom", "gpu_memory", float(n), before, before, None, "critical",
                        f"the CUDA allocator reported {n - before:.0f} out-of-memory error(s) (num_ooms "
                        f"{before:.0f} -> {n:.0f}); the process caught it or is about to fail",
                        {"num_ooms": n, "update": "allocator_oom"})]

    def save_state(self) -> dict[str, Any]:
        return {"used": self.used.save_state(), "alloc": self.alloc.save_state(), "need": self.need.save_state(),
                "forecaster": self.forecaster.save_state(), "leak": self.leak.save_state(),
                "frag": self.frag.save_state(), "latest": self.latest, "samples": self.samples,
                "num_ooms": self.num_ooms, "usage_raised": self.usage_raised,
                "first_ts": self.first_ts, "restarts": self.restarts, "low_since": self.low_since}

    def load_state(self, state: dict[str, Any]) -> None:
        self.used.load_state(state.get("used", {}))
        self.alloc.load_state(state.get("alloc", {}))
        self.need.load_state(state.get("need", {}))
        self.forecaster.load_state(state.get("forecaster", {}))
        self.leak.load_state(state.get("leak", {}))
        self.frag.load_state(state.get("frag", {}))
        self.latest = dict(state.get("latest", {}))
        self.samples = int(state.get("samples", 0))
        self.num_ooms = state.get("num_ooms")
        self.usage_raised = bool(state.get("usage_raised", False))
        self.first_ts = state.get("first_ts")
        self.restarts = int(state.get("restarts", 0))
        self.low_since = state.get("low_since")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
