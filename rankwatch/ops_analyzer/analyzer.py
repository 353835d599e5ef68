"""`LSTMTimeSeriesAnalyzer`: the users' offline per rank/stream LSTM tool, kept as an interface over rankwatch's
one collective-timing model (models/op_timing.py, the code `rankwatch analyze` and the stream run).

What stays as the seed had it: results per rank, then per stream, then per continuous run (opCount +1 within a
save_count; a gap, a restart or a new save_count starts a new run); per run the anomalous ops' indices within
the run, and their deviation score, the relative error |actual - predicted| / predicted of the op's interval.

What changed, and why:
- The default verdict is calibrated per rank/stream on the key's own residuals (docs/DETECTION.md). The seed's
  fixed rule (relative error > `threshold`, 2.0) needs an interval 3x its prediction: it misses a stream that
  became 1.5-3x slower, the common real fault. `verdict="relative"` applies the seed's rule exactly.
- One LSTM per job (shared weights, per-key normalisation) instead of one per rank/stream, trained online; it
  judges once it predicts better than the seasonal moving-average reference, which answers until then (and
  without torch). The first `op_min_history` ops of each run are the warm-up: never anomalous.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from rankwatch.models.op_timing import OpInput, OpTimingConfig, OpTimingDetector, OpVerdict
from rankwatch.ops_analyzer.logs import _plain, _rank_order, entry_op_count, entry_order, entry_time

log = logging.getLogger("rankwatch.ops")

STREAM_PARAMS = ("sequence_length", "threshold", "k")  # per-stream overrides the model knows
Key = tuple[Any, str]  # (rank, stream)


class LSTMTimeSeriesAnalyzer:
    """Offline analysis of `{rank: [entry, ...]}` (from `DistributedLogAnalyzer.parse_log_files()` or made by
    hand: each entry needs `timestamp`, `op_count`, and optionally `stream`, `save_count`, `comm`, `job`).

    `threshold` is the seed's relative-error limit; it decides only with `verdict="relative"`. `stream_params`
    overrides `sequence_length`, `threshold` or `k` (the calibrated rule's width) per stream:
    `{'0x1234': {'sequence_length': 8, 'threshold': 1.5}}`. `config` supplies the model's other settings
    (models/op_timing.OpTimingConfig); the explicit arguments win over it."""

    def __init__(self, sequence_length: int = 10, threshold: float = 2.0, hidden_size: int = 64,
                 num_layers: int = 2, verbose: bool = False, verdict: str = "calibrated",
                 stream_params: dict[str, dict[str, Any]] | None = None, *, use_lstm: bool = True,
                 config: OpTimingConfig | None = None, batch_size: int = 2000) -> None:
        if verdict not in ("calibrated", "relative"):
            raise ValueError(f"verdict must be 'calibrated' or 'relative', not {verdict!r}")
        for stream, params in (stream_params or {}).items():
            unknown = set(params) - set(STREAM_PARAMS)
            if unknown:
                raise ValueError(f"stream_params[{stream!r}]: unknown {sorted(unknown)}; known {STREAM_PARAMS}")
        base = config or OpTimingConfig()
        self.config = replace(base, op_sequence_length=int(sequence_length), op_threshold=float(threshold),
                              op_hidden_size=int(hidden_size), op_num_layers=int(num_layers), op_verdict=verdict,
                              op_stream_params={**base.op_stream_params, **(stream_params or {})},
                              op_use_lstm=base.op_use_lstm and use_lstm, op_background_training=False)
        self.verbose = verbose
        self.batch_size = batch_size
        self.detector: OpTimingDetector | None = None
        self.results: dict[Any, dict[str, list[dict[str, Any]]]] = {}
        self.ops: dict[Key, list[list[dict[str, Any]]]] = {}  # (rank, stream) -> per run, its anomalous ops
        self.judged: dict[Key, list[int]] = {}  # (rank, stream) -> per run, ops past the warm-up
        self.predictors: Counter[str] = Counter()  # judged ops by the predictor that judged them
        self.skipped = 0  # entries without a usable timestamp or op_count (counted, logged, left out)

    @classmethod
    def from_config(cls, config: OpTimingConfig, verbose: bool = False) -> LSTMTimeSeriesAnalyzer:
        """All settings from a loaded config (`rankwatch ops` reads the `[detection]` section, as analyze)."""
        return cls(config.op_sequence_length, config.op_threshold, config.op_hidden_size, config.op_num_layers,
                   verbose, config.op_verdict, config=config)

    # ---- analysis ---------------------------------------------------------------------------------------
    def analyze_logs(self, rank_entries: dict[Any, list[dict[str, Any]]],
                     on_progress: Callable[[int, int], None] | None = None) -> dict[Any, dict[str, list]]:
        """Run every rank/stream through the model; returns (and keeps) `{rank: {stream: [run, ...]}}`, each
        run shaped `{'sequence_info': {...}, 'anomalies': {...}}` as `get_rank_stream_anomalies` returns it.

        Ops are fed to the model merged by time across ranks, in batches, as `rankwatch analyze` feeds them:
        every rank/stream still sees its own ops in `entry_order`, and the job's shared LSTM learns from the
        job's ops in the order they happened."""
        keyed = self._keyed(rank_entries)
        total = sum(len(v) for v in keyed.values())
        self.detector = OpTimingDetector(self.config)
        seen: dict[Key, list[tuple[dict[str, Any], OpVerdict]]] = {k: [] for k in keyed}
        merged = heapq.merge(*[[(ts, k, e) for ts, e in v] for k, v in keyed.items()], key=lambda x: x[0])
        done = 0
        for batch in _batches(merged, self.batch_size):
            items = [OpInput((str(e.get("job") or "job"), k[0], k[1]), ts, entry_op_count(e),
                             str(e.get("comm") or e.get("comm_id") or ""), e.get("save_count"))
                     for ts, k, e in batch]
            for (_, k, e), v in zip(batch, self.detector.update(items), strict=True):
                seen[k].append((e, v))
            done += len(batch)
            if on_progress:
                on_progress(done, total)
        self.results, self.ops, self.judged, self.predictors = {}, {}, {}, Counter()
        for (rank, stream), pairs in sorted(seen.items(), key=lambda kv: (_rank_order(kv[0][0]), kv[0][1])):
            runs = _split_runs(pairs, self.config)
            self.results.setdefault(rank, {})[stream] = [_run_result(stream, run) for run in runs]
            self.ops[(rank, stream)] = [[_op_detail(op) for op in run if op.anomalous] for run in runs]
            self.judged[(rank, stream)] = [sum(op.judged for op in run) for run in runs]
            self.predictors.update(op.verdict.predictor for run in runs for op in run if op.judged)
        if self.verbose:
            n = sum(len(run) for per in self.ops.values() for run in per)
            log.info("%d ops of %d rank/streams judged (%s verdict): %d anomalous", total, len(keyed),
                     self.config.op_verdict, n)
        return self.results

    def _keyed(self, rank_entries: dict[Any, list[dict[str, Any]]]) -> dict[Key, list[tuple[float, dict]]]:
        """Entries by (rank, stream), each list in `entry_order`; unusable entries counted and left out."""
        keyed: dict[Key, list[dict[str, Any]]] = defaultdict(list)
        self.skipped = 0
        for rank, entries in rank_entries.items():
            for e in entries:
                try:
                    entry_order(e)  # timestamp, op_count and save_count must all be readable
                except (KeyError, TypeError, ValueError) as exc:
                    self.skipped += 1
                    if self.skipped <= 5:
                        log.warning("rank %s: entry skipped (%r): %s", rank, exc, e)
                    continue
                keyed[(rank, str(e.get("stream") or "default"))].append(e)
        if self.skipped:
            log.warning("%d entries without a usable timestamp/op_count were skipped", self.skipped)
        return {k: [(entry_time(e), e) for e in sorted(v, key=entry_order)] for k, v in keyed.items()}

    # ---- queries (the seed's) ---------------------------------------------------------------------------
    def get_rank_anomalies(self, rank: Any) -> dict[str, list[dict[str, Any]]]:
        """`{stream: [run, ...]}` of one rank, only streams and runs with at least one anomalous op."""
        out = {}
        for stream in self.results.get(rank, {}):
            runs = self.get_rank_stream_anomalies(rank, stream)
            if runs:
                out[stream] = runs
        return out

    def get_rank_stream_anomalies(self, rank: Any, stream: str) -> list[dict[str, Any]]:
        """Runs of one rank/stream with anomalies, each `{'sequence_info': {'start_save_count',
        'end_save_count', 'stream', 'operations_count'}, 'anomalies': {'anomalies_found', 'max_deviation',
        'anomaly_indices', 'deviation_scores'}}`."""
        return [r for r in self.results.get(rank, {}).get(stream, []) if r["anomalies"]["anomalies_found"]]

    def anomalous_ops(self, rank: Any, stream: str) -> list[list[dict[str, Any]]]:
        """Per run of one rank/stream, its anomalous ops: opCount, op, comm, save_count, timestamp, actual and
        predicted interval (s), deviation, the predictor that judged, and whether it opened an episode (the op
        `rankwatch analyze` reports: consecutive anomalous ops form one finding)."""
        return self.ops.get((rank, stream), [])

    def generate_report(self, verbose: bool | None = None, width: int = 80) -> str:
        from rankwatch.ops_analyzer.report import render_report

        return render_report(self, self.verbose if verbose is None else verbose, width)


def _batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for it in items:
        batch.append(it)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass(slots=True)
class _Op:
    entry: dict[str, Any]
    verdict: OpVerdict
    judged: bool = False  # past the run's warm-up, with a prediction
    anomalous: bool = False
    onset: bool = False  # the op that reports its episode: its op_confirm-th anomalous op (what `analyze` reports)


def _split_runs(pairs: list[tuple[dict[str, Any], OpVerdict]], c: OpTimingConfig) -> list[list[_Op]]:
    """The model's own runs: a new one wherever its verdict says the op did not continue the previous one.

    Warm-up and episodes are counted here on each op's own index within its run (`OpVerdict.index`). The model
    (models/op_timing.py `_judge`) compares the key's index at the end of the update batch instead, so with
    several ops of a key in one batch an op early in the batch can pass the warm-up, and two episodes of one
    batch merge; and its episode memory crosses run boundaries. Counting here keeps this library's numbers
    independent of how ops were batched (they equal the model's when each batch holds one op per key)."""
    runs: list[list[_Op]] = []
    last_flag = hits = 0
    for e, v in pairs:
        if not runs or v.run != runs[-1][-1].verdict.run:
            runs.append([])
            last_flag = -(10**9)
        judged = v.ready and v.index >= c.op_min_history
        op = _Op(e, v, judged, v.is_anomaly and judged)
        if op.anomalous:
            hits = 1 if v.index - last_flag > c.op_episode_gap else hits + 1
            op.onset = hits == max(1, c.op_confirm)  # reported at its op_confirm-th anomalous op, as the model does
            last_flag = v.index
        runs[-1].append(op)
    return runs


def _run_result(stream: str, run: list[_Op]) -> dict[str, Any]:
    bad = [op.verdict for op in run if op.anomalous]
    scores = [float(v.deviation) for v in bad]
    return {"sequence_info": {"start_save_count": _plain(run[0].entry.get("save_count")),
                              "end_save_count": _plain(run[-1].entry.get("save_count")),
                              "stream": stream, "operations_count": len(run)},
            "anomalies": {"anomalies_found": len(bad), "max_deviation": max(scores, default=0.0),
                          "anomaly_indices": [int(v.index) for v in bad], "deviation_scores": scores}}


def _op_detail(op: _Op) -> dict[str, Any]:
    e, v = op.entry, op.verdict
    return {"index": v.index, "op_count": entry_op_count(e), "op": e.get("op"), "comm": e.get("comm"),
            "save_count": _plain(e.get("save_count")), "timestamp": entry_time(e), "actual_s": v.actual_s,
            "predicted_s": v.predicted_s, "deviation": v.deviation, "predictor": v.predictor, "onset": op.onset}
