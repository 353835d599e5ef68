"""Per-GPU memory series reduced to per-cycle peaks and troughs, and the robust slope used on them.

A training step allocates activations in the forward pass and frees them in the backward pass, so used memory
swings by several GiB per step (the sawtooth). What runs out of memory is the *peak* of a step, so trends are
fitted to per-bucket maxima (a bucket spans a few steps at 1 Hz sampling), and leaks to per-bucket minima (what
stays allocated between steps). Two resolutions keep the work per sample small: fine buckets (5 s) for the
last few minutes, coarse buckets (60 s) for the last hours.

The slope is Siegel's repeated median: for every point, the median slope to all others; then the median of
those. It tolerates up to half the points being off the line (a checkpoint's staging buffers, an evaluation
phase), where least squares would follow them, and unlike Theil-Sen it stays near zero for a single step change
(a plateau raised once is not growth).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

MIB = float(2**20)
GIB = float(2**30)

# Gaussian efficiency of the repeated median is about 0.61: its standard error is ~1.28x least squares'.
RM_SE_FACTOR = 1.28


def median(a: np.ndarray) -> float:
    """Median of a small 1-d array (np.median's generality costs ~20 us a call; this runs thousands of times)."""
    n = len(a)
    k = n // 2
    if n % 2:
        return float(np.partition(a, k)[k])
    p = np.partition(a, (k - 1, k))
    return 0.5 * float(p[k - 1] + p[k])


def mad(a: np.ndarray) -> float:
    return median(np.abs(a - median(a)))


def repeated_median_slope(t: np.ndarray, y: np.ndarray) -> float:
    """Siegel's repeated-median slope. `t` strictly increasing (bucket times are)."""
    n = len(t)
    if n < 2:
        return 0.0
    dt = t[None, :] - t[:, None]
    dy = y[None, :] - y[:, None]
    np.fill_diagonal(dt, 1.0)
    slopes = dy / dt
    np.fill_diagonal(slopes, np.inf)  # each row: n-1 real slopes and +inf, which the lower median skips
    k = (n - 2) // 2  # lower median of the n-1 real slopes
    rows = np.partition(slopes, k, axis=1)[:, k]
    return median(rows)


def sxx(t: np.ndarray) -> float:
    d = t - t.mean()
    return float(d @ d)


def diff_noise(y: np.ndarray, floor: float) -> float:
    """Robust noise scale of a series around its local trend: MAD of first differences / sqrt(2).
    Differencing removes a linear trend, so growth does not inflate the noise estimate."""
    if len(y) < 4:
        return floor
    return max(floor, 1.4826 * mad(np.diff(y)) / math.sqrt(2.0))


def series_noise(t: np.ndarray, y: np.ndarray, floor: float) -> float:
    """Noise scale of bucket peaks: the larger of the first-difference scale and the residual scale around a
    robust line through the whole series. Sampling at a fixed interval aliases a periodic sawtooth into a slow
    beat (consecutive samples see nearly the same phase): first differences are then small while the series
    still wanders by the sawtooth's amplitude over minutes; the residual scale sees that."""
    base = diff_noise(y, floor)
    if len(y) < 8:
        return base
    return max(base, 1.4826 * mad(y - repeated_median_slope(t, y) * t))


@dataclass
class Bucket:
    """One time bucket of samples: the highest and lowest used memory (with when the highest was seen)."""

    index: int
    t_max: float
    hi: float
    lo: float
    n: int = 1

    def add(self, ts: float, used: float) -> None:
        if used > self.hi:
            self.hi, self.t_max = used, ts
        self.lo = min(self.lo, used)
        self.n += 1

    def merge(self, other: Bucket) -> None:
        if other.hi > self.hi:
            self.hi, self.t_max = other.hi, other.t_max
        self.lo = min(self.lo, other.lo)
        self.n += other.n

    def as_list(self) -> list[float]:
        return [self.index, self.t_max, self.hi, self.lo, self.n]

    @classmethod
    def from_list(cls, v: list[Any]) -> Bucket:
        return cls(int(v[0]), float(v[1]), float(v[2]), float(v[3]), int(v[4]))


class PeakSeries:
    """Closed fine and coarse buckets of one GPU's used memory. `add` returns True when a fine bucket closed
    (the moment detectors re-evaluate), and `coarse_closed` tells whether a coarse one closed too."""

    def __init__(self, fine_s: float, coarse_s: float, fine_span_s: float, coarse_span_s: float) -> None:
        self.fine_s, self.coarse_s = fine_s, coarse_s
        self.fine: deque[Bucket] = deque(maxlen=int(math.ceil(fine_span_s / fine_s)) + 2)
        self.coarse: deque[Bucket] = deque(maxlen=int(math.ceil(coarse_span_s / coarse_s)) + 2)
        self.open_fine: Bucket | None = None
        self.open_coarse: Bucket | None = None
        self.coarse_closed = False
        self._arrays: dict[bool, tuple] = {}

    def add(self, ts: float, used: float) -> bool:
        self.coarse_closed = False
        fi = int(math.floor(ts / self.fine_s))
        closed = False
        if self.open_fine is None:
            self.open_fine = Bucket(fi, ts, used, used)
        elif fi <= self.open_fine.index:  # a late sample counts in the open bucket, at its start at the earliest
            self.open_fine.add(max(ts, self.open_fine.index * self.fine_s), used)
        else:
            self._close_fine(self.open_fine)
            self.open_fine = Bucket(fi, ts, used, used)
            closed = True
        return closed

    def _close_fine(self, b: Bucket) -> None:
        self.fine.append(b)
        ci = int(math.floor(b.t_max / self.coarse_s))
        if self.open_coarse is None:
            self.open_coarse = Bucket(ci, b.t_max, b.hi, b.lo, b.n)
        elif ci <= self.open_coarse.index:
            self.open_coarse.merge(b)
        else:
            self.coarse.append(self.open_coarse)
            self.open_coarse = Bucket(ci, b.t_max, b.hi, b.lo, b.n)
            self.coarse_closed = True

    def arrays(self, coarse: bool, since: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(times of the maxima, maxima, minima) of closed buckets whose maximum is at or after `since`."""
        items = self.coarse if coarse else self.fine
        key = (coarse, len(items), items[-1].index if items else None)
        cached = self._arrays.get(coarse)
        if cached is None or cached[0] != key:
            n = len(items)
            cached = (key, np.fromiter((b.t_max for b in items), float, n),
                      np.fromiter((b.hi for b in items), float, n), np.fromiter((b.lo for b in items), float, n))
            self._arrays[coarse] = cached
        _, t, hi, lo = cached
        i = int(np.searchsorted(t, since, side="left"))
        return t[i:], hi[i:], lo[i:]

    def save_state(self) -> dict[str, Any]:
        return {"fine": [b.as_list() for b in self.fine], "coarse": [b.as_list() for b in self.coarse],
                "open_fine": self.open_fine.as_list() if self.open_fine else None,
                "open_coarse": self.open_coarse.as_list() if self.open_coarse else None}

    def load_state(self, state: dict[str, Any]) -> None:
        self.fine.clear()
        self.fine.extend(Bucket.from_list(v) for v in state.get("fine", []))
        self.coarse.clear()
        self.coarse.extend(Bucket.from_list(v) for v in state.get("coarse", []))
        of, oc = state.get("open_fine"), state.get("open_coarse")
        self.open_fine = Bucket.from_list(of) if of else None
        self.open_coarse = Bucket.from_list(oc) if oc else None


@dataclass
class SlopeFit:
    """A robust line through bucket peaks over one window."""

    window_s: float
    n: int
    slope: float  # bytes/s
    se: float  # standard error of the slope, bytes/s

    @property
    def z(self) -> float:
        return self.slope / self.se if self.se > 0 else 0.0


def fit_window(t: np.ndarray, y: np.ndarray, window_s: float, noise: float, min_points: int = 6,
               coverage: float = 0.7) -> SlopeFit | None:
    """Repeated-median slope over the points of one window, with its standard error from the series' noise.
    None when the window has too few points or does not yet span `coverage` of its length."""
    if len(t) < min_points or t[-1] - t[0] < coverage * window_s:
        return None
    s = sxx(t)
    if s <= 0:
        return None
    slope = repeated_median_slope(t, y)
    # The series' noise comes from its first differences (global); the window's own lack of fit (residual
    # MAD) catches what differencing hides: a staircase of allocator segments looks noiseless between the
    # stairs, and a window holding one stair must not pass for a steep, certain slope.
    lack = 1.4826 * mad(y - slope * t)
    return SlopeFit(window_s, len(t), slope, RM_SE_FACTOR * max(noise, lack) / math.sqrt(s))


def duration_text(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def pinned_at_total(series: PeakSeries, now: float, total: float, margin_pct: float) -> bool:
    """NVML's used memory within `margin_pct` of total at every sample of the last minute, troughs too: a
    caching allocator holding the whole GPU (a sawtooth's troughs lie GiBs below its peaks)."""
    recent = [b for b in series.fine if b.t_max >= now - 60.0]
    if series.open_fine is not None:
        recent.append(series.open_fine)
    floor = total * (1.0 - margin_pct / 100.0)
    return total > 0 and len(recent) >= 3 and all(b.lo >= floor for b in recent)
