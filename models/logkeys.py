"""Log keys judged online: one job's template vocabulary, each rank's last h keys, DeepLog's top-g test.

`LogKeyDetector` is the plain, picklable part (no threads, Kafka, files or Prometheus): it mines templates,
collects a job's first sequences for a bootstrapped model, and judges lines in order with whatever model it has
been given. The stage that drives it (processors/logkey_stage.py) decides when to train and publishes.

Verdicts on a line whose key is `k`, with the rank's previous h keys as the window:
- `k` unknown to the model (never seen in training, or mined after it): a *new key*. Per the paper this is an
  anomaly; it is raised when the template is error level (`log_level`), or always with
  `logkey_new_key_alarm = "always"`. Other new templates (the first checkpoint save or evaluation loop after a
  bootstrap, a deprecation warning) are published on the log-keys topic and counted, not raised: a job's later
  phases are new to a model bootstrapped on its start, and they are not faults.
- `k` known but not a candidate: the candidates are the top-g predictions with probability >= `deeplog_min_prob`
  (in a small vocabulary the top g reach keys the model gives ~0), plus any key predicted at no less than
  `deeplog_rare_ratio` times its base rate in training (a rare but normal key, such as the first checkpoint save
  a bootstrapped model saw once, is as likely here as anywhere: not an anomaly). Outside them: an
  *unexpected key*.
- windows holding an unknown key are not judged (the model has never seen such a history); they pass after h
  lines.
One anomaly per burst per rank: a flagged line within `logkey_burst_gap_s` (event time) of the rank's previous
flagged line belongs to the same burst and is counted, not raised again, except once when the burst escalates
from warning to critical.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rankwatch.models.log_levels import log_level
from rankwatch.models.templates import LogTemplateMiner

from rankwatch.deeplog.model import PAD, UNK, DeepLog, Vocabulary, weights_from_json, weights_to_json


@dataclass
class LogKeyConfig:
    """Log keys and DeepLog ([detection] section; docs/LOGKEYS.md)."""

    logkey_enabled: bool = True  # forward log lines to stage 2 and judge them
    logkey_sim_th: float = 0.5  # Drain similarity threshold
    logkey_depth: int = 4  # Drain tree depth
    logkey_max_templates: int = 2000  # per job; further unmatched lines share one overflow key
    logkey_max_msg_chars: int = 2000  # longer messages are cut before mining
    logkey_reorder_s: float = 2.0  # stage 2 orders a job's lines across ranks, waiting at most this (wall)
    logkey_burst_gap_s: float = 60.0  # flagged lines closer than this on one rank are one burst
    logkey_new_key_alarm: str = "level"  # level | always | never: which never-seen keys are raised
    # a never-seen warning is not raised (mostly benign), unless one rank repeats it this often this fast:
    # a loss scaler skipping every step, a retry loop that never ends
    logkey_flood_lines: int = 50
    logkey_flood_window_s: float = 600.0
    deeplog_model: str | None = None  # trained checkpoint (file, or a folder: its newest *.pt); else bootstrap
    deeplog_reload_check_s: float = 10.0  # how often to look for a newer checkpoint
    deeplog_window: int = 10  # h (a trained model brings its own)
    deeplog_top_g: int = 9  # g
    deeplog_min_prob: float = 0.001  # a key below this probability is not a candidate even within the top g
    deeplog_rare_ratio: float = 0.1  # ... but a key predicted at >= this x its training base rate always is
    deeplog_bootstrap_lines: int = 2000  # a job's first lines that train its own model when none is given
    deeplog_bootstrap_steps: int = 300  # optimizer steps of the bootstrap fit (bounded cost: ~2 s on 1 core)
    deeplog_embedding_dim: int = 32
    deeplog_hidden_size: int = 64
    deeplog_num_layers: int = 2
    deeplog_train_in_thread: bool = True  # bootstrap training off the event loop (stream and analyze alike)
    deeplog_hold_max: int = 100_000  # lines held per job while its model trains; beyond it, wait for it
    deeplog_cache_size: int = 50_000  # distinct windows whose predictions are kept
    deeplog_threads: int = 1  # torch intra-op threads in a worker/analyze process (0: torch's default); small
    # LSTM batches run faster on one thread than on two contended ones (measured on 2 cores: 2.1 vs 11 ms)


_MAX_FLOOD_KEYS = 10_000  # (rank, key) pairs whose recent times are kept for the flood check
_PREDICT_BATCH = 4096  # windows per forward pass: a backlog judged at once (analyze, a replay) stays bounded


# ---- per-line data -----------------------------------------------------------------------------------------
@dataclass
class Line:
    rank: int | None
    ts: float
    tid: int
    ref: Any = None  # the caller's handle on the source line (a summary dict)


@dataclass
class Finding:
    """A flagged line that opens (or escalates) a burst."""

    line: Line
    reason: str  # new_key | unexpected_key
    severity: str
    level: str | None
    prob: float | None = None  # model probability of the actual key
    key_rank: int | None = None  # 1 = the model's first choice
    top: list[tuple[int, float]] = field(default_factory=list)  # predicted (template id, probability)
    window: list[int | None] = field(default_factory=list)  # the rank's previous template ids (None: padding)
    escalation: bool = False


@dataclass
class RankState:
    history: deque  # template ids, oldest first (None = padding)
    burst_last: float | None = None  # event time of the last flagged line
    burst_severity: str | None = None
    burst_lines: int = 0
    escalated: bool = False


class LogKeyDetector:
    """A job's log keys: template miner, model + vocabulary, per-rank windows and bursts."""

    def __init__(self, cfg: LogKeyConfig | None = None) -> None:
        self.cfg = cfg = cfg or LogKeyConfig()
        self.miner = LogTemplateMiner(sim_th=cfg.logkey_sim_th, depth=cfg.logkey_depth,
                                      max_templates=cfg.logkey_max_templates, max_chars=cfg.logkey_max_msg_chars)
        self.window = cfg.deeplog_window
        self.levels: dict[int, str | None] = {}
        self.model: DeepLog | None = None
        self.vocab: Vocabulary | None = None
        self.model_source = ""
        self.model_version = 0
        self.ranks: dict[int | None, RankState] = {}
        # bootstrap: (window of template ids, next id) -> count, from the job's first lines
        self.pairs: Counter = Counter()
        self.collected = 0
        self.stats = Counter()  # judged, unjudged (unknown key in window), new_keys, flagged, bursts
        self._index: dict[int, int] = {}  # template id -> class index under the current model
        self._cache: dict[tuple, tuple[np.ndarray, float]] = {}  # window -> (probabilities, candidate cut)
        self._floor = np.zeros(0)  # per class: rare_ratio x base rate (a probability that always suffices)
        self.floods: dict[tuple[int | None, int], deque] = {}  # (rank, new warning key) -> its recent times
        self.flooded: set[int] = set()  # new warning keys raised as floods (once per key per job)

    # ---- mining -------------------------------------------------------------------------------------------
    def mine(self, message: str) -> tuple[int, str]:
        tid, change = self.miner.add(message)
        if change != "none" or tid not in self.levels:
            self.levels[tid] = log_level(self.miner.template(tid))
            self._index.pop(tid, None)
        return tid, change

    def level(self, tid: int) -> str | None:
        return self.levels.get(tid)

    def rank_state(self, rank: int | None) -> RankState:
        st = self.ranks.get(rank)
        if st is None:
            st = self.ranks[rank] = RankState(deque([None] * self.window, maxlen=self.window))
        return st

    # ---- model --------------------------------------------------------------------------------------------
    def install_model(self, model: DeepLog, vocab: Vocabulary, source: str) -> None:
        self.model, self.vocab, self.model_source = model, vocab, source
        self.model_version += 1
        self._index.clear()
        self._cache.clear()
        rates = vocab.base_rates()
        with np.errstate(invalid="ignore"):  # ratio inf x rate 0 (no exception wanted): masked just below
            floor = self.cfg.deeplog_rare_ratio * rates
        self._floor = np.where(rates > 0, floor, np.inf)[: model.model_args.vocab_size]
        if len(self._floor) < model.model_args.vocab_size:
            self._floor = np.concatenate([self._floor, np.full(model.model_args.vocab_size - len(self._floor),
                                                               np.inf)])
        if model.window != self.window:  # a trained model brings its own h
            self.window = model.window
            for st in self.ranks.values():
                st.history = deque(list(st.history)[-self.window:], maxlen=self.window)
                while len(st.history) < self.window:
                    st.history.appendleft(None)

    def index(self, tid: int) -> int:
        """Class index of a template id under the current model (UNK if the model does not know it). A key the
        vocabulary holds under this id wins; else one whose template text is identical."""
        idx = self._index.get(tid)
        if idx is None:
            vocab = self.vocab
            idx = UNK if vocab is None else vocab.index.get(str(tid), UNK)
            if idx == UNK and vocab is not None and vocab.templates:
                text = self.miner.template(tid)
                idx = next((vocab.index[k] for k, t in vocab.templates.items() if t == text and k in vocab.index),
                           UNK)
            self._index[tid] = idx
        return idx

    def unknown_templates(self) -> int:
        return sum(1 for tid in self.miner.templates() if self.index(tid) == UNK)

    # ---- bootstrap collection -------------------------------------------------------------------------------
    def refresh_levels(self) -> None:
        self.levels = {tid: log_level(text) for tid, text in self.miner.templates().items()}
        self._index.clear()

    def collect(self, line: Line, learn: bool = True) -> Finding | None:
        """Before any model exists: judge by level alone, learn the pair (window -> key) of unflagged lines."""
        level = self.levels.get(line.tid)
        st = self.rank_state(line.rank)
        flagged = self._new_key_alarm(level)
        finding = None
        if flagged:
            self.stats["new_keys"] += 1
            finding = self._burst(st, line, "new_key", level, None)
            st.history.clear()  # no learned window spans a flagged line
            st.history.extend([None] * self.window)
        else:
            if learn:
                self.pairs[(tuple(st.history), line.tid)] += 1
            st.history.append(line.tid)
        self.collected += 1
        return finding

    def training_set(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, Vocabulary]:
        """Deduplicated (window, next key) pairs with their counts, as class indices, and the vocabulary."""
        tids = sorted({t for (win, nxt) in self.pairs for t in (*win, nxt) if t is not None})
        counts = Counter()
        for (_, nxt), n in self.pairs.items():
            counts[str(nxt)] += n
        vocab = Vocabulary([str(t) for t in tids], {str(t): self.miner.template(t) for t in tids},
                           counts=dict(counts))
        windows = np.array([[PAD if t is None else vocab.index[str(t)] for t in win] for win, _ in self.pairs],
                           dtype=np.int64).reshape(len(self.pairs), self.window)
        targets = np.array([vocab.index[str(nxt)] for _, nxt in self.pairs], dtype=np.int64)
        weights = np.array(list(self.pairs.values()), dtype=np.float32)
        return windows, targets, weights, vocab

    def new_model(self, vocab_size: int, seed: int = 0) -> DeepLog:
        c = self.cfg
        model = DeepLog(vocab_size, c.deeplog_embedding_dim, c.deeplog_hidden_size, c.deeplog_num_layers,
                        dropout=0.0, window=self.window)
        model.reset_parameters(seed)
        return model

    # ---- judging --------------------------------------------------------------------------------------------
    def _new_key_alarm(self, level: str | None) -> bool:
        mode = self.cfg.logkey_new_key_alarm
        if mode == "always":
            return True
        if mode == "never":
            return False
        # warnings are mostly benign noise in real jobs (deprecations, rendezvous and reducer notices), and a
        # job's later phases are new to a model bootstrapped on its start: only error-level keys are raised
        return level == "error"

    def judge(self, lines: list[Line]) -> list[Finding]:
        """Judge lines in order with the installed model: one forward pass for every window not yet cached."""
        model = self.model
        assert model is not None, "judge() needs a model (collect() before one exists)"
        index = self.index
        staged = []
        for line in lines:
            st = self.rank_state(line.rank)
            window = tuple(st.history)
            staged.append((line, st, window, index(line.tid)))
            st.history.append(line.tid)
        todo: dict[tuple, np.ndarray] = {}
        for _, _, window, idx in staged:
            if idx != UNK and window not in self._cache and window not in todo:
                classes = [PAD if t is None else index(t) for t in window]
                if UNK not in classes:
                    todo[window] = np.asarray(classes, dtype=np.int64)
        if todo:
            self._predict(todo)
        findings = []
        for line, st, window, idx in staged:
            f = self._verdict(line, st, window, idx)
            if f is not None:
                findings.append(f)
        return findings

    def _predict(self, todo: dict[tuple, np.ndarray]) -> None:
        if len(self._cache) + len(todo) > self.cfg.deeplog_cache_size:
            self._cache.clear()  # cheap and rare: training loops repeat a few windows
        keys = list(todo)
        for i in range(0, len(keys), _PREDICT_BATCH):  # a backlog's windows, a slice at a time: bounded memory
            part = keys[i:i + _PREDICT_BATCH]
            batch = np.stack([todo[k] for k in part])
            with torch.inference_mode():
                probs = self.model.predict_proba(torch.from_numpy(batch)).cpu().numpy()  # type: ignore[union-attr]
            g = min(self.cfg.deeplog_top_g, probs.shape[1])
            # the g-th largest probability: a key below it is outside the top g
            cut = -np.partition(-probs, g - 1, axis=1)[:, g - 1]
            cut = np.maximum(cut, self.cfg.deeplog_min_prob)
            for k, row, c in zip(part, probs, cut, strict=True):
                self._cache[k] = (row, float(c))

    def _verdict(self, line: Line, st: RankState, window: tuple, idx: int) -> Finding | None:
        level = self.levels.get(line.tid)
        if idx == UNK:
            self.stats["new_keys"] += 1
            if self._new_key_alarm(level):
                return self._burst(st, line, "new_key", level, window)
            if level == "warn" and line.tid not in self.flooded and self._flooding(line):
                self.flooded.add(line.tid)
                return self._burst(st, line, "new_key_flood", level, window)
            return None
        cached = self._cache.get(window)
        if cached is None:  # the window holds a key the model does not know
            self.stats["unjudged"] += 1
            return None
        self.stats["judged"] += 1
        row, cut = cached
        p = float(row[idx])
        if p >= cut or p >= self._floor[idx]:
            return None
        return self._burst(st, line, "unexpected_key", level, window, row, p)

    def _flooding(self, line: Line) -> bool:
        """Has this rank logged this never-seen warning `logkey_flood_lines` times within the window?"""
        key = (line.rank, line.tid)
        times = self.floods.get(key)
        if times is None:
            if len(self.floods) >= _MAX_FLOOD_KEYS:
                del self.floods[next(iter(self.floods))]  # the oldest tracked: bounded memory on huge jobs
            times = self.floods[key] = deque(maxlen=self.cfg.logkey_flood_lines)
        times.append(line.ts)
        return len(times) == times.maxlen and times[-1] - times[0] <= self.cfg.logkey_flood_window_s

    def _burst(self, st: RankState, line: Line, reason: str, level: str | None, window: tuple | None,
               row: np.ndarray | None = None, p: float | None = None) -> Finding | None:
        self.stats["flagged"] += 1
        severity = "critical" if level == "error" else "warning"
        same = st.burst_last is not None and line.ts - st.burst_last <= self.cfg.logkey_burst_gap_s
        st.burst_last = line.ts if st.burst_last is None else max(st.burst_last, line.ts)
        escalation = False
        if same:
            st.burst_lines += 1
            if not (severity == "critical" and st.burst_severity == "warning" and not st.escalated):
                return None
            st.escalated, escalation = True, True
        else:
            self.stats["bursts"] += 1
            st.burst_lines, st.escalated = 1, False
        st.burst_severity = severity
        f = Finding(line, reason, severity, level, p, escalation=escalation,
                    window=[] if window is None else list(window))
        if row is not None and p is not None:
            f.key_rank = int((row > p).sum()) + 1
            order = np.argsort(-row)[: self.cfg.deeplog_top_g]
            f.top = [(self._tid_of(int(i)), float(row[i])) for i in order]
        return f

    def _tid_of(self, idx: int) -> int:
        key = self.vocab.decode(idx) if self.vocab is not None else ""
        try:
            return int(key)
        except ValueError:
            return -1

    # ---- persistence ---------------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return {
            "miner": self.miner.save_state(),
            "window": self.window,
            "levels": [[t, lv] for t, lv in self.levels.items()],
            "model": None if self.model is None else weights_to_json(self.model),
            "vocab": None if self.vocab is None else self.vocab.to_dict(),
            "model_source": self.model_source,
            "model_version": self.model_version,
            "ranks": [[r, list(st.history), st.burst_last, st.burst_severity, st.burst_lines, st.escalated]
                      for r, st in self.ranks.items()],
            "pairs": [[list(win), nxt, n] for (win, nxt), n in self.pairs.items()],
            "collected": self.collected,
            "stats": dict(self.stats),
            "floods": [[r, t, list(ts)] for (r, t), ts in self.floods.items()],
            "flooded": sorted(self.flooded),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.miner = LogTemplateMiner.from_state(state["miner"])
        self.window = int(state.get("window", self.window))
        self.levels = {int(t): lv for t, lv in state.get("levels", [])}
        self.model = self.vocab = None
        self._index.clear()
        self._cache.clear()
        if state.get("model") is not None and state.get("vocab") is not None:
            self.install_model(weights_from_json(state["model"]), Vocabulary.from_dict(state["vocab"]),
                               str(state.get("model_source", "")))
        self.model_version = int(state.get("model_version", self.model_version))
        self.ranks = {}
        for r, hist, last, sev, n, esc in state.get("ranks", []):
            self.ranks[r] = RankState(deque(hist, maxlen=self.window), last, sev, int(n), bool(esc))
        self.pairs = Counter({(tuple(win), nxt): int(n) for win, nxt, n in state.get("pairs", [])})
        self.collected = int(state.get("collected", 0))
        self.stats = Counter(state.get("stats", {}))
        self.floods = {(r, int(t)): deque(ts, maxlen=self.cfg.logkey_flood_lines)
                       for r, t, ts in state.get("floods", [])}
        self.flooded = {int(t) for t in state.get("flooded", [])}
