"""Rolling median + MAD detector (robust z-score), the workhorse for noisy training curves."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from rankwatch.models.base import Score, StateMixin

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
# Chosen by measurement (bench/bench_mad_threshold.py, docs/DETECTION.md): on heavy-tailed loss noise, k = 3.5
# gives dozens of false alarms per rank per 10k steps; k = 8 keeps loss near one while still catching every
# 1.5x loss spike. Grad norms are skewed (log-normal), so their default is higher (models/training.py).
DEFAULT_K = 8.0


class RollingMAD(StateMixin):
    """Flags x when x > median + k * 1.4826 * MAD over the last `window` accepted points.

    - Warm-up: no verdict until `min_points` values have been learned.
    - Contamination guard: a flagged value is not learned (unless `admit_outliers`), so a spike does not
      drag the baseline up; after `readmit_after` consecutive flags the level is taken as the new normal
      (a real regime change, e.g. a new data mix), so the detector cannot stay latched forever.
    - `min_rel_scale` floors the scale at a fraction of |median| so a nearly constant signal (MAD≈0) does
      not alarm on rounding noise.
    - `direction`: "up" (spikes: loss, grad norm, step time), "down" (drops) or "both".
    """

    _state_fields = ("_window", "_consecutive", "_count")

    def __init__(self, window: int = 50, k: float = DEFAULT_K, min_points: int = 20, direction: str = "up",
                 admit_outliers: bool = False, readmit_after: int = 10, min_rel_scale: float = 1e-3) -> None:
        if window < 3:
            raise ValueError("window must be >= 3")
        if direction not in ("up", "down", "both"):
            raise ValueError("direction must be up, down or both")
        self.window = window
        self.k = k
        self.min_points = min(min_points, window)
        self.direction = direction
        self.admit_outliers = admit_outliers
        self.readmit_after = readmit_after
        self.min_rel_scale = min_rel_scale
        self._window: deque[float] = deque(maxlen=window)
        self._consecutive = 0
        self._count = 0
        self._stats: tuple[float, float] | None = None  # of the window as it is: asked for 2-3 times per value

    def _restore(self, name: str, value: Any) -> None:
        if name == "_window":
            self._window = deque((float(v) for v in value), maxlen=self.window)
            self._stats = None
        else:
            setattr(self, name, value)

    def stats(self) -> tuple[float, float]:
        """(median, scale = 1.4826 * MAD) of the current window."""
        if getattr(self, "_stats", None) is None:  # (an instance pickled before the cache existed has none)
            self._stats = self._compute_stats()
        return self._stats  # type: ignore[return-value]

    def _compute_stats(self) -> tuple[float, float]:
        s = sorted(self._window)
        n = len(s)
        med = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
        dev = sorted(abs(v - med) for v in s)
        mad = dev[n // 2] if n % 2 else 0.5 * (dev[n // 2 - 1] + dev[n // 2])
        scale = max(MAD_TO_SIGMA * mad, self.min_rel_scale * abs(med), 1e-12)
        return med, scale

    @property
    def ready(self) -> bool:
        return len(self._window) >= self.min_points

    def score_one(self, x: float) -> Score:
        x = float(x)
        if not self.ready or not math.isfinite(x):
            return Score(x, None, None, None, 0.0, False, self.ready)
        med, scale = self.stats()
        z = (x - med) / scale
        if self.direction == "up":
            hit, threshold = z > self.k, med + self.k * scale
        elif self.direction == "down":
            hit, threshold = z < -self.k, med - self.k * scale
        else:
            hit, threshold = abs(z) > self.k, med + math.copysign(self.k * scale, z)
        return Score(x, med, scale, threshold, z, hit, True)

    def learn_one(self, x: float) -> None:
        x = float(x)
        if math.isfinite(x):
            self._window.append(x)
            self._count += 1
            self._stats = None

    def update(self, x: float) -> Score:
        s = self.score_one(x)
        if not s.is_anomaly:
            self._consecutive = 0
            self.learn_one(x)
        else:
            self._consecutive += 1
            if self.admit_outliers or self._consecutive >= self.readmit_after:
                self.learn_one(x)
        return s


