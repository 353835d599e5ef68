"""OOM forecast of one GPU: when will the per-cycle peak reach total memory? Plain classes, no I/O.

A robust slope of the per-cycle peaks (models/memory_series.py) over the longest recent window whose slope
agrees with the shorter ones (growth that began two minutes ago is fitted on those two minutes, a steady leak on
the last hour), the upper envelope of the peaks, and from both the seconds until the peak reaches total memory.
Risk: critical (ETA <= 2 min), high (<= 15 min), medium (<= 2 h, or usage above `oom_usage_threshold_pct`),
low; critical needs the ordinary steps' peaks that close, not only a transient one (`forecast_level`). Each
series a GPU reports is fitted on its own: NVML's used memory, and with the hook's allocator stats what
the process needs. Each is fitted twice (`PeakTrend`), on its per-bucket peaks and on its troughs (what persists
between steps, better sampled by a sparse sampler and barely moved by an evaluation phase's smaller activations);
where both see growth they are averaged (`combined_trend`).

An `oom` anomaly is raised when the forecast risk is at least `oom_alert_level` (medium: info, high: warning,
critical: critical) for `oom_confirm` evaluations in a row, with a slope sure enough for that level and a window
at least a quarter of the ETA (minutes of evidence do not tell an hour ahead). It is then **updated** (a new
anomaly) only when the risk level rises or the ETA has halved since the last one (by 10 s at least); the episode
ends after `oom_clear_s` without an alarm-grade forecast. So a leak that ends in an OOM gives a handful of
anomalies (e.g. medium at 1.5 h, 40 min, high at 14 min, 7 min, critical at 1.7 min), never one per sample.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from rankwatch.models.memory_series import (
    GIB,
    MIB,
    PeakSeries,
    SlopeFit,
    duration_text,
    fit_window,
    pinned_at_total,
    repeated_median_slope,
    series_noise,
)
from rankwatch.models.oom_prediction import (
    OomPrediction,
    RiskLevel,
    Trend,
    combined_trend,
    forecast_level,
    recommendation,
)
from rankwatch.models.training import Finding

if TYPE_CHECKING:
    from rankwatch.models.memory import MemoryDetectorConfig


class PeakTrend:
    """Fits one peak series (see module); keeps what is costly to recompute between evaluations."""

    def __init__(self, config: MemoryDetectorConfig, troughs: bool = False) -> None:
        self.config = config
        self.troughs = troughs  # fit the per-bucket troughs instead of the peaks (see OomForecaster)
        # windows may come from env/CLI as text: floats, shortest first
        self.windows = sorted(float(w) for w in config.oom_windows_s)
        self.fine_span = max([w for w in self.windows if w <= 8 * config.mem_coarse_bucket_s] or [0.0])
        self.last: Trend | None = None
        self._coarse_key: tuple[int, int] | None = None
        self._coarse_fits: list[SlopeFit | None] | None = None  # None: to compute (a coarse bucket closed)
        self._fine_noise: float | None = None
        self._coarse_noise: float | None = None
        self._global: SlopeFit | None = None
        self._skipped = 0
        self.start = -math.inf  # no fit reaches back before this: the job's start is no trend

    def _points(self, series: PeakSeries, coarse: bool, since: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(times, the fitted statistic: per-bucket peaks or troughs, troughs) of the closed buckets since."""
        t, hi, lo = series.arrays(coarse, since)
        return t, (lo if self.troughs else hi), lo

    def save_state(self) -> dict[str, Any]:
        last = self.last
        return {"troughs": self.troughs, "skipped": self._skipped,
                "last": None if last is None else [last.ts, last.slope, last.z, last.window_s, last.peak,
                                                   last.ordinary],
                # the noise scales are measured when a coarse bucket closes, not at every fit
                "noise": [self._coarse_key, self._fine_noise, self._coarse_noise]}

    def load_state(self, state: dict[str, Any]) -> None:
        self._skipped = int(state.get("skipped", 0))
        key, fine, coarse = state.get("noise") or (None, None, None)
        self._coarse_key = None if key is None else (int(key[0]), int(key[1]))
        self._fine_noise = None if fine is None else float(fine)
        self._coarse_noise = None if coarse is None else float(coarse)
        last = state.get("last")
        self.last = None if last is None else Trend(*(None if v is None else float(v) for v in last))

    # ---- the slope -----------------------------------------------------------------------------------------
    def _refresh(self, series: PeakSeries, now: float) -> None:
        """Once a minute (when a coarse bucket closes): the noise of the fine peaks over the last 20 min (long
        enough to see a slow aliasing beat whole) and the fits of the coarse windows."""
        key = (len(series.coarse), series.coarse[-1].index if series.coarse else -1)
        if key != self._coarse_key or self._fine_noise is None or self._coarse_noise is None:
            floor = self.config.mem_noise_floor_bytes
            self._coarse_key = key
            self._fine_noise = series_noise(*self._points(series, False, -math.inf)[:2], floor)
            self._coarse_noise = series_noise(*self._points(series, True, -math.inf)[:2], floor)
            self._coarse_fits = None
        if self._coarse_fits is not None:
            return
        end = series.coarse[-1].t_max if series.coarse else now
        self._coarse_fits = []
        for w in (w for w in self.windows if w > self.fine_span):
            t, hi, _ = self._points(series, True, max(end - w, self.start))
            self._coarse_fits.append(fit_window(t, hi, w, self._coarse_noise, coverage=0.85))
        self._global = None
        for fit in reversed(self._coarse_fits):  # longest first
            if fit is not None and self._linear(series, end, fit):
                self._global = fit
                break

    def _linear(self, series: PeakSeries, end: float, fit: SlopeFit) -> bool:
        """The global forecast's check: both halves of the window grow at the window's rate (growth that
        began inside the window, or stopped, fails it). A half grows when its slope agrees with the window's,
        or, for a staircase (a caching allocator that takes memory in steps, a robust slope of one step is
        flat), when the highest peak of its newer half is above that of its older half by a quarter of what
        the window's slope predicts."""
        t, hi, _ = self._points(series, True, end - fit.window_s)
        w = fit.window_s
        agree = self.config.oom_agree_z
        for lo_t, hi_t in ((end - w, end - w / 2), (end - w / 2, end + 1.0)):
            m = (t >= lo_t) & (t < hi_t)
            half = fit_window(t[m], hi[m], w / 2, self._coarse_noise or 0.0, min_points=4)
            if half is not None and abs(half.slope - fit.slope) <= agree * math.hypot(half.se, fit.se):
                continue
            q = (lo_t + hi_t) / 2
            older, newer = hi[m & (t < q)], hi[m & (t >= q)]
            if not len(older) or not len(newer) or newer.max() - older.max() < 0.25 * fit.slope * w / 4:
                return False
        # ... and by similar amounts: a one-off jump (the first checkpoint's buffers cached) in one half and
        # a slow climb in the other is not one steady growth
        mid = end - w / 2
        rises = [float(hi[(t >= a) & (t < b)].max() - hi[(t >= a) & (t < b)].min()) if ((t >= a) & (t < b)).any()
                 else 0.0 for a, b in ((end - w, mid), (mid, end + 1.0))]
        return min(rises) >= max(rises) / 2

    def _older(self, series: PeakSeries, now: float, w: float, prev: float) -> SlopeFit | None:
        """The fit of the part of window `w` older than window `prev`: from fine buckets while they reach back
        that far (more points), else from coarse ones."""
        tf, hf, _ = self._points(series, False, now - w)
        if len(tf) and tf[0] <= now - 0.9 * w:
            m = tf < now - prev
            return fit_window(tf[m], hf[m], w - prev, self._fine_noise or 0.0, min_points=4)
        tc, hc, _ = self._points(series, True, now - w)
        m = tc < now - prev
        return fit_window(tc[m], hc[m], w - prev, self._coarse_noise or 0.0, min_points=4)

    def _chain(self, series: PeakSeries, now: float) -> tuple[SlopeFit, bool] | None:
        """Start from the most recent (shortest) window; take each longer one while its slope is within
        `oom_agree_z` standard errors of the current choice's (Lepski's rule: a longer window is taken only
        while its bias stays below the shorter one's noise) and the slope of its older part (the time the
        current choice does not cover) agrees as well. Growth that began two minutes ago is then fitted on
        those two minutes (its older part is flat), a steady leak on the longest window."""
        agree = self.config.oom_agree_z
        self._refresh(series, now)
        best: tuple[SlopeFit, bool] | None = None
        prev = 0.0
        coarse_fits = iter(self._coarse_fits)
        for w in self.windows:
            coarse = w > self.fine_span
            if coarse:
                fit = next(coarse_fits, None)
            else:
                t, hi, _ = self._points(series, False, max(now - w, self.start))
                fit = fit_window(t, hi, w, self._fine_noise or 0.0)
            if fit is None:
                if best is not None:
                    break  # no longer history
                prev = w
                continue
            if best is not None:
                b = best[0]
                if abs(fit.slope - b.slope) > agree * b.se:
                    break
                older = self._older(series, now, w, prev)
                if older is not None and abs(older.slope - b.slope) > agree * math.hypot(older.se, b.se):
                    break

            best = (fit, coarse)
            prev = w
        return best

    def _novel(self, series: PeakSeries, now: float, fit: SlopeFit) -> bool:
        """Growth shows up as new highs: the peaks of the window's newer half must rise above every peak of
        the time before it (the window's older half and as much history again) by a quarter of what the slope
        predicts. A wave of the same height seen before is not growth: an evaluation phase, or a sawtooth
        aliased into a slow beat by sampling at a fixed interval, rises like a leak for a minute or two.
        Peaks, whichever statistic was fitted: what runs out of memory is the peak, so it must rise."""
        w = fit.window_s
        mid = now - w / 2
        start = now - w - max(600.0, w)
        tf, hf, _ = series.arrays(False, start)
        tc, hc, _ = series.arrays(True, start)
        recent = np.concatenate([hf[tf >= mid], hc[tc >= mid]])
        older = np.concatenate([hf[tf < mid], hc[tc < mid - series.coarse_s]])
        if not len(recent) or not len(older):
            return True
        return float(recent.max() - older.max()) >= 0.25 * fit.slope * w / 2

    def _needs_fit(self, series: PeakSeries) -> bool:
        """Fitting every window every 5 s costs; growth needs new highs, so skip while nothing is growing:
        no forecast last time, no coarse bucket closed, and the bucket that just closed is not the highest of
        the last 10 min. Refreshed at least every 30 s regardless."""
        t, hi, _ = series.arrays(False, -math.inf)  # new highs of the peaks, whichever statistic is fitted
        if self.last is None or self.last.window_s is not None or len(hi) < 2 or self._skipped >= 5:
            return True
        key = (len(series.coarse), series.coarse[-1].index if series.coarse else -1)
        if key != self._coarse_key:
            return True
        i = int(np.searchsorted(t, t[-1] - 600.0))
        return bool(hi[-1] > hi[i:-1].max()) if i < len(hi) - 1 else True

    def _sustained(self, series: PeakSeries, now: float, fit: SlopeFit, coarse: bool) -> bool:
        """The local forecast's check: both halves of its window grow, by a quarter of its slope at least.
        A burst (a caching allocator taking its segments for a checkpoint in a few steps) fills one half."""
        t, hi, _ = self._points(series, coarse, now - fit.window_s)
        mid = now - fit.window_s / 2
        for m in (t < mid, t >= mid):
            if m.sum() < 3 or repeated_median_slope(t[m], hi[m]) < 0.25 * fit.slope:
                return False
        return True

    def _trend(self, series: PeakSeries, now: float, used: float, fit: SlopeFit) -> Trend:
        # upper envelope: the highest peak of the window's newest third, carried along the slope to now.
        # Older peaks would carry the slope's error further, and where growth began inside the window its
        # flat start would be carried up the slope.
        span = max(2 * series.fine_s, fit.window_s / 3)
        tf, hf, _ = series.arrays(False, now - span)
        tc, hc, _ = series.arrays(True, now - span)
        t = np.concatenate([tc, tf, [now]])
        carried = np.concatenate([hc - fit.slope * (tc - now), hf - fit.slope * (tf - now), [used]])
        return Trend(now, fit.slope, fit.z, fit.window_s, float(np.max(carried)),
                     self._recurring(t, carried, now, span))

    def _recurring(self, t: np.ndarray, carried: np.ndarray, now: float, span: float) -> float | None:
        """The level the peaks reach again and again: the median of the maxima of the span's equal blocks of at
        most `oom_recur_s` (at least 5). A checkpoint's buffers or an evaluation phase top one block, or two
        where they straddle a boundary; the longest batch, back every few minutes, tops most. None (the highest
        peak) where blocks would be under a minute: they would miss a sparsely sampled sawtooth's tops."""
        n = max(5, int(span // self.config.oom_recur_s))
        block = span / n
        if block < 60.0:
            return None
        k = np.clip(((now - t) // block).astype(int), 0, n - 1)
        tops = np.full(n, -np.inf)
        np.maximum.at(tops, k, carried)
        tops = tops[np.isfinite(tops)]
        return float(np.median(tops)) if len(tops) >= 5 else None

    def fit(self, series: PeakSeries, now: float, used: float, total: float, start: float = -math.inf) -> Trend:
        """Two candidates: the local one (the chain from the newest data, so growth that just began counts at
        its own rate) and the global one (the longest window that grew steadily throughout: a staircase
        whose steps come every half hour is growth, though the last minutes look flat). The surer counts."""
        c = self.config
        self.start = start
        if not self._needs_fit(series):
            self._skipped += 1
            self.last = Trend(now, 0.0, 0.0, None, max(self.last.peak if self.last else used, used))
            return self.last
        self._skipped = 0
        chosen = self._chain(series, now)
        cands: list[Trend] = []
        z = 0.0
        if chosen is not None:
            fit, coarse = chosen
            z = fit.z
            if (fit.z >= c.oom_min_z and fit.slope > 0 and self._novel(series, now, fit)
                    and self._sustained(series, now, fit, coarse)):
                cands.append(self._trend(series, now, used, fit))
        g = self._global
        if g is not None and g.z >= c.oom_min_z and g.slope > 0 and self._novel(series, now, g):
            cands.append(self._trend(series, now, used, g))
        if cands:
            self.last = max(cands, key=lambda tr: tr.z)  # the surer of the two
        else:
            recent = [b.hi for b in series.fine if b.t_max >= now - self.fine_span]
            self.last = Trend(now, 0.0, z, None, max(recent + [used]))
        return self.last


class OomForecaster:
    """Forecast of when a GPU's per-cycle peak reaches its total memory; raises `oom` findings (see module)."""

    def __init__(self, config: MemoryDetectorConfig) -> None:
        self.config = config
        # per series: the fit of its peaks and, with `oom_fit_troughs`, of its troughs
        self.trends: dict[str, list[PeakTrend]] = {}
        self.exact: set[str] = set()  # series whose buckets hold the real peaks (see evaluate)
        self.first_ts: float | None = None
        self.raised: RiskLevel | None = None
        self.raised_eta: float | None = None
        self.streak = 0
        self.calm_since: float | None = None
        self.last: OomPrediction | None = None
        self.full = False  # NVML's used memory pinned at total, troughs too (see forecast_level)

    @property
    def fine_span(self) -> float:
        return PeakTrend(self.config).fine_span

    def evaluate(self, name: str, series: PeakSeries, now: float, used: float, total: float, leak: bool = False,
                 fragmented: bool = False, exact_peaks: bool = False) -> OomPrediction:
        """Fit series `name` ("used": NVML, "need": the allocator's) and predict from the recent fits.
        `exact_peaks`: the series' buckets hold each interval's real peak (the hook's peak counters); once
        told, the forecaster remembers it for the series (saved with its state)."""
        if self.first_ts is None:
            self.first_ts = now
        if exact_peaks:
            self.exact.add(name)
        fits = self.trends.get(name)
        if fits is None:
            fits = self.trends[name] = [PeakTrend(self.config)]
            if self.config.oom_fit_troughs:
                fits.append(PeakTrend(self.config, troughs=True))
        for fit in fits:
            fit.fit(series, now, used, total, self.first_ts + self.config.oom_warmup_s)
        if name == "used":
            self.full = pinned_at_total(series, now, total, self.config.oom_full_margin_pct)
        # NVML's used memory is what runs out; the allocator's view (sampled at a random phase of the step,
        # so noisier) speaks when used memory shows no growth: a caching allocator at its ceiling
        fresh = {n: t for n, t in ((n, combined_trend([x.last for x in f])) for n, f in self.trends.items())
                 if t is not None and now - t.ts <= 60.0}
        # The allocator's view is sampled at a random phase of the step: at a fixed sampling interval a
        # sawtooth aliases into slow waves that rise like growth for minutes, so it speaks only on a window
        # long enough to see such a wave whole (`oom_need_min_window_s`).
        # A series with the real peaks of each interval neither aliases nor misses a step's peak: it speaks
        # first, on any window.
        order = (*sorted(self.exact), "used", *sorted(fresh))
        growing = [fresh[n] for n in dict.fromkeys(order) if n in fresh and fresh[n].eta(total) is not None
                   and (n == "used" or n in self.exact
                        or (fresh[n].window_s or 0.0) >= self.config.oom_need_min_window_s)]
        if growing:
            pick = growing[0]
        else:  # no series grows (or only the allocator's, on too short a window): no forecast
            base = fresh.get("used") or combined_trend([x.last for x in fits])
            assert base is not None  # the series just fitted
            pick = base if base.eta(total) is None else Trend(base.ts, 0.0, base.z, None, base.peak)
        return self._predict(now, used, total, pick, leak, fragmented)

    def _predict(self, now: float, used: float, total: float, trend: Trend, leak: bool, fragmented: bool
                 ) -> OomPrediction:
        eta, ordinary = trend.eta(total), trend.eta_ordinary(total)
        usage = 100.0 * used / total if total > 0 else 0.0
        z = trend.z
        confidence = 0.0 if z <= 1 or eta is None else min(0.99, 1.0 - 1.0 / z)  # 1 - (standard error / slope)
        p = OomPrediction(now, RiskLevel.LOW, confidence, usage, trend.slope / MIB, eta, "", trend.peak, total,
                          trend.window_s, z, ordinary, self.full)
        level = forecast_level(p, self.config)
        if level is RiskLevel.LOW and usage >= self.config.oom_usage_threshold_pct:
            level = RiskLevel.MEDIUM
        p.risk_level, p.recommendation = level, recommendation(level, leak, fragmented)
        self.last = p
        return p

    def judge(self, p: OomPrediction) -> tuple[Finding | None, str]:
        """The episode logic: raise once, update when the risk rises or the ETA halves, end after calm."""
        c = self.config
        floor = RiskLevel(c.oom_alert_level).rank
        # the forecast's own level: usage alone (risk medium above the usage threshold) raises no forecast
        lvl = forecast_level(p, c)
        # how sure and how soon to raise follows the earliest ETA (the highest peak's), as for any forecast;
        # the level raised is capped while only a transient is that close (forecast_level)
        soonest = forecast_level(p, c, transient=True)
        alarming = lvl.rank >= floor
        self.streak = self.streak + 1 if alarming else 0
        if not alarming:
            self.calm_since = p.ts if self.calm_since is None else self.calm_since
            if self.raised is not None and p.ts - self.calm_since >= c.oom_clear_s:
                self.raised, self.raised_eta = None, None
        else:
            self.calm_since = None
        confirm = 1 if p.z >= 3 * c.oom_min_z and soonest is RiskLevel.CRITICAL else c.oom_confirm
        needed = {RiskLevel.MEDIUM: c.oom_medium_min_z, RiskLevel.HIGH: c.oom_high_min_z}.get(soonest, 0.0)
        if p.z < needed:
            return None, ""  # the streak counts on, so a sure forecast is raised at once
        if (p.window_s or 0) * c.oom_max_extrapolation < (p.predicted_oom_time_seconds or 0):
            return None, ""  # minutes of evidence do not tell an hour ahead: wait for a longer consistent window
        if not alarming or self.streak < confirm or p.ts - (self.first_ts or p.ts) < c.oom_warmup_s:
            return None, ""
        eta = float(p.predicted_oom_time_seconds)  # type: ignore[arg-type]
        # updates follow the ordinary steps' ETA: a checkpoint's buffers climbing for 20 s would halve the
        # transient's ETA again and again, an anomaly each time, with no news for the user
        ordinary = float(p.ordinary_oom_time_seconds)  # type: ignore[arg-type]  # set wherever eta is
        if self.raised is None:
            why = "raised"
        elif lvl.rank > self.raised.rank:
            why = "risk_rose"
        elif self.raised_eta is not None and ordinary < self.raised_eta / 2 and self.raised_eta - ordinary >= 10.0:
            why = "eta_halved"
        else:
            return None, ""
        self.raised, self.raised_eta = lvl, ordinary
        sev = {RiskLevel.CRITICAL: "critical", RiskLevel.HIGH: "warning"}.get(lvl, "info")
        when = f"out of memory in ~{duration_text(eta)}"
        if p.memory_full and soonest.rank > lvl.rank:
            when = ("the GPU's memory is full between steps too: the allocator's cache holds all of it, and when "
                    "the process needs more than that cache it runs out of memory; how much of the cache is free "
                    "NVML does not show (TrainingMonitor's allocator stats do)")
        elif soonest.rank > lvl.rank or ordinary >= 1.25 * eta + 10.0:
            when = (f"the next peak as high as the last transient one (a checkpoint, the longest batch) runs out "
                    f"of memory in ~{duration_text(eta)}, ordinary steps in ~{duration_text(ordinary)}")
        msg = (f"{when}: peak {p.peak_bytes / GIB:.1f} of {p.total_bytes / GIB:.1f} "
               f"GiB, growing {p.growth_rate_mb_per_sec:.2f} MB/s over the last {duration_text(p.window_s or 0)} "
               f"(risk {lvl.value}, confidence {p.confidence:.2f}). {p.recommendation}")
        ctx = {**p.to_dict(), "update": why}
        ctx.pop("ts")
        threshold = {RiskLevel.CRITICAL: c.oom_critical_eta_s, RiskLevel.HIGH: c.oom_high_eta_s}.get(
            lvl, c.oom_medium_eta_s)
        return Finding("oom", "gpu_memory", eta, None, threshold, p.z, sev, msg, ctx), why

    def save_state(self) -> dict[str, Any]:
        # the fits' last results decide whether the next evaluation refits or skips (PeakTrend._needs_fit):
        # kept, so a restored worker judges as one that never stopped
        fits = {name: [f.save_state() for f in fs] for name, fs in self.trends.items()}
        return {"first_ts": self.first_ts, "raised": self.raised.value if self.raised else None,
                "raised_eta": self.raised_eta, "streak": self.streak, "calm_since": self.calm_since, "fits": fits,
                "exact": sorted(self.exact), "full": self.full}

    def load_state(self, state: dict[str, Any]) -> None:
        self.trends = {}
        for name, saved in (state.get("fits") or {}).items():
            fits = self.trends[name] = [PeakTrend(self.config, troughs=bool(f.get("troughs"))) for f in saved]
            for f, st in zip(fits, saved, strict=True):
                f.load_state(st)
        self.exact = {str(n) for n in state.get("exact", [])}
        self.first_ts = state.get("first_ts")
        self.raised = RiskLevel(state["raised"]) if state.get("raised") else None
        self.raised_eta = state.get("raised_eta")
        self.streak = int(state.get("streak", 0))
        self.calm_since = state.get("calm_since")
        self.full = bool(state.get("full", False))


