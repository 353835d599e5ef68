"""Per-rank training-metric detector: one object per job/rank judges each step's metrics.

It wraps one RollingMAD per signal and turns verdicts into `Finding`s (detector, signal, value, expected,
threshold, severity, message, context). It knows nothing of Kafka, files or Prometheus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rankwatch.models.base import Score
from rankwatch.models.mad import DEFAULT_K, RollingMAD


@dataclass
class TrainingDetectorConfig:
    window: int = 50
    min_points: int = 20
    # k in median + k * 1.4826 * MAD, per signal. Grad norms are skewed, so they need a higher k for the same
    # false-alarm rate (measured: bench/bench_mad_threshold.py).
    loss_threshold_factor: float = DEFAULT_K
    grad_norm_threshold_factor: float = 12.0
    threshold_factor: float | None = None  # when set, one k for every signal (e.g. the 2.0 some users run)
    signals: tuple[str, ...] = ("loss", "grad_norm")
    critical_factor: float = 2.0  # robust z above critical_factor * k is critical

    def factor(self, signal: str) -> float:
        if self.threshold_factor is not None:
            return self.threshold_factor
        return float(getattr(self, f"{signal}_threshold_factor", DEFAULT_K))


@dataclass
class Finding:
    detector: str
    signal: str
    value: float
    expected: float | None
    threshold: float | None
    score: float | None
    severity: str
    message: str
    context: dict[str, Any] = field(default_factory=dict)


class RankMetricsDetector:
    """Judges one rank's stream of step metrics: `update(step, metrics) -> list[Finding]`."""

    def __init__(self, config: TrainingDetectorConfig | None = None) -> None:
        self.config = config or TrainingDetectorConfig()
        c = self.config
        self.detectors = {s: RollingMAD(window=c.window, k=c.factor(s), min_points=c.min_points)
                          for s in c.signals}

    def update(self, step: int, metrics: dict[str, float]) -> list[Finding]:
        out: list[Finding] = []
        for signal, det in self.detectors.items():
            raw = metrics.get(signal)
            if not isinstance(raw, (int, float)) or isinstance(raw, bool):
                continue  # absent or not a number: nothing to judge (the parser already dead-letters junk)
            x = float(raw)
            if not math.isfinite(x):
                out.append(Finding("nonfinite", signal, x, None, None, None, "critical",
                                   f"{signal} is {x} at step {step}", {"step": step}))
                continue
            s = det.update(x)
            if s.is_anomaly:
                out.append(self._mad_finding(signal, step, s))
        return out

    def _mad_finding(self, signal: str, step: int, s: Score) -> Finding:
        k = self.config.factor(signal)
        severity = "critical" if s.score > self.config.critical_factor * k else "warning"
        msg = (f"{signal} {s.value:.4g} at step {step} exceeds rolling median {s.expected:.4g} + "
               f"{k:g} x 1.4826 x MAD (threshold {s.threshold:.4g}, robust z {s.score:.1f})")
        ctx = {"step": step, f"{signal}_median": s.expected, f"{signal}_mad": (s.scale or 0) / 1.4826,
               f"{signal}_threshold": s.threshold}
        return Finding("mad", signal, s.value, s.expected, s.threshold, s.score, severity, msg, ctx)

    def save_state(self) -> dict[str, Any]:
        return {s: d.save_state() for s, d in self.detectors.items()}

    def load_state(self, state: dict[str, Any]) -> None:
        for s, st in state.items():
            if s in self.detectors:
                self.detectors[s].load_state(st)
