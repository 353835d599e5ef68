"""The text report of `LSTMTimeSeriesAnalyzer.generate_report()`: per rank its streams, per stream its runs, per
run the anomaly count, max deviation and anomaly indices (the seed's contents), in plain ASCII that fits the
given width, so it reads the same in a terminal, a pipe or a file."""

from __future__ import annotations

import textwrap
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rankwatch.ops_analyzer.analyzer import LSTMTimeSeriesAnalyzer


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"


def _wrap(text: str, width: int, indent: int, hang: int = 2) -> list[str]:
    return textwrap.wrap(text, width, initial_indent=" " * indent, subsequent_indent=" " * (indent + hang),
                         break_on_hyphens=False) or [" " * indent]


def _saves(info: dict[str, Any]) -> str:
    a, b = info["start_save_count"], info["end_save_count"]
    if a is None and b is None:
        return ""
    return f", save_count {a}" if a == b else f", save_count {a}..{b}"


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:23]


def _header(an: LSTMTimeSeriesAnalyzer, width: int) -> list[str]:
    c = an.config
    runs = [r for per in an.results.values() for rs in per.values() for r in rs]
    streams = sum(len(per) for per in an.results.values())
    ops = sum(r["sequence_info"]["operations_count"] for r in runs)
    bad = sum(r["anomalies"]["anomalies_found"] for r in runs)
    bad_runs = sum(1 for r in runs if r["anomalies"]["anomalies_found"])
    bad_ranks = [rank for rank in an.results if an.get_rank_anomalies(rank)]
    if c.op_verdict == "relative":
        verdict = (f"relative error |actual - predicted| / predicted > {c.op_threshold:g} (the seed's rule); "
                   "deviation = that error")
    else:
        verdict = (f"calibrated per rank/stream on its own residuals (k = {c.op_k:g}, interval >= "
                   f"{c.op_min_ratio:g}x predicted); deviation = relative error")
    model = (f"shared LSTM per job (sequence {c.op_sequence_length}, hidden {c.op_hidden_size} x "
             f"{c.op_num_layers}) once it beats the seasonal moving average"
             if c.op_use_lstm else "seasonal moving average (LSTM off)")
    lines = _wrap(f"Collective-op timing: {_plural(len(an.results), 'rank')}, {_plural(streams, 'stream')}, "
                  f"{_plural(len(runs), 'run')}, {ops} ops", width, 0)
    lines += _wrap(f"Verdict: {verdict}.", width, 0)
    lines += _wrap(f"Model: {model}; the first {c.op_min_history} ops of each run are its warm-up.", width, 0)
    if an.predictors:
        lines += _wrap("Judged by: " + ", ".join(f"{name} {n} ops" for name, n in an.predictors.most_common()),
                       width, 0)
    if c.op_stream_params:
        lines += _wrap(f"Per-stream settings: {c.op_stream_params}", width, 0)
    who = ", ".join(_rank_name(r) for r in bad_ranks[:8]) + (", ..." if len(bad_ranks) > 8 else "")
    lines += _wrap(f"Anomalous ops: {bad} in {_plural(bad_runs, 'run')}"
                   + (f" of {_plural(len(bad_ranks), 'rank')} ({who})" if bad_ranks else ""), width, 0)
    if len(bad_ranks) > 1:
        lines += _wrap("Several ranks at once: in synchronous training every rank waits for a slow one, so "
                       "its peers' intervals grow too (often on the first op of a step). This is the per-rank "
                       "view; `rankwatch analyze` names the late rank and leaves its waiting peers out.", width, 0)
    if an.skipped:
        lines += _wrap(f"Entries skipped (no usable timestamp or op_count): {an.skipped}", width, 0)
    return lines


def _rank_name(rank: Any) -> str:
    return "rank ?" if rank is None else f"rank {rank}"


def render_report(an: LSTMTimeSeriesAnalyzer, verbose: bool = False, width: int = 80) -> str:
    if not an.results:
        return "Collective-op timing: no collective ops analysed (no NCCL COLL lines or JSON op events)."
    lines = _header(an, width)
    for rank, streams in an.results.items():
        bad = sum(r["anomalies"]["anomalies_found"] for rs in streams.values() for r in rs)
        lines.append("")
        lines += _wrap(f"{_rank_name(rank).capitalize()}: {_plural(len(streams), 'stream')}, "
                       + (f"{_plural(bad, 'anomalous op')}" if bad else "no anomalies"), width, 0)
        for stream, runs in streams.items():
            lines += _wrap(f"stream {stream}: {_plural(len(runs), 'run')}", width, 2)
            judged = an.judged.get((rank, stream), [])
            details = an.anomalous_ops(rank, stream)
            for i, run in enumerate(runs):
                info, found = run["sequence_info"], run["anomalies"]
                n = found["anomalies_found"]
                head = (f"run {i + 1}: {info['operations_count']} ops"
                        + (f" ({judged[i]} judged)" if i < len(judged) else "") + _saves(info))
                if not n:
                    lines += _wrap(f"{head}, no anomalies", width, 4)
                    continue
                lines += _wrap(f"{head}: {_plural(n, 'anomaly', 'anomalies')}, "
                               f"max deviation {found['max_deviation']:.3g}", width, 4)
                lines += _wrap("indices: " + ", ".join(str(x) for x in found["anomaly_indices"]), width, 6, 9)
                if verbose and i < len(details):
                    for op in details[i]:
                        lines += _wrap(
                            f"#{op['index']} opCount {op['op_count']} {op['op'] or ''} at {_clock(op['timestamp'])}"
                            f": {op['actual_s']:.3g}s after the previous op, {op['predicted_s']:.3g}s predicted "
                            f"({op['predictor']}), deviation {op['deviation']:.3g}"
                            + (" [onset]" if op["onset"] else ""), width, 6, 4)
    return "\n".join(lines)
