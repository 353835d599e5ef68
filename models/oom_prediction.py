"""What an OOM forecast says: the risk level, the prediction (the users' tool's `risk_assessment`) and what to do."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from rankwatch.models.memory_series import MIB

if TYPE_CHECKING:
    from rankwatch.models.memory import MemoryDetectorConfig


class RiskLevel(str, Enum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return RISK_ORDER.index(self)


RISK_ORDER = [RiskLevel.LOW, RiskLevel.MEDIUM, RiskLevel.HIGH, RiskLevel.CRITICAL]


@dataclass
class OomPrediction:
    """One evaluation of the forecast (the users' tool's `risk_assessment`, plus what the plots need)."""

    ts: float
    risk_level: RiskLevel
    confidence: float
    current_usage_percent: float
    growth_rate_mb_per_sec: float
    predicted_oom_time_seconds: float | None
    recommendation: str
    peak_bytes: float  # upper envelope of the per-cycle peaks now
    total_bytes: float
    window_s: float | None  # the window the slope was fitted on (None: no significant growth)
    z: float
    # when the peaks that recur reach total memory; predicted_oom_time_seconds is the highest peak's, which
    # may be a transient seen once (a checkpoint's buffers). None exactly when that is (no growth)
    ordinary_oom_time_seconds: float | None = None
    # NVML shows the GPU full between steps too: a caching allocator holds all of it, and how much of its cache
    # is free (the real headroom) is out of NVML's sight
    memory_full: bool = False

    @property
    def growth_bytes_per_s(self) -> float:
        return self.growth_rate_mb_per_sec * MIB

    def to_dict(self) -> dict[str, Any]:
        eta = self.predicted_oom_time_seconds
        return {"risk_level": self.risk_level.value, "confidence": round(self.confidence, 3),
                "current_usage_percent": round(self.current_usage_percent, 2),
                "growth_rate_mb_per_sec": round(self.growth_rate_mb_per_sec, 4),
                "predicted_oom_time_seconds": None if eta is None else round(eta, 1),
                "ordinary_oom_time_seconds": (None if self.ordinary_oom_time_seconds is None
                                              else round(self.ordinary_oom_time_seconds, 1)),
                "memory_full": self.memory_full,
                "recommendation": self.recommendation, "peak_bytes": int(self.peak_bytes),
                "total_bytes": int(self.total_bytes), "window_s": self.window_s, "trend_z": round(self.z, 2),
                "ts": self.ts}


def _eta_level(eta: float | None, c: MemoryDetectorConfig) -> RiskLevel:
    if eta is None:
        return RiskLevel.LOW
    if eta <= c.oom_critical_eta_s:
        return RiskLevel.CRITICAL
    if eta <= c.oom_high_eta_s:
        return RiskLevel.HIGH
    return RiskLevel.MEDIUM if eta <= c.oom_medium_eta_s else RiskLevel.LOW


def forecast_level(p: OomPrediction, c: MemoryDetectorConfig, transient: bool = False) -> RiskLevel:
    """The forecast's risk from its ETA. Critical says the OOM is minutes away: it needs the ordinary steps'
    peaks that close. A transient peak (a checkpoint's buffers, seen once in the window) within minutes of total
    memory fails again only if it recurs by then, which may be half an hour away: it raises the risk to high at
    most. Nor can a GPU that NVML shows full between steps too (`memory_full`): the forecast's line has reached
    total memory, but the OOM comes when the process needs more than its allocator's cache holds, which NVML
    does not show (the hook's allocator stats do). `transient=True`: the level of the earliest ETA alone."""
    soonest = _eta_level(p.predicted_oom_time_seconds, c)
    if transient:
        return soonest
    level = soonest
    if p.ordinary_oom_time_seconds is not None:
        capped = min(soonest, RiskLevel.HIGH, key=lambda lv: lv.rank)
        level = max(_eta_level(p.ordinary_oom_time_seconds, c), capped, key=lambda lv: lv.rank)
    if p.memory_full and level is RiskLevel.CRITICAL:
        level = RiskLevel.HIGH
    return level


def recommendation(level: RiskLevel, leak: bool, fragmented: bool) -> str:
    if level is RiskLevel.CRITICAL:
        text = ("Out of memory within minutes: lower the batch size or micro-batch now, or save a checkpoint "
                "while it still can.")
    elif level is RiskLevel.HIGH:
        text = ("Reduce the batch size or enable activation checkpointing before the peak reaches total "
                "memory.")
    elif level is RiskLevel.MEDIUM:
        text = "Memory is tight or growing: watch the forecast; consider a smaller micro-batch."
    else:
        text = "No action needed."
    if leak:
        text += (" Memory grows steadily between steps: look for tensors kept across steps (a loss summed "
                 "without .item(), outputs appended to a list, growing caches).")
    if fragmented:
        text += " The cache is fragmented: try PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True."
    return text


@dataclass
class Trend:
    """The latest fit of one series: slope (0 unless significant, novel and positive), its z, the window it
    was fitted on (None: no growth) and the upper envelope of the peaks now."""

    ts: float
    slope: float
    z: float
    window_s: float | None
    peak: float
    # the level the peaks reach again and again (PeakTrend._recurring; a checkpoint's buffers, seen once, are
    # above it); None: the same as `peak`
    ordinary: float | None = None

    def _eta_of(self, peak: float, total: float) -> float | None:
        return max(0.0, (total - peak) / self.slope) if self.slope > 0 and total > 0 else None

    def eta(self, total: float) -> float | None:
        return self._eta_of(self.peak, total)

    def eta_ordinary(self, total: float) -> float | None:
        """When the ordinary steps' peaks reach total memory (the highest one is a transient: it fails first
        only if it comes again by then). None exactly when `eta` is."""
        return self._eta_of(self.peak if self.ordinary is None else min(self.peak, self.ordinary), total)


def combined_trend(lasts: list[Trend | None]) -> Trend | None:
    """One series' forecast from its fits (peaks, troughs). Memory that persists lifts peaks and troughs
    alike, so where both see growth they estimate one rate: their slopes and envelopes are averaged, weighted
    by 1 / standard error^2. The z is the surer fit's (both come from the same samples, so together they are
    no stronger evidence), the window the longer. Where one sees growth, it speaks; where none, the peaks'."""
    done = [t for t in lasts if t is not None]
    growing = [t for t in done if t.window_s is not None and t.slope > 0 and t.z > 0]
    if len(growing) < 2:
        return growing[0] if growing else (done[0] if done else None)
    weights = [(t.z / t.slope) ** 2 for t in growing]
    total = sum(weights)
    slope = sum(w * t.slope for w, t in zip(weights, growing, strict=True)) / total
    peak = sum(w * t.peak for w, t in zip(weights, growing, strict=True)) / total
    ordinary = sum(w * (t.peak if t.ordinary is None else t.ordinary)
                   for w, t in zip(weights, growing, strict=True)) / total
    surer = max(growing, key=lambda t: t.z)
    return Trend(surer.ts, slope, surer.z, max(t.window_s or 0.0 for t in growing), peak, ordinary)
