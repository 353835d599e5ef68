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

    @property
    def growth_bytes_per_s(self) -> float:
        return self.growth_rate_mb_per_sec * MIB

    def to_dict(self) -> dict[str, Any]:
        eta = self.predicted_oom_time_seconds
        return {"risk_level": self.risk_level.value, "confidence": round(self.confidence, 3),
                "current_usage_percent": round(self.current_usage_percent, 2),
                "growth_rate_mb_per_sec": round(self.growth_rate_mb_per_sec, 4),
                "predicted_oom_time_seconds": None if eta is None else round(eta, 1),
                "recommendation": self.recommendation, "peak_bytes": int(self.peak_bytes),
                "total_bytes": int(self.total_bytes), "window_s": self.window_s, "trend_z": round(self.z, 2),
                "ts": self.ts}


def forecast_level(p: OomPrediction, c: MemoryDetectorConfig) -> RiskLevel:
    eta = p.predicted_oom_time_seconds
    if eta is None:
        return RiskLevel.LOW
    if eta <= c.oom_critical_eta_s:
        return RiskLevel.CRITICAL
    if eta <= c.oom_high_eta_s:
        return RiskLevel.HIGH
    return RiskLevel.MEDIUM if eta <= c.oom_medium_eta_s else RiskLevel.LOW


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
