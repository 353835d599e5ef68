"""Per rank/stream collective timing: continuous runs, interval prediction, calibrated verdicts.

For every key (job/rank/stream) the modelled series is the interval between consecutive ops of a continuous run
(opCount +1 on the same communicator, same or continuing save_count). Intervals are heavy-tailed and periodic
(bucket gaps inside a step, then the gap to the next step), so the model works on y = log(interval) and keeps,
per key:
- its normalisation (EWMA mean/sd of y), so one shared network serves streams of any speed;
- its period p (ops per step, re-estimated from its own history) and the seasonal reference
  median(y[-p], y[-2p], y[-3p]): the moving-average predictor that answers during warm-up and without torch;
- a residual window per predictor, recalibrated every 32 residuals: an op is anomalous when its residual exceeds the
  key's own median + k * 1.4826 * MAD *and* the interval is at least `min_ratio` times the prediction. k is
  chosen by measurement (bench/bench_op_timing.py, docs/DETECTION.md). The seed tool's fixed rule (relative
  error > threshold) stays available with `op_verdict = "relative"`.

The LSTM (models/op_lstm.py, shared per job) is used for a job's verdicts once it predicts that job's intervals
better than the seasonal predictor does (both are scored on every op, before either learns from it).
Anomalous ops of a key fewer than `op_episode_gap` ops apart form one episode, reported once, when its
`op_confirm`-th anomalous op arrives (its onset): on long normal runs the findings left were single slow
collectives (heavy-tailed jitter, 1.6-2x), which a slow stream or rank never is (docs/DETECTION.md).

All of it is per key; the keys' state lives in column arrays (models/op_keys.py) and a batch is judged in rounds
over them (OpTimingDetector), so a worker pays a few array operations per round, not a Python step per op.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rankwatch.models.op_batch import Batch, OpInput, OpVerdict, OpVerdicts, PendingOps, Windows, ewma, rounds
from rankwatch.models.op_keys import KeyTable
from rankwatch.models.op_lstm import SharedIntervalModel, torch_available

__all__ = ["OpInput", "OpTimingConfig", "OpTimingDetector", "OpVerdict", "OpVerdicts", "PendingOps", "step_period"]

EPS = 1e-4  # s: timestamp resolution floor (logs print ms or us); keeps log() finite for equal timestamps


@dataclass
class OpTimingConfig:
    op_sequence_length: int = 10  # LSTM input window (seed default)
    op_hidden_size: int = 64
    op_num_layers: int = 2
    op_verdict: str = "calibrated"  # calibrated | relative (the seed's rule)
    op_threshold: float = 2.0  # relative rule: |actual - predicted| / predicted > threshold
    op_k: float = 8.0  # calibrated: residual above median + k * 1.4826 * MAD of the key's own residuals ...
    op_min_ratio: float = 1.3  # ... and actual >= min_ratio x predicted
    # ... and actual >= predicted + this: a few ms of CPU jitter on a ms-short interval (the gap before a
    # step's last small all-reduce) is 2-3x its prediction, yet no stream is slow by it
    op_min_excess_s: float = 0.02
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
    op_infer_threads: int = 0  # threads for the LSTM's forward passes; 0: one per usable core, at most 4
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
    p = int(np.argmax(scores <= scores.min() * 1.1 + 1e-3)) + 1
    # ... up to sampling noise, which can put a multiple 10% ahead: a divisor of that lag within 25% of it is the
    # period (a blind test's 5-op steps were taken for 10: the straggler window doubled, and its naming took 6 s)
    return next((d for d in range(1, p) if p % d == 0 and scores[d - 1] <= scores[p - 1] * 1.25 + 1e-3), p)


class OpTimingDetector:
    """All keys of a worker (or of an `analyze` run): `update(batch) -> OpVerdicts`, one per input, in order.

    A batch is judged in rounds: round j holds the j-th op of every key in the batch, so each round is a few
    array operations over distinct keys (models/op_keys.py), and every key still sees its own ops in order. All
    rounds first advance the keys' runs and histories and build the LSTM windows (one forward pass per job and
    window length, on the inference thread), then all rounds are judged."""

    def __init__(self, config: OpTimingConfig | None = None) -> None:
        self.config = c = config or OpTimingConfig()
        lengths = [c.op_sequence_length] + [int(p["sequence_length"]) for p in c.op_stream_params.values()
                                            if isinstance(p, dict) and p.get("sequence_length")]
        self.table = KeyTable(max(max(lengths) + 1, 3 * c.op_max_period + 1), c.op_residual_window)
        self.keys = self.table.slots  # key -> slot
        self.models: dict[str, SharedIntervalModel] = {}
        self.model_ids: dict[str, int] = {}  # the table's model column: an index into model_names
        self.model_names: list[str] = []
        self.error: dict[str, list[float]] = {}  # job -> [ewma |residual| seasonal, ewma |residual| lstm]
        # the last batch's LSTM shadow scores, still on the inference thread: (windows, y, season, slots)
        self._shadow: tuple[list[Windows], np.ndarray, np.ndarray, np.ndarray] | None = None

    def slot(self, key: tuple[str, int | None, str]) -> int:
        """The key's row in the table, created on first sight with its stream's settings and its LSTM."""
        slot = self.keys.get(key)
        if slot is None:
            t, c = self.table, self.config
            slot = t.add(key)
            t.seq_len[slot] = int(c.for_stream(key[2], "sequence_length"))
            t.threshold[slot] = float(c.for_stream(key[2], "threshold"))
            t.k[slot] = float(c.for_stream(key[2], "k"))
            name = self.model_key(key)
            if name not in self.model_ids:
                self.model_ids[name] = len(self.model_names)
                self.model_names.append(name)
            t.model[slot] = self.model_ids[name]
            m = self.model(name)
            if m is not None:
                m.keys += 1
        return slot

    def stream_settings(self, key: tuple[str, int | None, str]) -> dict[str, float]:
        s = self.slot(key)
        return {"sequence_length": int(self.table.seq_len[s]), "threshold": float(self.table.threshold[s]),
                "k": float(self.table.k[s])}

    def model_key(self, key: tuple[str, int | None, str]) -> str:
        return key[0] if self.config.op_share == "job" else f"{key[0]}/{key[1]}/{key[2]}"

    def lstm_wanted(self) -> bool:
        c = self.config
        return c.op_use_lstm and c.op_predictor != "seasonal" and torch_available()

    def model(self, name: str) -> SharedIntervalModel | None:
        c = self.config
        if not self.lstm_wanted():
            return None
        m = self.models.get(name)
        if m is None:
            m = self.models[name] = SharedIntervalModel(
                seed=zlib.crc32(name.encode()), hidden_size=c.op_hidden_size, num_layers=c.op_num_layers,
                buffer=c.op_buffer, train_every=c.op_train_every, train_steps=c.op_train_steps,
                train_batch=c.op_train_batch, background=c.op_background_training, device=c.op_device,
                budget=c.op_train_budget, infer_threads=c.op_infer_threads)
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
    def update(self, items: list[OpInput]) -> OpVerdicts:
        return self.update_columns([it.key for it in items], [it.ts for it in items],
                                   [it.op_count for it in items], [it.comm for it in items],
                                   [it.save_count for it in items])

    def update_columns(self, keys: list[tuple[str, int | None, str]], ts: list[float], op_counts: list[int],
                       comms: list[str], save_counts: list[Any]) -> OpVerdicts:
        """`update` for inputs given as columns (the worker's adapter builds no object per op)."""
        return self.finish(self.begin(keys, ts, op_counts, comms, save_counts, send=False))

    def begin(self, keys: list[tuple[str, int | None, str]], ts: list[float], op_counts: list[int],
              comms: list[str], save_counts: list[Any], send: bool = True) -> PendingOps:
        """The first half of an update: every op advances its key's run, history and normalisation, and the
        LSTM's windows go to the inference threads (all of them with `send`; without it a small batch's last
        rows are predicted in line by `finish`). `finish` gives the verdicts. Nothing `begin` reads is written by
        `finish` except the per-batch choices below (which predictor judges, the LSTM's weights), so the worker
        may begin batch j+1 before it finishes batch j: the forward passes of j then run while the event loop
        builds j+1 (processors/app.py). Batches are finished in the order they began."""
        n = len(keys)
        out = OpVerdicts(n)
        t = self.table
        self.settle()
        for m in self.models.values():
            m.take_weights()
        existing = set(self.models)
        found = [self.keys.get(k) for k in keys]
        if None in found:
            found = [self.slot(k) if f is None else f for f, k in zip(found, keys, strict=True)]
        slots = np.array(found, np.int64)
        b = Batch(out, self.lstm_wanted(), np.array(ts, np.float64), np.array(op_counts, np.int64),
                  np.array(t.comms.ids(comms), np.int64), np.array(t.saves.ids(save_counts), np.int64))
        if n == 0:
            return PendingOps(b, slots, [])
        # which predictor judges each job, once per batch; while it is the seasonal reference, the LSTM scores a
        # sample of the ops (enough to train it and to tell when it predicts better), not every one. A job first
        # seen in this batch: every op scored, none judged by the LSTM
        active = {name: self.lstm_active(name) for name in existing}
        b.scored = np.array([active.get(name, True) for name in self.model_ids], bool)
        b.judged = np.array([active.get(name, False) for name in self.model_ids], bool)
        batch_rounds = rounds(slots)
        for idx in batch_rounds:
            self._advance(b, idx, slots[idx])
        if send:
            for (m, _), group in b.windows.items():
                if b.judged[m]:
                    group.send()
        return PendingOps(b, slots, batch_rounds)

    def finish(self, pending: PendingOps) -> OpVerdicts:
        """The verdicts of a begun batch: waits for its LSTM predictions, judges its ops in order."""
        b, slots = pending.batch, pending.slots
        if len(slots) == 0:
            return b.out
        self.settle()  # a shadow of an earlier batch: its calibration comes before these verdicts
        lstm = np.full(len(slots), np.nan)
        judging = [g for (m, _), g in b.windows.items() if b.judged[m]]
        for group in judging:
            group.predictions(lstm)
        for idx in pending.rounds:
            self._judge(b, idx, slots[idx], lstm[idx])
        self._learn_lstm(b.y, b.season, slots, lstm, judging)
        # where the seasonal reference judges, no verdict waits for the LSTM: its forward passes run on while
        # this batch's verdicts go out, and it learns from them at the start of the next update (settle)
        shadow = [g for (m, _), g in b.windows.items() if not b.judged[m]]
        for group in shadow:
            group.send()
        self._shadow = (shadow, b.y, b.season, slots) if shadow else None
        return b.out

    def settle(self) -> None:
        """The LSTM's shadow scores of the last batch: its calibration per key, its error against the seasonal
        reference per job, its reservoir (waits for the forward passes still running)."""
        if self._shadow is None:
            return
        groups, y, season, slots = self._shadow
        self._shadow = None
        lstm = np.full(len(y), np.nan)
        for group in groups:
            group.predictions(lstm)
        scored = np.flatnonzero(~np.isnan(lstm))  # batch order
        cal, s = self.table.cal["lstm"], slots[scored]
        for r in rounds(s):
            cal.recalibrate(s[r], self.table.k[s[r]])
            cal.judge(s[r], y[scored[r]] - lstm[scored[r]])
        self._learn_lstm(y, season, slots, lstm, groups)

    def _learn_lstm(self, y: np.ndarray, season: np.ndarray, slots: np.ndarray, lstm: np.ndarray,
                    groups: list[Windows]) -> None:
        self._track_errors(y, season, slots, lstm)
        # one reservoir offer per job and window length, in the order of their first ops; maybe a round
        for group in sorted(groups, key=lambda g: int(g.items[: g.rows].min())):
            group.train_on(y)

    # ---- round steps ------------------------------------------------------------------------------------
    def _advance(self, b: Batch, idx: np.ndarray, s: np.ndarray) -> None:
        """One op of each of `s` (distinct keys): run continuity, interval, seasonal reference, LSTM window,
        history and period. Nothing here depends on a verdict."""
        t, c, out = self.table, self.config, b.out
        cnt, comm, save = b.cnt[idx], b.comm[idx], b.save[idx]
        last = t.last_comm[s]
        same, prev = last == comm, t.last_cnt[s]
        for j in np.flatnonzero((last >= 0) & ~same):  # the key's previous op was on another comm (rare)
            p = t.switch_comm(int(s[j]), int(comm[j]))
            if p is not None:
                same[j], prev[j] = True, p
        has_ts = t.has_ts[s]
        cont = np.where(same, cnt == prev + 1, has_ts & ((save == 0) | (save == t.last_save[s])))
        out.new_run[idx] = ~cont & (has_ts | (t.total[s] > 0))
        if not cont.all():
            t.reset_runs(s[~cont])
        t.last_comm[s], t.last_cnt[s], t.last_save[s] = comm, cnt, save
        t.total[s] += 1
        go = t.has_ts[s]
        if not go.all():  # the first op of a run: its time only
            f, fi = s[~go], idx[~go]
            t.last_ts[f], t.has_ts[f] = b.ts[fi], True
            out.run[fi], out.index[fi] = t.run[f], t.index[f]
            idx, s = idx[go], s[go]
            if len(s) == 0:
                return
        ts = b.ts[idx]
        actual = np.maximum(ts - t.last_ts[s], 0.0)
        t.last_ts[s] = ts
        t.index[s] += 1
        out.run[idx], out.index[idx] = t.run[s], t.index[s]
        y = np.log(actual + EPS)
        # the seasonal reference: the median of the same phase of the previous three steps
        p, hist = t.period[s], t.y
        ok = (p > 0) & (hist.filled[s] >= 3 * p)
        season = np.full(len(s), np.nan)
        if ok.any():
            so, po = s[ok], p[ok]
            a, m, z = hist.back(so, 3 * po), hist.back(so, 2 * po), hist.back(so, po)
            season[ok] = np.maximum(np.minimum(a, m), np.minimum(np.maximum(a, m), z))
            if b.use_lstm:
                scored = (t.index[s] % max(1, c.op_shadow_every) == 0) | b.scored[t.model[s]]
                want = ok & (hist.filled[s] >= t.seq_len[s]) & scored
                if want.any():
                    self._windows(b, idx[want], s[want], season[want])
        hist.append(s, y)
        t.sref.append(s, np.where(ok, season, y))
        self._update_periods(s)
        # the key's units learn the op here, after its window was standardised, not at its verdict: the next op's
        # window then does not depend on whether this one has been judged yet (begin / finish)
        self._learn_norm(s, y)
        b.y[idx], b.actual[idx], b.season[idx], b.interval[idx] = y, actual, season, True

    def _windows(self, b: Batch, idx: np.ndarray, s: np.ndarray, season: np.ndarray) -> None:
        t = self.table
        group_of = t.model[s] * 65536 + t.seq_len[s]  # one group per model and window length
        for g in np.unique(group_of):
            sel = group_of == g
            ss = s[sel]
            m, length = int(g) // 65536, int(g) % 65536
            group = b.windows.get((m, length))
            if group is None:
                model = self.model(self.model_names[m])
                assert model is not None  # use_lstm: the conditions under which model() gives one
                group = b.windows[(m, length)] = Windows(len(b.out), length, model)
            x = np.empty((len(ss), length, 2), np.float32)
            x[:, :, 0] = t.y.tails(ss, length)
            x[:, :-1, 1] = t.sref.tails(ss, length - 1)
            x[:, -1, 1] = season[sel]
            group.add(idx[sel], x, t.mean[ss], t.sd[ss])

    def _update_periods(self, s: np.ndarray) -> None:
        """Re-estimate the step period of keys not yet known or not looked at for 64 ops (needs 24 intervals)."""
        t, max_period = self.table, self.config.op_max_period
        t.since_period[s] += 1
        due = ~((t.period[s] > 0) & (t.since_period[s] < 64)) & (t.y.filled[s] >= 24)
        for slot in s[due]:
            t.since_period[slot] = 0
            t.period[slot] = step_period(t.y.values(slot)[-4 * max_period:], max_period)

    def _judge(self, b: Batch, idx: np.ndarray, s: np.ndarray, lstm: np.ndarray) -> None:
        """Verdicts for one op of each of `s`: both predictors are scored (before either learns from the op),
        the one that judges the job decides; then episodes."""
        t, c, out = self.table, self.config, b.out
        sel = b.interval[idx] & ~np.isnan(b.season[idx])
        i2, s2, lp = idx[sel], s[sel], lstm[sel]
        if len(s2):
            y, actual, pred = b.y[i2], b.actual[i2], b.season[i2].copy()
            k = t.k[s2]
            seasonal = t.cal["seasonal"]
            seasonal.recalibrate(s2, k)
            hit, z = seasonal.judge(s2, y - pred)
            thr = seasonal.threshold[s2]
            used = np.zeros(len(s2), bool)
            scored = ~np.isnan(lp)
            if scored.any():
                sl = s2[scored]
                cal = t.cal["lstm"]
                cal.recalibrate(sl, k[scored])
                hit_l, z_l = cal.judge(sl, y[scored] - lp[scored])
                judges = b.judged[t.model[sl]]
                use = np.flatnonzero(scored)[judges]
                hit[use], z[use], pred[use], thr[use] = hit_l[judges], z_l[judges], lp[use], cal.threshold[sl[judges]]
                used[use] = True
            predicted = np.maximum(np.exp(pred) - EPS, 0.0)
            deviation = np.abs(actual - predicted) / np.maximum(predicted, EPS)
            if c.op_verdict == "relative":
                hit = deviation > t.threshold[s2]
                out.threshold_s[i2] = predicted * (1 + t.threshold[s2])
            else:
                floor = np.maximum(c.op_min_ratio * predicted, predicted + c.op_min_excess_s)
                hit &= actual >= floor
                with np.errstate(over="ignore", invalid="ignore"):
                    limit = np.maximum(np.exp(pred + thr) - EPS, floor)
                out.threshold_s[i2] = np.where(np.isfinite(thr), limit, np.nan)
            index = out.index[i2]
            ready = index >= c.op_min_history  # the op's own position: the key may have moved on in this batch
            hit &= ready
            out.ready[i2], out.is_anomaly[i2], out.actual_s[i2], out.predicted_s[i2] = ready, hit, actual, predicted
            out.deviation[i2], out.score[i2], out.predictor[i2] = deviation, z, np.where(used, 2, 1)
            if hit.any():
                self._episodes(out, i2[hit], s2[hit])

    def _episodes(self, out: OpVerdicts, idx: np.ndarray, s: np.ndarray) -> None:
        """Anomalous ops of a key fewer than op_episode_gap ops apart are one episode, reported at its
        op_confirm-th op."""
        t, c = self.table, self.config
        run, index = out.run[idx], out.index[idx]
        fr, fi = t.flag_run[s], t.flag_index[s]
        new = (run > fr) | ((run == fr) & (index - c.op_episode_gap > fi))
        hits = np.where(new, 0, t.episode_hits[s]) + 1
        t.episode_hits[s] = hits
        out.onset[idx] = hits == max(1, c.op_confirm)
        t.flag_run[s], t.flag_index[s] = run, index

    def _learn_norm(self, s: np.ndarray, y: np.ndarray) -> None:
        """EWMA mean/sd of each key's log intervals (the LSTM's per-key units)."""
        t = self.table
        t.n_norm[s] += 1
        a = np.maximum(1.0 / t.n_norm[s], 0.01)
        d = y - t.mean[s]
        t.mean[s] += a * d
        var = np.maximum((1 - a) * (t.var[s] + a * d * d), 1e-4)
        t.var[s], t.sd[s] = var, np.sqrt(var)

    def _track_errors(self, y: np.ndarray, season: np.ndarray, slots: np.ndarray, lstm: np.ndarray) -> None:
        """Each job's EWMA |residual| of both predictors over the ops the LSTM scored, in batch order: which
        one judges the job from the next batch on."""
        ii = np.flatnonzero(~np.isnan(lstm))
        if len(ii) == 0:
            return
        r_s, r_l = np.abs(y[ii] - season[ii]), np.abs(y[ii] - lstm[ii])
        models = self.table.model[slots[ii]]
        for m in np.unique(models):
            sel = models == m
            err = self.error.setdefault(self.model_names[m], [0.0, 0.0])
            err[0], err[1] = ewma(err[0], r_s[sel]), ewma(err[1], r_l[sel])

    # ---- persistence ------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:  # picklable (detector contract): no futures
        self.settle()
        return self.__dict__

    def save_state(self) -> dict[str, Any]:
        self.settle()
        t = self.table
        return {"keys": [[list(k), t.save_key(slot)] for k, slot in self.keys.items()],
                "models": {job: m.save_state() for job, m in self.models.items()},
                "error": {job: list(e) for job, e in self.error.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        for key, st in state.get("keys", []):
            k = (str(key[0]), None if key[1] is None else int(key[1]), str(key[2]))
            self.table.load_key(self.slot(k), st)
        for job, ms in state.get("models", {}).items():
            m = self.model(job)
            if m is not None:
                m.load_state(ms)
        self.error = {job: [float(a), float(b)] for job, (a, b) in state.get("error", {}).items()}


