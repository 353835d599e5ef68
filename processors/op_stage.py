"""Collective ops, stage 1: per rank/stream op timing (`OpHandler`), the ops' compact summaries for stage 2
(columns), and the NCCL facts stage 2 needs (`NcclEventHandler`). Stage 2 is processors/collective_stage.py.

Stage 1, per rank/stream (`OpHandler`): the op-timing model (models/op_timing.py) judges each op's interval; a
finding goes on to stage 2 as a candidate, with every op's compact summary (rank, comm, opCount, enqueue time).
`NcclEventHandler` forwards NCCL communicator-init lines (which tie a process's comm pointer to the commId all
its ranks share), PyTorch watchdog timeouts, and the scheduler's or launcher's job-stop lines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from rankwatch.models.op_timing import OpTimingDetector, OpVerdict, PendingOps
from rankwatch.processors.stages import Summary, anomaly_fields, finite

from rankwatch.records import Anomaly, Record

if TYPE_CHECKING:
    from rankwatch.processors.pipeline import StageContext


def shared_comm(data: dict[str, Any]) -> str:
    """The identity of an op's communicator that every rank shares, when the record has it: NCCL's commId
    (attached by the parser from the init line of the same process), or a JSON event's own `comm`. NCCL COLL
    lines' `comm 0x...` is a per-process pointer: resolved in stage 2."""
    if data.get("comm_id"):
        return f"id:{data['comm_id']}"
    if data.get("comm") and "datatype" not in data:  # a JSON op event: its comm is already shared
        return f"json:{data['comm']}"
    return ""


class OpHandler:
    """Stage 1 for collective ops, keyed by job/rank/stream.

    `process(records, defer=True)` begins the batch (runs, windows, the LSTM's forward passes sent to the
    inference threads), returns its op summaries at once and its findings with the next call (or `flush`): the
    worker then builds batch j+1 while the forward passes of batch j run (processors/app.py). Findings come in
    batch order either way, and with the verdicts an undeferred run gives."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.detector = OpTimingDetector(ctx.config)
        self._pending: tuple[PendingOps, list[Record]] | None = None
        self.deferred_begun = 0  # batches deferred so far ...
        self.deferred_done = 0  # ... and those whose findings have been returned since

    def process(self, records: list[Record], defer: bool = False) -> tuple[list[Anomaly], list[Summary]]:
        try:  # the usual batch: every record has an opCount, columns built at once
            counts = [int(rec.data["op_count"]) for rec in records]
            kept = records
        except (TypeError, ValueError, KeyError):
            kept, counts = [], []
            for rec in records:
                try:
                    counts.append(int(rec.data["op_count"]))
                    kept.append(rec)
                except (TypeError, ValueError, KeyError) as exc:
                    self.ctx.skip(rec, exc)
        data = [rec.data for rec in kept]
        ranks = [rec.rank for rec in kept]
        ts = [rec.ts for rec in kept]
        pending = self.detector.begin(
            list(zip([rec.job for rec in kept], ranks, [str(d.get("stream", "default")) for d in data], strict=True)),
            ts, counts, [str(d.get("comm") or d.get("comm_id") or "") for d in data],
            [d.get("save_count") for d in data], send=defer)
        summaries: list[Summary] = []
        if self.ctx.wants("ops"):
            by_job: dict[str, list[int]] = {}
            for i, rec in enumerate(kept):
                if rec.rank is not None:
                    by_job.setdefault(rec.job, []).append(i)
            for job, rows in by_job.items():
                if len(rows) == len(kept):  # the usual batch: one job's ops, the columns built above as they are
                    summaries.extend(op_columns(job, kept, data, ranks, ts, counts))
                else:
                    summaries.extend(op_columns(job, [kept[i] for i in rows], [data[i] for i in rows],
                                                [ranks[i] for i in rows], [ts[i] for i in rows],
                                                [counts[i] for i in rows]))
        out: list[Anomaly] = []
        self._finish_pending(out, summaries)  # the batch before, after this one's ops summaries (see findings)
        if defer and kept:
            self._pending = (pending, kept)
            self.deferred_begun += 1
        else:
            self._findings(pending, kept, out, summaries)
        return out, summaries

    def flush(self) -> tuple[list[Anomaly], list[Summary]]:
        """The findings of a deferred batch (none: nothing deferred)."""
        out: list[Anomaly] = []
        summaries: list[Summary] = []
        self._finish_pending(out, summaries)
        return out, summaries

    def _finish_pending(self, out: list[Anomaly], summaries: list[Summary]) -> None:
        if self._pending is not None:
            pending, kept = self._pending
            self._pending = None
            self._findings(pending, kept, out, summaries)
            self.deferred_done += 1

    def _findings(self, pending: PendingOps, kept: list[Record], out: list[Anomaly], summaries: list[Summary]
                  ) -> None:
        verdicts = self.detector.finish(pending)
        to_stage2 = self.ctx.wants("op_flag")
        for i in verdicts.onsets():
            rec = kept[i]
            a = op_timing_anomaly(rec, verdicts[i])
            if to_stage2 and rec.rank is not None:  # after the op itself: stage 2 judges the flag against it
                summaries.append({**op_summary(rec), "type": "op_flag", "anomaly": anomaly_fields(a)})
            else:
                out.append(a)

    def save_state(self) -> dict[str, Any]:
        return self.detector.save_state()  # a deferred batch: its ops are in, its verdicts' learning is not

    def load_state(self, state: dict[str, Any]) -> None:
        self.detector.load_state(state)


OPS_PER_SUMMARY = 1024  # ops per columnar summary: ~100 KB of JSON, within a summaries pack (processors/app.py)
OP_COLUMNS = ("rank", "ts", "comm", "ptr", "n", "op", "nranks", "count", "file", "offset")


def op_columns(job: str, recs: list[Record], data: list[dict[str, Any]] | None = None, ranks: list[Any] | None = None,
               ts: list[float] | None = None, counts: list[int] | None = None) -> list[Summary]:
    """Every op of a batch, for its job's stage 2, as columns (OP_COLUMNS, one summary per 1,024 ops): one dict
    per op cost ~3.7 us per op to build, encode and decode again in stage 2, columns ~1.1 us. `data`, `ranks`,
    `ts` and `counts` (opCounts as ints): the records' columns where the caller has built them already."""
    data = [r.data for r in recs] if data is None else data
    ranks = [r.rank for r in recs] if ranks is None else ranks
    ts = [r.ts for r in recs] if ts is None else ts
    counts = [int(d["op_count"]) for d in data] if counts is None else counts
    out = []
    for a in range(0, len(recs), OPS_PER_SUMMARY):
        b = a + OPS_PER_SUMMARY
        part, d = recs[a:b], data[a:b]
        out.append({"type": "ops", "job": job, "rank": ranks[a:b], "ts": ts[a:b],
                    "comm": [shared_comm(x) for x in d], "ptr": [str(x.get("comm") or "") for x in d],
                    "n": counts[a:b], "op": [str(x.get("op", "")) for x in d],
                    "nranks": [x.get("nranks") for x in d], "count": [x.get("count") for x in d],
                    "file": [r.file for r in part], "offset": [r.offset for r in part]})
    return out


_OP_DEFAULTS: dict[str, Any] = {"comm": "", "ptr": "", "op": "", "file": "", "offset": -1}


def _checked_columns(s: Summary) -> Summary:
    """An `ops` summary's columns read as what they must be, in new lists: ranks, opCounts and offsets ints,
    times finite, shared comms text or empty (they key the tracker's tables). Raises on a malformed one, before
    anything of it is taken."""
    if len({len(s[k]) for k in OP_COLUMNS}) != 1:
        raise ValueError("ops summary with columns of different lengths")
    ts = np.asarray(s["ts"], np.float64)
    if not np.isfinite(ts).all():
        raise ValueError("ops summary with a time that is not a finite number")
    comms = [c or "" for c in s["comm"]]
    if not all(isinstance(c, str) for c in comms):
        raise TypeError("ops summary with a comm that is not text")
    return {**s, "rank": np.asarray(s["rank"], np.int64).tolist(), "ts": ts.tolist(), "comm": comms,
            "n": np.asarray(s["n"], np.int64).tolist(), "offset": np.asarray(s["offset"], np.int64).tolist()}


def op_summary(rec: Record) -> Summary:
    """One op as a dict, the one row of its `op_columns` (the `op_flag` summary of a finding carries it; a worker
    before columns sent each op so)."""
    (cols,) = op_columns(rec.job, [rec])
    return {"type": "op", "job": rec.job, **{k: cols[k][0] for k in OP_COLUMNS}}


def op_timing_anomaly(rec: Record, v: OpVerdict) -> Anomaly:
    d = rec.data
    stream = str(d.get("stream", "default"))
    ratio = v.actual_s / v.predicted_s if v.predicted_s > 0 else float("inf")
    op = str(d.get("op", ""))
    msg = (f"rank {rec.rank} stream {stream}: {op} opCount {d.get('op_count')} came {v.actual_s:.3g}s after the "
           f"previous op, {ratio:.1f}x the {v.predicted_s:.3g}s predicted ({v.predictor} model)")
    ctx = {"stream": stream, "comm": d.get("comm_id") or d.get("comm"), "op": op, "op_count": d.get("op_count"),
           "save_count": d.get("save_count"), "predicted_s": v.predicted_s, "actual_s": v.actual_s,
           "deviation": v.deviation, "predictor": v.predictor, "run": v.run, "index": v.index,
           "role": op.lower() or "unknown"}
    return Anomaly("op_timing", "op_interval", rec.job, rec.rank, rec.ts, v.actual_s, v.predicted_s, v.score,
                   v.threshold_s, "critical" if ratio >= 3 else "warning", msg, ctx, source_file=rec.file,
                   source_offset=rec.offset, stream=stream)


# stops that someone decided (a cancel, the time limit, a preemption, a signal to the launcher), whose aftermath
# is teardown; not a failure (a node's, a task's, a rank's) or a restart after one, where what follows may be news
DECIDED_STOPS = frozenset({"cancelled", "time_limit", "preemption", "requeue", "signal", "step_aborted"})


def job_stop_fields(s: Summary) -> tuple[float, dict[str, Any]]:
    """(time, {by, reason, file, offset}) of a `job_stop` summary; raises on a malformed one. Every stage-2
    reader takes a stop through this, so a malformed one is refused by all alike (and counted once)."""
    return finite(s["ts"]), {"by": s.get("by"), "reason": s.get("reason"), "file": str(s.get("file", "")),
                             "offset": int(s.get("offset", -1))}


class NcclEventHandler:
    """Stage 1 for log lines that carry NCCL facts the cross-rank view needs (the parser recognised them)."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def process(self, records: list[Record]) -> tuple[list[Anomaly], list[Summary]]:
        summaries: list[Summary] = []
        for rec in records:
            event = rec.data.get("event")
            fields = rec.data.get("fields")
            if not isinstance(fields, dict):
                continue
            if event == "job_stop" and self.ctx.wants("job_stop"):
                # the scheduler's or launcher's line, often from no rank. An undated one took its file's previous
                # time, which for a job killed hours into a hang is the hang's start: it is dated when it was
                # read or its file last written instead, later than it was printed, never earlier
                at = fields.get("written_by") if fields.get("undated") else rec.ts
                if isinstance(at, (int, float)) and at > 0:
                    summaries.append({"type": "job_stop", "job": rec.job, "ts": float(at), "file": rec.file,
                                      "offset": rec.offset, "by": fields.get("by"), "reason": fields.get("reason")})
                continue
            if rec.rank is None:
                continue
            if event == "nccl_comm_init" and self.ctx.wants("nccl_init") and fields.get("comm"):
                summaries.append({"type": "nccl_init", "job": rec.job, "rank": rec.rank, "ts": rec.ts,
                                  "ptr": str(fields["comm"]), "comm_id": fields.get("comm_id"),
                                  "nranks": fields.get("nranks"), "comm_rank": fields.get("comm_rank")})
            elif event == "nccl_watchdog_timeout" and self.ctx.wants("nccl_timeout"):
                summaries.append({"type": "nccl_timeout", "job": rec.job, "rank": rec.rank, "ts": rec.ts,
                                  "file": rec.file, "offset": rec.offset,
                                  **{k: fields.get(k) for k in ("pg", "seq_num", "op_type", "timeout_ms",
                                                                "ran_for_ms")}})
            elif (event == "nccl_watchdog_failure" and fields.get("kind") in ("timeout", "dump_signal")
                  and self.ctx.wants("nccl_timeout")):
                # "Timeout at NCCL work: N, last enqueued NCCL work: M" and PyTorch 2.6+'s "Received a dump signal
                # due to a collective timeout ... Last enqueued NCCL work: M": a timeout, and where the rank got
                # to. ("Exception (either an error or timeout)" lines are not: an NCCL error is no hang.)
                summaries.append({"type": "nccl_timeout", "job": rec.job, "rank": rec.rank, "ts": rec.ts,
                                  "file": rec.file, "offset": rec.offset, "reached": fields.get("last_enqueued"),
                                  "kind": fields["kind"], **{k: fields.get(k) for k in ("pg", "seq_num")}})
        return [], summaries

    def save_state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


__all__ = ["OpHandler", "NcclEventHandler", "OP_COLUMNS", "op_columns", "op_summary", "anomaly_fields", "shared_comm"]
