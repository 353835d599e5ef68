"""`rankwatch deeplog evaluate --checkpoint CKPT`: how good a trained DeepLog model is.

On normal data (`--normal`, else the training run's validation pieces): next-key top-1/5/10/20 accuracy and
loss, and the per-sequence anomaly score (the share of a sequence's keys outside the top `score_g` predictions)
with its mean, spread and p90/p95/p99 as recommended thresholds. With labelled abnormal data (`--abnormal`):
precision, recall, F1 and false-positive rate at several g with DeepLog's rule (a sequence is abnormal when any
key falls outside the top g; a key the model never saw always does), and at the recommended score thresholds.
Writes `evaluation_results_YYYYMMDD.json` and `evaluation_report_YYYYMMDD.txt`. Streams its inputs; memory is
bounded (score percentiles come from a reservoir of at most 1M sequences).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from rankwatch.deeplog.cache import KeyCache
from rankwatch.deeplog.config import DeepLogConfig, config_from_dict
from rankwatch.deeplog.data import SourceStats, file_chunks
from rankwatch.deeplog.model import EOS, PAD, UNK, DeepLog, Vocabulary, load_checkpoint

log = logging.getLogger("rankwatch.deeplog")
NEVER = np.iinfo(np.int64).max  # the rank of a key the model does not know: outside every top g
RESERVOIR = 1_000_000


def key_ranks(model: DeepLog, windows: np.ndarray, targets: np.ndarray, device: torch.device,
              batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per window: the actual key's rank among the predictions (0 = first choice; NEVER if unknown) and its
    negative log-likelihood."""
    ranks = np.empty(len(targets), dtype=np.int64)
    nll = np.empty(len(targets), dtype=np.float64)
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(targets), batch):
            x = torch.from_numpy(windows[s:s + batch]).to(device)
            y = torch.from_numpy(targets[s:s + batch]).to(device)
            logp = torch.log_softmax(model.forward_bucketed(x).float(), dim=-1)
            actual = logp.gather(1, y[:, None])
            ranks[s:s + batch] = (logp > actual).sum(dim=1).cpu().numpy()
            nll[s:s + batch] = (-actual[:, 0]).cpu().numpy()
    ranks[targets == UNK] = NEVER
    return ranks, nll


def sequence_windows(seqs: list[list[int]], h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All windows of a batch of encoded sequences: (windows, targets, sequence index per window)."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if len(seqs) else np.zeros(0, np.int64)
    seq_of = np.repeat(np.arange(len(seqs)), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos_in_seq = np.arange(len(flat)) - starts
    offsets = np.arange(-h, 0)
    idx = np.arange(len(flat))[:, None] + offsets[None, :]
    valid = (-offsets)[None, :] <= pos_in_seq[:, None]
    windows = np.where(valid, flat[np.clip(idx, 0, None)] if len(flat) else 0, PAD)
    return windows.astype(np.int64), flat, seq_of


class SequenceScores:
    """Streaming per-sequence results: DeepLog flags at every g, anomaly scores (reservoir), key accuracy.
    A key is a candidate when it is in the top g and (with `min_prob`) predicted at least that likely;
    `flagged_top_only` counts the paper's rule alone (top g)."""

    def __init__(self, top_g: list[int], top_k: list[int], score_g: int, min_prob: float = 0.0,
                 seed: int = 0) -> None:
        self.top_g, self.top_k, self.score_g = sorted(set(top_g)), sorted(set(top_k)), score_g
        self.min_prob = min_prob
        self.sequences = 0
        self.flagged = dict.fromkeys(self.top_g, 0)
        self.flagged_top_only = dict.fromkeys(self.top_g, 0)
        self.predictions = 0
        self.hits = dict.fromkeys(self.top_k, 0)
        self.nll = 0.0
        self.scores = np.zeros(0, dtype=np.float32)
        self._seen_scores = 0
        self._rng = np.random.default_rng(seed)
        self.max_ranks: list[np.ndarray] = []  # kept only for threshold checks on abnormal data

    def add(self, ranks: np.ndarray, nll: np.ndarray, seq_of: np.ndarray, n_seqs: int) -> np.ndarray:
        if n_seqs == 0:
            return np.zeros(0)
        self.sequences += n_seqs
        self.predictions += len(ranks)
        self.nll += float(nll[np.isfinite(nll)].sum())
        for k in self.top_k:
            self.hits[k] += int((ranks < k).sum())
        max_rank = np.full(n_seqs, -1, dtype=np.int64)
        np.maximum.at(max_rank, seq_of, ranks)
        improbable = np.zeros(n_seqs, dtype=bool)  # some key below min_prob
        np.logical_or.at(improbable, seq_of, np.exp(-nll) < self.min_prob)
        for g in self.top_g:
            self.flagged_top_only[g] += int((max_rank >= g).sum())
            self.flagged[g] += int(((max_rank >= g) | improbable).sum())
        missed = (ranks >= self.score_g) | (np.exp(-nll) < self.min_prob)
        misses = np.bincount(seq_of, weights=missed.astype(np.float64), minlength=n_seqs)
        counts = np.bincount(seq_of, minlength=n_seqs)
        scores = (misses / np.maximum(counts, 1)).astype(np.float32)
        self._reservoir(scores)
        return scores

    def _reservoir(self, scores: np.ndarray) -> None:
        """Keep a uniform sample of at most RESERVOIR scores (exact below that)."""
        room = max(0, RESERVOIR - len(self.scores))
        self.scores = np.concatenate([self.scores, scores[:room]])
        self._seen_scores += min(room, len(scores))
        rest = scores[room:]
        if len(rest):
            seen = self._seen_scores + 1 + np.arange(len(rest))
            j = self._rng.integers(0, seen)
            keep = j < RESERVOIR
            self.scores[j[keep]] = rest[keep]
            self._seen_scores += len(rest)

    def summary(self) -> dict[str, Any]:
        n = max(self.predictions, 1)
        out: dict[str, Any] = {"sequences": self.sequences, "predictions": self.predictions,
                               "loss": self.nll / n if self.predictions else None,
                               "top_k_accuracy": {str(k): self.hits[k] / n for k in self.top_k}}
        if len(self.scores):
            out["anomaly_score"] = {"g": self.score_g, "mean": float(self.scores.mean()),
                                    "std": float(self.scores.std()), "count": int(len(self.scores)),
                                    **{f"p{q}": float(np.percentile(self.scores, q)) for q in (90, 95, 99)}}
        return out


def _encoded_sequences(chunks: Iterable[Any], vocab: Vocabulary, end_of_sequence: bool = True
                       ) -> Iterator[tuple[list[int], int | None]]:
    """Whole sequences (per-line keys are grouped per job/rank until the source ends). Complete sequences end
    with EOS when the model was trained that way."""
    open_seqs: dict[Any, list[int]] = {}
    eos = vocab.index.get(EOS) if end_of_sequence else None
    for c in chunks:
        keys = vocab.encode_many(c.keys)
        if c.done:
            yield (keys + [eos] if eos is not None else keys), c.label
        else:
            open_seqs.setdefault(c.sid, []).extend(keys)
    for keys in open_seqs.values():
        yield keys, None


def score_source(model: DeepLog, sequences: Iterable[list[int]], scores: SequenceScores, device: torch.device,
                 batch_windows: int = 65536, thresholds: dict[str, float] | None = None) -> dict[str, int]:
    """Feed sequences through the model in batches; returns counts above each threshold (by name)."""
    above = dict.fromkeys(thresholds or {}, 0)
    pending: list[list[int]] = []
    size = 0

    def flush() -> None:
        if not pending:
            return
        w, t, seq_of = sequence_windows(pending, model.window)
        ranks, nll = key_ranks(model, w, t, device)
        s = scores.add(ranks, nll, seq_of, len(pending))
        for name, thr in (thresholds or {}).items():
            above[name] += int((s > thr).sum())
        pending.clear()

    for seq in sequences:
        if not seq:
            continue
        pending.append(seq)
        size += len(seq)
        if size >= batch_windows:
            flush()
            size = 0
    flush()
    return above


def _rates(tp: int, fp: int, fn: int, tn: int) -> dict[str, float | int]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall, "f1": f1,
            "fpr": fp / (fp + tn) if fp + tn else 0.0}


def evaluate(checkpoint: str, cfg: DeepLogConfig | None = None, normal: list[str] | None = None,
             abnormal: list[str] | None = None, output_dir: str | None = None, device: str = "auto",
             top_g: list[int] | None = None, write: bool = True) -> dict[str, Any]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model, vocab, ckpt = load_checkpoint(checkpoint, map_location=dev)
    model.to(dev)
    if cfg is None:
        cfg = config_from_dict(ckpt["config"]) if isinstance(ckpt.get("config"), dict) else DeepLogConfig()
    ev = cfg.evaluation
    normal = list(normal or ev.normal)
    abnormal = list(abnormal or ev.abnormal)
    gs = sorted(set(top_g or ev.top_g))
    normal_scores = SequenceScores(gs, ev.top_k, ev.score_g, ev.min_prob)
    source = ""
    if normal:
        score_source(model, _sequences(normal, cfg, vocab, 0), normal_scores, dev)
        source = ", ".join(normal)
    else:
        cache_dir = cfg.data.cache_dir or os.path.join(cfg.output_dir, "cache")
        if not os.path.exists(os.path.join(cache_dir, "meta.json")):
            raise ValueError("no normal data: give --normal, or evaluate next to the training run's cache")
        cache = KeyCache(cache_dir)
        for batch in cache.chunks("val", 0, 1, cfg.data.validation_split, cfg.training.seed):
            pieces, seq_of = np.unique(batch.pieces, return_inverse=True)  # each piece counts as a sequence
            ranks, nll = key_ranks(model, batch.windows, batch.targets, dev)
            normal_scores.add(ranks, nll, seq_of, len(pieces))
        source = f"validation pieces of {cache_dir}"
    results: dict[str, Any] = {
        "checkpoint": os.path.abspath(checkpoint), "evaluated_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "model_args": ckpt["model_args"], "vocabulary_keys": len(vocab) - 2, "step": ckpt.get("step"),
        "normal_source": source, "normal": normal_scores.summary(),
    }
    score = results["normal"].get("anomaly_score", {})
    results["recommended_thresholds"] = {q: score[q] for q in ("p90", "p95", "p99") if q in score}
    if abnormal:
        ab = SequenceScores(gs, ev.top_k, ev.score_g, ev.min_prob)
        above = score_source(model, _sequences(abnormal, cfg, vocab, 1), ab, dev,
                             thresholds=results["recommended_thresholds"])
        n_norm, n_ab = normal_scores.sequences, ab.sequences
        results["abnormal_source"] = ", ".join(abnormal)
        results["abnormal"] = {"sequences": n_ab}
        results["min_prob"] = ev.min_prob
        results["detection_by_g"] = {str(g): _rates(ab.flagged[g], normal_scores.flagged[g], n_ab - ab.flagged[g],
                                                    n_norm - normal_scores.flagged[g]) for g in gs}
        results["detection_by_g_top_only"] = {
            str(g): _rates(ab.flagged_top_only[g], normal_scores.flagged_top_only[g], n_ab - ab.flagged_top_only[g],
                           n_norm - normal_scores.flagged_top_only[g]) for g in gs}
        normal_above = {q: int((normal_scores.scores > thr).sum() * n_norm / max(len(normal_scores.scores), 1))
                        for q, thr in results["recommended_thresholds"].items()}
        results["detection_by_threshold"] = {
            q: {"g": ev.score_g, "threshold": thr, **_rates(above[q], normal_above[q], n_ab - above[q],
                                                            n_norm - normal_above[q])}
            for q, thr in results["recommended_thresholds"].items()}
    if write:
        out = output_dir or os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
        os.makedirs(out, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d")
        results["json_path"] = os.path.join(out, f"evaluation_results_{stamp}.json")
        results["report_path"] = os.path.join(out, f"evaluation_report_{stamp}.txt")
        with open(results["json_path"], "w") as fh:
            json.dump(results, fh, indent=2)
        with open(results["report_path"], "w") as fh:
            fh.write(text_report(results))
    return results


def _sequences(paths: list[str], cfg: DeepLogConfig, vocab: Vocabulary, label: int) -> Iterator[list[int]]:
    """Encoded sequences of files; raw logs are mined with the model's own miner, so key ids agree."""
    d = cfg.data
    chunks = file_chunks(paths, SourceStats(), d.format, d.sequence_field, d.job, label=label,
                         miner_sim_th=d.miner_sim_th, miner_depth=d.miner_depth, miner_templates=vocab.templates,
                         miner_state=vocab.miner)
    for keys, _ in _encoded_sequences(chunks, vocab, d.end_of_sequence):
        yield keys


def text_report(r: dict[str, Any]) -> str:
    n = r["normal"]
    lines = ["=" * 80, "DeepLog evaluation report", "=" * 80, f"evaluated at: {r['evaluated_at']}",
             f"checkpoint:   {r['checkpoint']} (step {r.get('step')})",
             f"model:        {r['model_args']}, {r['vocabulary_keys']} keys", f"normal data:  {r['normal_source']}",
             "", "[ next-key prediction (normal data) ]",
             f"  - evaluation loss:   {n['loss']:.4f}" if n.get("loss") is not None else "  - evaluation loss:   -",
             f"  - predictions:       {n['predictions']:,} in {n['sequences']:,} sequences"]
    for k, acc in n["top_k_accuracy"].items():
        lines.append(f"  - top-{k} accuracy:{' ' * (5 - len(k))}{acc:.4f} ({acc * 100:.2f}%)")
    if "anomaly_score" in n:
        s = n["anomaly_score"]
        lines += ["", f"[ anomaly score on normal data (share of keys outside the top {s['g']}) ]",
                  f"  - mean: {s['mean']:.4f}", f"  - std:  {s['std']:.4f}", f"  - sequences: {s['count']:,}", "",
                  "[ recommended thresholds ]"] + [f"  - {q}: {s[q]:.4f}" for q in ("p90", "p95", "p99")]
    for name, title in (("detection_by_g", f"any key outside the top g or below p={r.get('min_prob')}"),
                        ("detection_by_g_top_only", "any key outside the top g: the paper's rule")):
        if name not in r:
            continue
        lines += ["", f"[ detection: {r['abnormal']['sequences']:,} abnormal vs {n['sequences']:,} normal sequences "
                      f"(abnormal when {title}) ]",
                  f"  {'g':>4} {'precision':>10} {'recall':>8} {'F1':>8} {'FPR':>8} {'TP':>8} {'FP':>8} {'FN':>8}"]
        for g, m in r[name].items():
            lines.append(f"  {g:>4} {m['precision']:>10.4f} {m['recall']:>8.4f} {m['f1']:>8.4f} {m['fpr']:>8.4f} "
                         f"{m['tp']:>8} {m['fp']:>8} {m['fn']:>8}")
    if "detection_by_threshold" in r:
        lines += ["", "[ detection at the recommended thresholds (score > threshold) ]"]
        for q, m in r["detection_by_threshold"].items():
            lines.append(f"  {q} ({m['threshold']:.4f}): precision {m['precision']:.4f} recall {m['recall']:.4f} "
                         f"F1 {m['f1']:.4f} FPR {m['fpr']:.4f}")
    lines.append("=" * 80)
    return "\n".join(lines) + "\n"
