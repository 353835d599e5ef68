"""The per rank/stream state of the op-timing model, one row per key in column arrays.

A worker judges ~4 records of each of 16k keys per micro-batch. Kept as one Python object per key, every op
paid for dozens of attribute reads, small-array slices and boxed scalars (~12 us per op, half of a worker's
event loop). Kept as columns, one step of every key in the batch is a handful of array operations, whatever the
number of keys (models/op_timing.py drives them). Each key's state is still its own: the columns are indexed by
the key's slot, and `save_key`/`load_key` give the per-key dict the state file has always held.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class RingRows:
    """A fixed-size float window per slot, in one 2-D array of twice that width: appends for many slots at
    once are one scatter; when a row fills, its newest half moves to the front (amortised O(1)), so every row's
    newest values stay contiguous at [n - k, n)."""

    def __init__(self, size: int, capacity: int) -> None:
        self.size = size
        self.buf = np.zeros((capacity, 2 * size), np.float32)
        self.n = np.zeros(capacity, np.int64)  # next write position per row
        self.filled = np.zeros(capacity, np.int64)  # values held per row: min(appends since clear, size)

    def grow(self, capacity: int) -> None:
        self.buf = _grown(self.buf, capacity)
        self.n, self.filled = _grown(self.n, capacity), _grown(self.filled, capacity)

    def append(self, slots: np.ndarray, x: np.ndarray) -> None:
        """One value for each of `slots` (distinct)."""
        full = self.n[slots] == 2 * self.size
        if full.any():
            f = slots[full]
            self.buf[f, : self.size] = self.buf[f, self.size:]
            self.n[f] = self.size
        n = self.n[slots]
        self.buf[slots, n] = x
        self.n[slots] = n + 1
        self.filled[slots] = np.minimum(self.filled[slots] + 1, self.size)

    def back(self, slots: np.ndarray, k: np.ndarray | int) -> np.ndarray:
        """The value k positions before each row's end (k = 1: the newest); k <= n, checked by the caller."""
        return self.buf[slots, self.n[slots] - k]

    def tails(self, slots: np.ndarray, k: int) -> np.ndarray:
        """[len(slots), k]: each row's newest k values, oldest first (rows hold >= k, checked by the caller)."""
        return self.buf[slots[:, None], self.n[slots][:, None] - k + np.arange(k)]

    def padded(self, slots: np.ndarray) -> np.ndarray:
        """[len(slots), size]: each row's values, NaN where a row holds fewer than `size`."""
        offs = np.arange(self.size)
        idx = self.n[slots][:, None] - self.size + offs
        out = self.buf[slots[:, None], np.maximum(idx, 0)]
        out[offs < (self.size - self.filled[slots])[:, None]] = np.nan
        return out

    def values(self, slot: int) -> np.ndarray:
        n = int(self.n[slot])
        return self.buf[slot, n - int(self.filled[slot]): n]

    def clear(self, slots: np.ndarray) -> None:
        self.n[slots] = 0
        self.filled[slots] = 0

    def load(self, slot: int, values: list[float]) -> None:
        values = values[-self.size:]
        self.buf[slot, : len(values)] = values
        self.n[slot] = self.filled[slot] = len(values)


def _grown(a: np.ndarray, capacity: int, fill: float = 0) -> np.ndarray:
    # zeros come from calloc: the rows past the keys in use take no memory until a key is added there
    shape = (capacity, *a.shape[1:])
    out = np.zeros(shape, a.dtype) if fill == 0 else np.full(shape, fill, a.dtype)
    out[: len(a)] = a
    return out


class Calibrations:
    """The residual windows of one predictor (seasonal reference or LSTM) for every key, and the threshold each
    key's own residuals give: median + k * 1.4826 * MAD, recomputed every 32 residuals."""

    RECALIBRATE = 32  # residuals between threshold recomputations per key (amortises the medians)
    MIN_POINTS = 32  # residuals a key needs before its first verdict
    FLOOR = 0.05  # smallest scale (log seconds): a perfectly regular stream must not alarm on microseconds
    _saved = ("threshold", "median", "scale", "since", "flagged_run")

    def __init__(self, window: int, capacity: int) -> None:
        self.res = RingRows(window, capacity)
        self.threshold = np.full(capacity, np.inf)
        self.median = np.zeros(capacity)
        self.scale = np.ones(capacity)
        self.since = np.zeros(capacity, np.int64)  # residuals learnt since the last recalibration
        self.flagged_run = np.zeros(capacity, np.int64)  # consecutive flagged residuals

    def grow(self, capacity: int) -> None:
        self.res.grow(capacity)
        self.threshold = _grown(self.threshold, capacity, np.inf)
        self.scale = _grown(self.scale, capacity, 1.0)
        for name in ("median", "since", "flagged_run"):
            setattr(self, name, _grown(getattr(self, name), capacity))

    def recalibrate(self, slots: np.ndarray, k: np.ndarray) -> None:
        """Recompute the thresholds of those of `slots` that are due (k: each slot's multiplier)."""
        due = ((self.since[slots] >= self.RECALIBRATE) | ~np.isfinite(self.threshold[slots])) & \
            (self.res.filled[slots] > 0)
        if not due.any():
            return
        s = slots[due]
        values = np.sort(self.res.padded(s), axis=1)  # NaN (rows not full yet) sort last
        half = (self.res.filled[s] // 2)[:, None]  # the upper median, as one partition would give it
        med = np.take_along_axis(values, half, axis=1)
        mad = np.take_along_axis(np.sort(np.abs(values - med), axis=1), half, axis=1)[:, 0]
        med = med[:, 0].astype(np.float64)
        self.median[s] = med
        self.scale[s] = np.maximum(1.4826 * mad.astype(np.float64), self.FLOOR)
        self.threshold[s] = med + k[due] * self.scale[s]
        self.since[s] = 0

    def judge(self, slots: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hit, robust z) of residuals r of `slots` (distinct); then learns them. Flagged residuals stay out
        (a slow episode must not widen its own threshold), unless the new level persists for a whole window:
        then it is the new normal."""
        warm = self.res.filled[slots] >= self.MIN_POINTS
        z = np.where(warm, (r - self.median[slots]) / self.scale[slots], 0.0)
        hit = warm & (r > self.threshold[slots])
        run = np.where(hit, self.flagged_run[slots] + 1, 0)
        self.flagged_run[slots] = run
        learn = ~hit | (run > self.res.size)
        s = slots[learn]
        self.res.append(s, r[learn])
        self.since[s] += 1
        return hit, z

    def save_key(self, slot: int) -> dict[str, Any]:
        thr = float(self.threshold[slot])
        return {"res": [float(v) for v in self.res.values(slot)], "threshold": thr if math.isfinite(thr) else None,
                "median": float(self.median[slot]), "scale": float(self.scale[slot]),
                "since": int(self.since[slot]), "flagged_run": int(self.flagged_run[slot])}

    def load_key(self, slot: int, st: dict[str, Any]) -> None:
        self.res.load(slot, st.get("res", []))
        for name in self._saved:
            if st.get(name) is not None:
                getattr(self, name)[slot] = st[name]


class Interner:
    """Values as small ints, in order of first sight (`values[i]` gives one back)."""

    def __init__(self, first: list[Any] | None = None) -> None:
        self.index: dict[Any, int] = {}
        self.values: list[Any] = []
        for v in first or []:
            self.id(v)

    def id(self, value: Any) -> int:
        try:
            i = self.index.get(value)
        except TypeError:  # an unhashable JSON value: compared by its text
            return self.id(str(value))
        if i is None:
            i = self.index[value] = len(self.values)
            self.values.append(value)
        return i

    def ids(self, values: list[Any]) -> list[int]:
        """`id` of each; one dict lookup per value when all were seen before (the usual batch)."""
        try:
            found = [self.index.get(v) for v in values]
        except TypeError:
            found = [None]
        return [self.id(v) for v in values] if None in found else found  # type: ignore[return-value]


class KeyTable:
    """Every key's run position, history, normalisation, period, calibrations and episode, as columns."""

    _float = {"last_ts": 0.0, "mean": 0.0, "var": 1.0, "sd": 1.0, "k": 0.0, "threshold": 0.0}
    _int = {"n_norm": 0, "last_comm": -1, "last_cnt": 0, "last_save": 0, "period": 0, "since_period": 0,
            "run": -1, "index": 0, "flag_run": -1, "flag_index": 0, "episode_hits": 0, "total": 0, "model": -1,
            "seq_len": 0}
    # per-key scalars of the state file, as they are named there
    _saved = ("mean", "var", "n_norm", "period", "since_period", "run", "index", "total", "episode_hits")

    def __init__(self, history: int, residual_window: int, capacity: int = 64) -> None:
        self.capacity = capacity
        self.slots: dict[Any, int] = {}  # key -> slot
        self.key_of: list[Any] = []
        for name, v in self._float.items():
            setattr(self, name, np.full(capacity, v, np.float64))
        for name, v in self._int.items():
            setattr(self, name, np.full(capacity, v, np.int64))
        self.has_ts = np.zeros(capacity, bool)
        self.y = RingRows(history, capacity)  # log intervals of the current run
        self.sref = RingRows(history, capacity)  # the seasonal reference that was predicted for each of them
        self.cal = {"seasonal": Calibrations(residual_window, capacity),
                    "lstm": Calibrations(residual_window, capacity)}
        # a key's op counts per communicator: the latest in columns, others (a stream that serves several
        # comms, rare) here, slot -> {comm id: count}
        self.other_counts: dict[int, dict[int, int]] = {}
        self.comms = Interner()  # the keys' comm pointers
        self.saves = Interner([None])  # save_count values (0: none)

    def __len__(self) -> int:
        return len(self.key_of)

    def add(self, key: Any) -> int:
        slot = len(self.key_of)
        if slot == self.capacity:
            self._grow(2 * self.capacity)
        self.slots[key] = slot
        self.key_of.append(key)
        return slot

    def _grow(self, capacity: int) -> None:
        for name, v in {**self._float, **self._int}.items():
            setattr(self, name, _grown(getattr(self, name), capacity, v))
        self.has_ts = _grown(self.has_ts, capacity)
        self.y.grow(capacity)
        self.sref.grow(capacity)
        for c in self.cal.values():
            c.grow(capacity)
        self.capacity = capacity

    def reset_runs(self, slots: np.ndarray) -> None:
        """A new continuous run for each of `slots`: its history and period start over."""
        self.run[slots] += 1
        self.index[slots] = 0
        self.y.clear(slots)
        self.sref.clear(slots)
        self.has_ts[slots] = False
        self.period[slots] = 0
        self.since_period[slots] = 0

    def switch_comm(self, slot: int, comm: int) -> int | None:
        """The key's op is on another comm than its previous one: the previous comm's count moves aside, and
        the count last seen on `comm` (if any) comes back."""
        other = self.other_counts.setdefault(slot, {})
        other[int(self.last_comm[slot])] = int(self.last_cnt[slot])
        prev = other.pop(comm, None)
        if not other:
            del self.other_counts[slot]
        return prev

    def counts(self, slot: int) -> dict[str, int]:
        out = {self.comms.values[c]: n for c, n in self.other_counts.get(slot, {}).items()}
        if self.last_comm[slot] >= 0:
            out[self.comms.values[self.last_comm[slot]]] = int(self.last_cnt[slot])
        return out

    # ---- persistence: the per-key dict of the state file ----------------------------------------------
    def save_key(self, slot: int) -> dict[str, Any]:
        d: dict[str, Any] = {name: getattr(self, name)[slot].item() for name in self._saved}
        d.update({"y": [float(v) for v in self.y.values(slot)], "sref": [float(v) for v in self.sref.values(slot)],
                  "last_ts": float(self.last_ts[slot]) if self.has_ts[slot] else None,
                  "last_count": self.counts(slot), "last_save": self.saves.values[self.last_save[slot]],
                  "last_flag": [int(self.flag_run[slot]), int(self.flag_index[slot])],
                  "cal": {name: c.save_key(slot) for name, c in self.cal.items()}})
        return d

    def load_key(self, slot: int, st: dict[str, Any]) -> None:
        self.y.load(slot, st.get("y", []))
        self.sref.load(slot, st.get("sref", []))
        for name in self._saved:
            if st.get(name) is not None:
                getattr(self, name)[slot] = st[name]
        self.sd[slot] = math.sqrt(self.var[slot])
        if st.get("last_ts") is not None:
            self.last_ts[slot], self.has_ts[slot] = float(st["last_ts"]), True
        self.last_save[slot] = self.saves.id(st.get("last_save"))
        counts = {self.comms.id(str(c)): int(n) for c, n in (st.get("last_count") or {}).items()}
        if counts:  # the latest of them is not known from the file: any one can be the column's
            c, n = counts.popitem()
            self.last_comm[slot], self.last_cnt[slot] = c, n
            if counts:
                self.other_counts[slot] = counts
        if isinstance(st.get("last_flag"), list) and len(st["last_flag"]) == 2:
            self.flag_run[slot], self.flag_index[slot] = (int(x) for x in st["last_flag"])
        for name, cal in (st.get("cal") or {}).items():
            if name in self.cal:
                self.cal[name].load_key(slot, cal)
