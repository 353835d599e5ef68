"""Per rank/stream collective timing: continuous runs, interval prediction, calibrated verdicts.

For every key (job/rank/stream) the modelled series is the interval between consecutive ops of a continuous run
(opCount +1 on the same communicator, same or continuing save_count). Intervals are heavy-tailed and periodic
(bucket gaps inside a step, then the gap to the next step), so the model works on y = log(interval) and keeps,
per key:
- its normalisation (EWMA mean/sd of y), so one shared network serves streams of any speed;
- its period p (ops per step, re-estimated from its own history) and the seasonal reference
  median(y[-p], y[-2p], y[-3p]): the moving-average predictor that answers during warm-up and without torch;
- a residual window per predictor, recalibrated every 16 ops: an op is anomalous when its residual exceeds the
  key's own median + k * 1.4826 * MAD *and* the interval is at least `min_ratio` times the prediction. k is
  chosen by measurement (bench/bench_op_timing.py, docs/DETECTION.md). The seed tool's fixed rule (relative
  error > threshold) stays available with `op_verdict = "relative"`.

The LSTM (models/op_lstm.py, shared per job) is used for a job's verdicts once it predicts that job's intervals
better than the seasonal predictor does (both are scored on every op, before either learns from it).
Anomalous ops of a key fewer than `op_episode_gap` ops apart form one episode, reported once, when its
`op_confirm`-th anomalous op arrives (its onset): on long normal runs the findings left were single slow
collectives (heavy-tailed jitter, 1.6-2x), which a slow stream or rank never is (docs/DETECTION.md).
"""

from __future__ import annotations

import math
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rankwatch.models.op_lstm import CHUNK, SharedIntervalModel, infer_executor, torch_available

EPS = 1e-4  # s: timestamp resolution floor (logs print ms or us); keeps log() finite for equal timestamps
_RECALIBRATE = 32  # ops between threshold recomputations per key (amortises the medians)


@dataclass
class OpTimingConfig:
    op_sequence_length: int = 10  # LSTM input window (seed default)
    op_hidden_size: int = 64
    op_num_layers: int = 2
    op_verdict: str = "calibrated"  # calibrated | relative (the seed's rule)
    op_threshold: float = 2.0  # relative rule: |actual - predicted| / predicted > threshold
    op_k: float = 8.0  # calibrated: residual above median + k * 1.4826 * MAD of the key's own residuals ...
    op_min_ratio: float = 1.3  # ... and actual >= min_ratio x predicted
    op_residual_window: int = 128
    op_min_history: int = 48  # ops of a run before its first verdict
    op_max_period: int = 64  # longest step pattern (ops per step per stream) the seasonal reference follows
    op_episode_gap: int = 16  # anomalous ops fewer than this many ops apart form one episode
    op_confirm: int = 2  # an episode is reported at its 2nd anomalous op: one slow collective is jitter, not a fault
    op_train_every: int = 2000  # new windows per job between training rounds
    op_train_steps: int = 20
    op_train_batch: int = 128
    op_train_budget: int = 600  # training steps per job before rounds become 10x rarer
    op_buffer: int = 8192  # reservoir of training windows per job
    op_background_training: bool = False  # the worker sets it: training rounds on a thread
    op_device: str = "auto"  # auto | cpu | cuda
    op_use_lstm: bool = True  # False: the seasonal moving-average predictor only
    op_shadow_every: int = 4  # auto, while the seasonal reference judges a job: the LSTM scores 1 op in this many
    op_predictor: str = "auto"  # auto: the LSTM once it predicts the job better than the seasonal one | lstm | seasonal
    op_share: str = "job"  # job: one LSTM per job (shared weights) | key: one per rank/stream (for comparison)
    op_stream_params: dict = field(default_factory=dict)  # {"0x1234": {"sequence_length": 8, "threshold": 1.5}}

    def for_stream(self, stream: str, name: str) -> Any:
        override = (self.op_stream_params.get(stream) or {}).get(name)
        return getattr(self, f"op_{name}") if override is None else override


def step_period(h: np.ndarray, max_period: int) -> int:
    """Ops per step of a series of log intervals (>= 3 periods of history): the lag p that best predicts
    y[i] from y[i - p]. Shared by the per-key seasonal reference and the comms of stage 2."""
    lags = min(max_period, len(h) // 3)
    # mean |y[i] - y[i - p]| for every lag p at once, over the same latest len(h) - lags points
    w = np.lib.stride_tricks.sliding_window_view(h, lags + 1)
    scores = np.abs(w[:, -1:] - w[:, -2::-1]).mean(axis=0)  # column p - 1: lag p
    # the shortest lag nearly as good as the best: multiples of the true period score the same
    return int(np.argmax(scores <= scores.min() * 1.1 + 1e-3)) + 1


@dataclass(slots=True)
class OpVerdict:
    ready: bool
    is_anomaly: bool = False
    onset: bool = False  # the op that reports its episode: the episode's op_confirm-th anomalous op
    actual_s: float = 0.0
    predicted_s: float = 0.0
    deviation: float = 0.0  # the seed's score: |actual - predicted| / predicted
    score: float = 0.0  # robust z of the residual on the key's own residuals
    threshold_s: float | None = None  # interval above which this op would have been anomalous
    predictor: str = ""
    run: int = 0  # run number within the key
    index: int = 0  # op index within the run (the seed report's anomaly_indices)
    new_run: bool = False


class _Ring:
    """Fixed-size float window, O(1) append, contiguous tail reads."""

    __slots__ = ("buf", "n", "size", "filled")

    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = np.zeros(2 * size, np.float32)
        self.n = 0
        self.filled = 0  # min(n, size), kept as an attribute: read on every op of the hot path

    def append(self, x: float) -> None:
        if self.n == 2 * self.size:
            self.buf[: self.size] = self.buf[self.size:]
            self.n = self.size
        self.buf[self.n] = x
        self.n += 1
        if self.filled < self.size:
            self.filled += 1

    def tail(self, k: int) -> np.ndarray:
        return self.buf[max(0, self.n - k): self.n]

    def __len__(self) -> int:
        return self.filled

    def clear(self) -> None:
        self.n = 0
        self.filled = 0

    def to_list(self) -> list[float]:
        return [float(v) for v in self.tail(self.size)]

    def extend(self, values: list[float]) -> None:
        for v in values:
            self.append(v)


class _Calibration:
    """Residuals of one predictor on one key -> threshold on the residual (robust, recomputed every 16 ops)."""

    __slots__ = ("res", "threshold", "median", "scale", "since", "flagged_run")
    _saved = ("threshold", "median", "scale", "since", "flagged_run")

    def __init__(self, window: int) -> None:
        self.res = _Ring(window)
        self.threshold = math.inf
        self.median = 0.0
        self.scale = 1.0
        self.since = 0
        self.flagged_run = 0

    def judge(self, r: float, k: float, min_points: int) -> tuple[bool, float]:
        if self.res.filled < min_points:
            self.learn(r, False)
            return False, 0.0
        z = (r - self.median) / self.scale
        hit = r > self.threshold
        self.learn(r, hit)
        return hit, z

    def learn(self, r: float, hit: bool) -> None:
        # flagged residuals stay out (a slow episode must not widen its own threshold), unless the new level
        # persists for a whole window: then it is the new normal
        self.flagged_run = self.flagged_run + 1 if hit else 0
        if not hit or self.flagged_run > self.res.size:
            self.res.append(r)
            self.since += 1

    def save_state(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in self._saved}
        d["threshold"] = d["threshold"] if math.isfinite(d["threshold"]) else None
        return {"res": self.res.to_list(), **d}

    def load_state(self, st: dict[str, Any]) -> None:
        self.res.extend(st.get("res", []))
        for name in self._saved:
            if st.get(name) is not None:
                setattr(self, name, st[name])

    def recalibrate(self, k: float, floor: float) -> None:
        if self.since < _RECALIBRATE and math.isfinite(self.threshold):
            return
        values = self.res.tail(self.res.size)
        if len(values) == 0:
            return
        half = len(values) // 2  # upper median: one partition instead of np.median's sort-and-average
        med = float(np.partition(values, half)[half])
        mad = float(np.partition(np.abs(values - med), half)[half])
        self.median, self.scale = med, max(1.4826 * mad, floor)
        self.threshold = med + k * self.scale
        self.since = 0


class KeyState:
    """Everything one rank/stream needs: run position, history, normalisation, period, calibration, episode."""

    def __init__(self, cfg: OpTimingConfig, stream: str) -> None:
        self.seq_len = int(cfg.for_stream(stream, "sequence_length"))
        self.threshold = float(cfg.for_stream(stream, "threshold"))
        self.k = float(cfg.for_stream(stream, "k"))
        hist = max(self.seq_len + 1, 3 * cfg.op_max_period + 1)
        self.y = _Ring(hist)  # log intervals of the current run
        self.sref = _Ring(hist)  # seasonal reference that was predicted for each of them
        self.last_ts: float | None = None
        self.last_count: dict[str, int] = {}
        self.last_save: Any = None
        self.mean = 0.0
        self.var = 1.0
        self.sd = 1.0
        self.n_norm = 0
        self.model = ""  # the LSTM it shares (its job's, or its own with op_share = "key")
        self.period = 0
        self.since_period = 0
        self.cal = {"seasonal": _Calibration(cfg.op_residual_window), "lstm": _Calibration(cfg.op_residual_window)}
        self.run = -1  # the first op starts run 0
        self.index = 0  # ops in the current run
        self.last_flag = [-1, 0]  # (run, index) of the key's last anomalous op
        self.episode_hits = 0  # anomalous ops of the key's current episode
        self.total = 0

    # ---- runs ---------------------------------------------------------------------------------------------
    def continues(self, comm: str, op_count: int, save: Any) -> bool:
        prev = self.last_count.get(comm)
        if prev is None:
            return self.last_ts is not None and (save is None or save == self.last_save)
        return op_count == prev + 1

    def new_run(self) -> None:
        self.run += 1
        self.index = 0
        self.y.clear()
        self.sref.clear()
        self.last_ts = None
        self.period = 0
        self.since_period = 0

    # ---- normalisation and the seasonal reference ------------------------------------------------------
    def z(self, y: float | np.ndarray) -> Any:
        return (y - self.mean) / self.sd

    def learn_norm(self, y: float) -> None:
        self.n_norm += 1
        a = max(1.0 / self.n_norm, 0.01)
        d = y - self.mean
        self.mean += a * d
        self.var = max((1 - a) * (self.var + a * d * d), 1e-4)
        self.sd = math.sqrt(self.var)

    def seasonal(self) -> float | None:
        """Prediction of the next log interval from the same phase of the previous steps."""
        p = self.period
        y = self.y
        if p == 0 or y.filled < 3 * p:
            return None
        a, b, c = y.buf[y.n - 3 * p: y.n: p].tolist()  # one read of the three values: scalars box slowly
        return max(min(a, b), min(max(a, b), c))  # median of three

    def update_period(self, max_period: int) -> None:
        self.since_period += 1
        n = len(self.y)
        if (self.period and self.since_period < 64) or n < 24:
            return
        self.since_period = 0
        self.period = step_period(self.y.tail(min(n, 4 * max_period)), max_period)

    # ---- persistence ------------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return {"y": self.y.to_list(), "sref": self.sref.to_list(), "last_ts": self.last_ts,
                "last_count": dict(self.last_count), "last_save": self.last_save, "mean": self.mean,
                "var": self.var, "n_norm": self.n_norm, "period": self.period, "since_period": self.since_period,
                "run": self.run, "index": self.index, "last_flag": self.last_flag, "total": self.total,
                "episode_hits": self.episode_hits,
                "cal": {name: c.save_state() for name, c in self.cal.items()}}

    def load_state(self, st: dict[str, Any]) -> None:
        self.y.extend(st.get("y", []))
        self.sref.extend(st.get("sref", []))
        for name in ("last_ts", "last_save", "mean", "var", "n_norm", "period", "since_period", "run", "index",
                     "total", "episode_hits"):
            if name in st:
                setattr(self, name, st[name])
        self.sd = math.sqrt(self.var)
        self.last_count = {str(k): int(v) for k, v in st.get("last_count", {}).items()}
        if isinstance(st.get("last_flag"), list):
            self.last_flag = [int(x) for x in st["last_flag"]]
        for name, cal in st.get("cal", {}).items():
            if name in self.cal:
                self.cal[name].load_state(cal)


class _Windows:
    """The LSTM inputs of one batch for one model and window length, filled in place: per op, its key's last L
    log intervals and seasonal references (the current op's reference last). Every full chunk is standardised
    and handed to the inference thread at once, so the forward passes (GIL released) run beside the loop that
    builds the next windows; results are collected in order, so the verdicts do not depend on the overlap."""

    __slots__ = ("x", "mean", "sd", "rows", "model", "sent", "chunks", "preds")

    def __init__(self, capacity: int, length: int, model: SharedIntervalModel) -> None:
        self.x = np.empty((capacity, length, 2), np.float32)
        self.mean = np.empty(capacity, np.float32)
        self.sd = np.empty(capacity, np.float32)
        self.rows: list[int] = []  # index into the batch's pending ops
        self.model = model
        self.sent = 0  # rows handed to the inference thread so far
        self.chunks: list[Any] = []  # futures of [chunk] predictions, in row order
        self.preds: list[list[float]] = []  # the collected chunks, de-standardised

    def submit(self, inline: bool = False) -> None:
        """Standardise the rows not sent yet and start their forward pass on the inference thread (or run it
        here: a small batch's only chunk gains nothing from the hand-over)."""
        a, b = self.sent, len(self.rows)
        if b == a:
            return
        mean, sd = self.mean[a:b], self.sd[a:b]
        self.x[a:b] = (self.x[a:b] - mean[:, None, None]) / sd[:, None, None]  # standardised in place
        if inline:
            done: Future = Future()
            done.set_result(self.model.predict(self.x[a:b]))
            self.chunks.append(done)
        else:
            self.chunks.append(infer_executor().submit(self.model.predict, self.x[a:b]))
        self.sent = b

    def pred_at(self, pos: int) -> float:
        """The prediction for row `pos` (log seconds), waiting for its chunk: the verdicts of earlier chunks'
        ops are decided while later chunks are still on the inference thread."""
        k = pos // CHUNK  # every chunk but the last holds exactly CHUNK rows
        while len(self.preds) <= k:
            j = len(self.preds)
            a = j * CHUNK
            pred = self.chunks[j].result()
            self.preds.append((pred * self.sd[a:a + len(pred)] + self.mean[a:a + len(pred)]).tolist())
        return self.preds[k][pos - k * CHUNK]

    def train_on(self, ys: list[float]) -> None:
        """The scored windows and what followed them join the model's reservoir (after the verdicts, which
        these weights no longer affect)."""
        n = len(self.rows)
        y = np.asarray(ys, np.float32)
        self.model.offer(self.x[:n], (y - self.mean[:n]) / self.sd[:n])

    def add(self, row: int, st: KeyState, season: float) -> int:
        i = len(self.rows)
        w = self.x[i]
        n, L, y, ref = st.y.n, len(w), st.y, st.sref  # rings hold >= L values here (checked by the caller)
        w[:, 0] = y.buf[n - L: n]
        w[:-1, 1] = ref.buf[ref.n - L + 1: ref.n]
        w[-1, 1] = season
        self.mean[i], self.sd[i] = st.mean, st.sd
        self.rows.append(row)
        if i + 1 - self.sent >= CHUNK:
            self.submit()
        return i


@dataclass(slots=True)
class OpInput:
    key: tuple[str, int | None, str]  # job, rank, stream
    ts: float
    op_count: int
    comm: str = ""
    save_count: Any = None


class OpTimingDetector:
    """All keys of a worker (or of an `analyze` run): `update(batch) -> [OpVerdict]`, one per input, in order.
    LSTM predictions for the whole batch come from one forward pass per job."""

    def __init__(self, config: OpTimingConfig | None = None) -> None:
        self.config = config or OpTimingConfig()
        self.keys: dict[tuple[str, int | None, str], KeyState] = {}
        self.models: dict[str, SharedIntervalModel] = {}
        self.error = {}  # job -> [ewma |residual| seasonal, ewma |residual| lstm]

    def key_state(self, key: tuple[str, int | None, str]) -> KeyState:
        st = self.keys.get(key)
        if st is None:
            st = self.keys[key] = KeyState(self.config, key[2])
            st.model = self.model_key(key)
            m = self.model(st.model)
            if m is not None:
                m.keys += 1
        return st

    def model_key(self, key: tuple[str, int | None, str]) -> str:
        return key[0] if self.config.op_share == "job" else f"{key[0]}/{key[1]}/{key[2]}"

    def model(self, name: str) -> SharedIntervalModel | None:
        c = self.config
        if not (c.op_use_lstm and torch_available()) or c.op_predictor == "seasonal":
            return None
        m = self.models.get(name)
        if m is None:
            m = self.models[name] = SharedIntervalModel(
                seed=zlib.crc32(name.encode()), hidden_size=c.op_hidden_size, num_layers=c.op_num_layers,
                buffer=c.op_buffer, train_every=c.op_train_every, train_steps=c.op_train_steps,
                train_batch=c.op_train_batch, background=c.op_background_training, device=c.op_device,
                budget=c.op_train_budget)
        return m

    def lstm_active(self, name: str) -> bool:
        """The LSTM judges once it has trained and predicts its ops better than the seasonal reference (or
        whenever trained, with `op_predictor = "lstm"`)."""
        m = self.models.get(name)
        err = self.error.get(name)
        if m is None or m.steps_trained < 200:
            return False
        return self.config.op_predictor == "lstm" or bool(err and err[1] <= err[0])

    # ---- the batch update ---------------------------------------------------------------------------------
    def update(self, items: list[OpInput]) -> list[OpVerdict]:
        c = self.config
        use_lstm = c.op_use_lstm and c.op_predictor != "seasonal" and torch_available()
        verdicts: list[OpVerdict | None] = [None] * len(items)
        # (i, state, y, actual, season, the LSTM window group and row of the op or None)
        pending: list[tuple[int, KeyState, float, float, float | None, _Windows | None, int]] = []
        windows: dict[tuple[str, int], _Windows] = {}
        # which predictor judges each job, once per batch; while it is the seasonal reference, the LSTM scores a
        # sample of the ops (enough to train it and to tell when it predicts better), not every one
        for m in self.models.values():
            m.take_weights()
        active = {name: self.lstm_active(name) for name in self.models}
        shadow = max(1, c.op_shadow_every)
        keys = self.keys
        for i, it in enumerate(items):
            st = keys.get(it.key) or self.key_state(it.key)
            new_run = False
            if not st.continues(it.comm, it.op_count, it.save_count):
                if st.last_ts is not None or st.total:
                    new_run = True
                st.new_run()
            st.last_count[it.comm] = it.op_count
            st.last_save = it.save_count
            st.total += 1
            if st.last_ts is None:
                st.last_ts = it.ts
                verdicts[i] = OpVerdict(False, run=st.run, index=st.index, new_run=new_run)
                continue
            actual = max(it.ts - st.last_ts, 0.0)
            st.last_ts = it.ts
            st.index += 1
            y = math.log(actual + EPS)
            season = st.seasonal()
            group, pos = None, -1
            if (season is not None and use_lstm and st.y.filled >= st.seq_len
                    and (st.index % shadow == 0 or active.get(st.model, True))):
                group = windows.get((st.model, st.seq_len))
                if group is None:
                    model = self.model(st.model)
                    assert model is not None  # use_lstm: the conditions under which model() gives one
                    group = windows[(st.model, st.seq_len)] = _Windows(len(items), st.seq_len, model)
                pos = group.add(len(pending), st, season)  # a full chunk starts its forward pass beside this loop
            pending.append((i, st, y, actual, season, group, pos))
            st.y.append(y)
            st.sref.append(season if season is not None else y)
            st.update_period(c.op_max_period)
            verdicts[i] = OpVerdict(False, run=st.run, index=st.index, new_run=new_run)
        for group in windows.values():
            group.submit(inline=not group.chunks)
        for i, st, y, actual, season, group, pos in pending:
            lstm = group.pred_at(pos) if group is not None else None
            verdicts[i] = self._judge(st, y, actual, season, lstm, active.get(st.model, False), verdicts[i])
            st.learn_norm(y)
        for group in windows.values():  # one reservoir offer per job (and window length); maybe a round
            group.train_on([pending[j][2] for j in group.rows])
        return verdicts  # type: ignore[return-value]

    def _judge(self, st: KeyState, y: float, actual: float, season: float | None, lstm: float | None,
               lstm_active: bool, v: OpVerdict) -> OpVerdict:
        c = self.config
        if season is None:
            return v
        k = st.k
        cal = st.cal["seasonal"]
        cal.recalibrate(k, 0.05)
        r = y - season
        hit, z = cal.judge(r, k, 32)
        pred, thr = season, cal.threshold
        if lstm is not None:  # both are scored on every op, before either learns from it
            err = self.error.setdefault(st.model, [0.0, 0.0])
            err[0] += 0.01 * (abs(r) - err[0])
            r_l = y - lstm
            err[1] += 0.01 * (abs(r_l) - err[1])
            cal_l = st.cal["lstm"]
            cal_l.recalibrate(k, 0.05)
            hit_l, z_l = cal_l.judge(r_l, k, 32)
            if lstm_active:
                hit, z, pred, thr = hit_l, z_l, lstm, cal_l.threshold
        name = "lstm" if lstm is not None and lstm_active else "seasonal"
        predicted = max(math.exp(pred) - EPS, 0.0)
        deviation = abs(actual - predicted) / max(predicted, EPS)
        if c.op_verdict == "relative":
            hit = deviation > st.threshold
        else:
            hit = hit and actual >= c.op_min_ratio * predicted
        ready = v.index >= c.op_min_history  # the op's own position: the key may have moved on in this batch
        hit = hit and ready
        v.ready, v.is_anomaly, v.actual_s, v.predicted_s = ready, hit, actual, predicted
        v.deviation, v.score, v.predictor = deviation, z, name
        if c.op_verdict == "relative":
            v.threshold_s = predicted * (1 + st.threshold)
        elif math.isfinite(thr):
            v.threshold_s = max(math.exp(pred + thr) - EPS, c.op_min_ratio * predicted)
        if hit:
            if (v.run, v.index - c.op_episode_gap) > tuple(st.last_flag):
                st.episode_hits = 0  # a new episode
            st.episode_hits += 1
            v.onset = st.episode_hits == max(1, c.op_confirm)
            st.last_flag = [v.run, v.index]
        return v

    # ---- persistence ------------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return {"keys": [[list(k), st.save_state()] for k, st in self.keys.items()],
                "models": {job: m.save_state() for job, m in self.models.items()},
                "error": {job: list(e) for job, e in self.error.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        for key, st in state.get("keys", []):
            k = (str(key[0]), None if key[1] is None else int(key[1]), str(key[2]))
            self.key_state(k).load_state(st)
        for job, ms in state.get("models", {}).items():
            m = self.model(job)
            if m is not None:
                m.load_state(ms)
        self.error = {job: [float(a), float(b)] for job, (a, b) in state.get("error", {}).items()}
