"""One batch of the op-timing model: its inputs and verdicts as columns, its rounds, its LSTM windows.

models/op_timing.py drives a batch through these; nothing here keeps state across batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
from rankwatch.models.op_lstm import CHUNK, SharedIntervalModel, infer_executor


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




@dataclass(slots=True)
class OpInput:
    key: tuple[str, int | None, str]  # job, rank, stream
    ts: float
    op_count: int
    comm: str = ""
    save_count: Any = None




_PREDICTORS = ("", "seasonal", "lstm")


class OpVerdicts:
    """The verdicts of one batch as columns (one row per input, in order); indexing or iterating gives
    `OpVerdict`s. Callers that only want the findings read `onsets()` and build nothing per op."""

    __slots__ = ("ready", "is_anomaly", "onset", "actual_s", "predicted_s", "deviation", "score", "threshold_s",
                 "predictor", "run", "index", "new_run")

    def __init__(self, n: int) -> None:
        for name in ("ready", "is_anomaly", "onset", "new_run"):
            setattr(self, name, np.zeros(n, bool))
        for name in ("actual_s", "predicted_s", "deviation", "score"):
            setattr(self, name, np.zeros(n))
        self.threshold_s = np.full(n, np.nan)
        self.predictor = np.zeros(n, np.int8)  # index into _PREDICTORS
        self.run = np.zeros(n, np.int64)
        self.index = np.zeros(n, np.int64)

    def __len__(self) -> int:
        return len(self.ready)

    def __getitem__(self, i: int) -> OpVerdict:
        thr = float(self.threshold_s[i])
        return OpVerdict(bool(self.ready[i]), bool(self.is_anomaly[i]), bool(self.onset[i]), float(self.actual_s[i]),
                         float(self.predicted_s[i]), float(self.deviation[i]), float(self.score[i]),
                         None if math.isnan(thr) else thr, _PREDICTORS[self.predictor[i]], int(self.run[i]),
                         int(self.index[i]), bool(self.new_run[i]))

    def __iter__(self) -> Iterator[OpVerdict]:
        return (self[i] for i in range(len(self)))

    def onsets(self) -> np.ndarray:
        """Positions of the ops that report their episode (is_anomaly and onset)."""
        return np.flatnonzero(self.onset & self.is_anomaly)


class Windows:
    """The LSTM inputs of one batch for one model and window length: per op, its key's last L log intervals and
    seasonal references (the current op's reference last), standardised by the key's normalisation. Each full
    chunk goes to the inference thread as soon as it is built, so the forward passes (GIL released) run beside
    the rest of the batch; predictions are read back by op, so verdicts do not depend on the overlap."""

    def __init__(self, capacity: int, length: int, model: SharedIntervalModel) -> None:
        self.x = np.empty((capacity, length, 2), np.float32)
        self.mean = np.empty(capacity, np.float32)
        self.sd = np.empty(capacity, np.float32)
        self.items = np.empty(capacity, np.int64)  # the op (batch position) of each row
        self.rows = 0
        self.sent = 0  # rows handed to the inference thread so far
        self.model = model
        self.net = model.net  # the network when the batch began: later weights do not score its later chunks
        self.chunks: list[tuple[int, int, Future]] = []  # (first row, rows, predictions)

    def add(self, items: np.ndarray, x: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> None:
        a, b = self.rows, self.rows + len(items)
        self.mean[a:b], self.sd[a:b], self.items[a:b] = mean, sd, items
        self.x[a:b] = (x - self.mean[a:b, None, None]) / self.sd[a:b, None, None]
        self.rows = b
        while self.rows - self.sent >= CHUNK:
            self._submit(self.sent + CHUNK)

    def _submit(self, end: int, inline: bool = False) -> None:
        a = self.sent
        if inline:  # a small batch's only chunk gains nothing from the hand-over
            done: Future = Future()
            done.set_result(self.model.predict(self.x[a:end], self.net))
        else:
            done = infer_executor(self.model.infer_threads).submit(self.model.predict, self.x[a:end], self.net)
        self.chunks.append((a, end - a, done))
        self.sent = end

    def send(self) -> None:
        """Hand every row not sent yet to the inference thread."""
        if self.rows > self.sent:
            self._submit(self.rows)

    def predictions(self, out: np.ndarray) -> None:
        """Waits for every chunk; writes each row's prediction (log seconds) at its op's batch position."""
        if self.rows > self.sent:
            self._submit(self.rows, inline=not self.chunks)
        for a, n, done in self.chunks:
            out[self.items[a: a + n]] = done.result() * self.sd[a: a + n] + self.mean[a: a + n]

    def train_on(self, y: np.ndarray) -> None:
        """The scored windows and what followed them join the model's reservoir, in batch order (after the
        verdicts, which these weights no longer affect)."""
        n = self.rows
        order = np.argsort(self.items[:n], kind="stable")
        target = (y[self.items[:n]].astype(np.float32) - self.mean[:n]) / self.sd[:n]
        self.model.offer(self.x[:n][order], target[order].astype(np.float32))




def ewma(e0: float, x: np.ndarray, a: float = 0.01) -> float:
    """e <- e + a (x_i - e) over x in order, in closed form."""
    w = a * (1 - a) ** np.arange(len(x) - 1, -1, -1)
    return float((1 - a) ** len(x) * e0 + w @ x)


def rounds(slots: np.ndarray) -> list[np.ndarray]:
    """Batch positions by round: round j holds the j-th op of each key in the batch, in batch order."""
    order = np.argsort(slots, kind="stable")
    s = slots[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    occ = np.empty(len(slots), np.int64)
    occ[order] = np.arange(len(s)) - np.repeat(starts, np.diff(np.r_[starts, len(s)]))
    by_round = np.argsort(occ, kind="stable")
    return np.split(by_round, np.cumsum(np.bincount(occ))[:-1])




class PendingOps:
    """A batch between `OpTimingDetector.begin` and `finish`: its columns, key slots and rounds."""

    __slots__ = ("batch", "slots", "rounds")

    def __init__(self, batch: Batch, slots: np.ndarray, batch_rounds: list[np.ndarray]) -> None:
        self.batch, self.slots, self.rounds = batch, slots, batch_rounds


class Batch:
    """One update's inputs as columns, and what the rounds learn about each op on the way."""

    def __init__(self, out: OpVerdicts, use_lstm: bool, ts: np.ndarray, cnt: np.ndarray, comm: np.ndarray,
                 save: np.ndarray) -> None:
        n = len(out)
        self.out = out
        self.ts, self.cnt = ts, cnt  # the inputs; comm pointers and save_counts interned by the key table
        self.comm, self.save = comm, save
        self.y = np.zeros(n)  # log interval
        self.actual = np.zeros(n)  # interval, s
        self.season = np.full(n, np.nan)  # the seasonal reference's prediction (log s), NaN: none yet
        self.interval = np.zeros(n, bool)  # the op has an interval (not the first of its run)
        self.use_lstm = use_lstm
        self.scored = np.zeros(0, bool)  # per model: the LSTM scores every op (else 1 in op_shadow_every)
        self.judged = np.zeros(0, bool)  # per model: the LSTM judges
        self.windows: dict[tuple[int, int], Windows] = {}
