"""Training metrics in the two stages: per-rank detectors (stage 1), the step-time straggler and job-wide
slowdowns (stage 2).

Stage 1 judges each rank's loss, grad norm, throughput and step time (models/training.py) and remembers the
checkpoint each rank last announced. It summarises each metrics record as `{type: "step", rank, member, step,
value}` for stage 2 (`member`: the series, `series()`; `rank` null and `value` absent where unknown), sends its step-time and throughput findings there as `slowdown` candidates, and announced pauses
(checkpoint saves, evaluation results) as `pause`: stage 2's `SlowdownJob` tells a slowdown of most of the job's
ranks once (models/job_slowdown.py).

Stage 2's step-time straggler compares ranks at the same step. In synchronous training every rank waits for the
slowest at each collective, so logged step times grow together and this check is blind to such a straggler:
collective timing finds it (processors/collective_stage.py). It still earns its place where a rank's step time
is its own: asynchronous or pipeline schedules, and jobs that log per-rank compute time.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any

from rankwatch.models.job_slowdown import Candidate, JobFinding, JobSlowdown, SlowdownConfig
from rankwatch.models.straggler import StepStragglerDetector, StragglerConfig, StragglerFinding
from rankwatch.models.training import Finding, RankMetricsDetector
from rankwatch.processors.logkey_stage import log_summary
from rankwatch.processors.stages import Summary, anomaly_fields, finite, take_each

from rankwatch.parsing import rotation_base, torchrun_run_folder
from rankwatch.records import Anomaly, Record

SLOWDOWN_DETECTORS = ("step_time", "throughput")

if TYPE_CHECKING:
    from rankwatch.processors.pipeline import StageContext


def anomaly_from(rec: Record, f: Finding, checkpoint: str | None) -> Anomaly:
    ctx = dict(f.context)
    ctx.setdefault("step", rec.data.get("step"))
    if isinstance(rec.data.get("lr"), float):
        ctx["lr"] = rec.data["lr"]  # for context: was the learning rate just changed?
    ctx["model_checkpoint"] = checkpoint
    return Anomaly(detector=f.detector, signal=f.signal, job=rec.job, rank=rec.rank, event_time=rec.ts,
                   value=f.value, expected=f.expected, score=f.score, threshold=f.threshold,
                   severity=f.severity, message=f.message, context=ctx, source_file=rec.file,
                   source_offset=rec.offset)


def series(rec: Record) -> tuple[str, int | str | None]:
    """The series a metrics record belongs to: its job and rank, or, where no rank is known, its file. Files
    whose rank the parser cannot tell (a layout it does not know) would otherwise merge into one series that
    repeats every step once per file, and every rank's ordinary noise would look like a jump. A rank from
    torchrun's `--log-dir` layout is a local rank: each node's launcher has its own run folder, so the folder
    tells the nodes' rank 0s apart. A rotated file (`train.log.1`, `train.log.2.gz`) continues its live one."""
    if rec.rank is None:
        return (rec.job, f"file:{rotation_base(rec.file)}" if rec.file else None)
    run = torchrun_run_folder(rec.file)
    return (rec.job, rec.rank if run is None else f"{rec.rank}@{run}")


class MetricsHandler:
    """Stage 1 for the metrics family (step metrics and checkpoint announcements), keyed by job/rank."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.ranks: dict[tuple[str, int | str | None], RankMetricsDetector] = {}
        self.checkpoints: dict[tuple[str, int | str | None], str] = {}

    def process(self, records: list[Record]) -> tuple[list[Anomaly], list[Summary]]:
        out: list[Anomaly] = []
        summaries: list[Summary] = []
        for rec in records:
            try:
                if rec.kind == "metrics":
                    out.extend(self._metrics(rec, summaries))
                else:  # a pause announced: "Saving checkpoint to ...", an evaluation's results
                    if "checkpoint" in rec.data:
                        self.checkpoints[series(rec)] = str(rec.data["checkpoint"])
                    if self.ctx.wants("pause"):
                        what = f"checkpoint {rec.data['checkpoint']}" if "checkpoint" in rec.data else "evaluation"
                        pause: Summary = {"type": "pause", "job": rec.job, "ts": rec.ts, "what": what,
                                          "member": str(series(rec)[1])}
                        if isinstance(rec.data.get("checkpoint_step"), int):
                            pause["step"] = rec.data["checkpoint_step"]  # the save follows it, whatever ts says
                        summaries.append(pause)
                    if self.ctx.config.logkey_enabled and self.ctx.wants("log"):  # still a log line
                        summaries.append(log_summary(rec, self.ctx.config.logkey_max_msg_chars))
            except (TypeError, ValueError, KeyError) as exc:
                self.ctx.skip(rec, exc)
        return out, summaries

    def _metrics(self, rec: Record, summaries: list[Summary]) -> list[Anomaly]:
        key = series(rec)
        det = self.ranks.get(key)
        if det is None:
            det = self.ranks[key] = RankMetricsDetector(self.ctx.config)
        step = int(rec.data["step"])
        checkpoint = self.checkpoints.get(key)
        found = [anomaly_from(rec, f, checkpoint) for f in det.update(step, rec.data)]
        if not self.ctx.wants("step"):
            return found
        member = str(key[1])
        s: Summary = {"type": "step", "job": rec.job, "rank": rec.rank, "member": member, "ts": rec.ts,
                      "step": step, "file": rec.file, "offset": rec.offset}
        st, tput = rec.data.get("step_time_s"), rec.data.get("throughput")
        if isinstance(st, (int, float)) and math.isfinite(st):
            s["value"] = float(st)
        if isinstance(tput, (int, float)) and math.isfinite(tput):
            s["throughput"] = float(tput)  # with the step time: how slow each rank was (models/job_slowdown.py)
        if isinstance(rec.data.get("lr"), float):
            s["lr"] = rec.data["lr"]
        if rec.data.get("step_counted") is True:
            s["counted"] = True  # steps numbered by the file's record count: a save's named step is not one
        if checkpoint:
            s["model_checkpoint"] = checkpoint
        # a slowdown goes to the job's stage 2 first: on every rank at once, it is the job's, told once
        slow = [a for a in found if a.detector in SLOWDOWN_DETECTORS] if self.ctx.wants("slowdown") else []
        summaries.append(s)
        summaries.extend({"type": "slowdown", "job": rec.job, "member": member, "step": step, "ts": rec.ts,
                          "anomaly": anomaly_fields(a)} for a in slow)
        return [a for a in found if a not in slow]

    def save_state(self) -> dict[str, Any]:
        return {"ranks": [[job, rank, d.save_state()] for (job, rank), d in self.ranks.items()],
                "checkpoints": [[job, rank, path] for (job, rank), path in self.checkpoints.items()]}

    def load_state(self, state: dict[str, Any]) -> None:
        for job, rank, st in state.get("ranks", []):
            det = self.ranks[(job, rank)] = RankMetricsDetector(self.ctx.config)
            det.load_state(st)
        for job, rank, path in state.get("checkpoints", []):
            self.checkpoints[(job, rank)] = path


class StepStragglerJob:
    """Stage 2: a rank whose step time is far above its peers' at the same step (models/straggler.py)."""

    summary_types = ("step",)

    def __init__(self, job: str, ctx: StageContext) -> None:
        c = ctx.config
        self.job = job
        self.ctx = ctx
        self.detector: StepStragglerDetector[Summary] = StepStragglerDetector(
            StragglerConfig(ratio=c.straggler_ratio, k=c.straggler_k, min_ranks=c.straggler_min_ranks))

    def process(self, summaries: list[Summary]) -> list[Anomaly]:
        out: list[Anomaly] = []

        def take(s: Summary) -> None:
            if s.get("rank") is None or s.get("value") is None:
                return  # a record without a rank or a step time: progress for the slowdown stage only
            # a node's local rank in torchrun's --log-dir layout is not unique: the member (rank@run) is
            member = str(s.get("member", s["rank"]))
            int(s["rank"]), finite(s["ts"]), int(s.get("offset", -1))  # the anomaly's rank, event time, source
            out.extend(self._anomaly(f) for f in self.detector.add(member, int(s["step"]), finite(s["value"]), s))

        take_each(summaries, take, self.ctx.skip_summary)
        return out

    def _anomaly(self, f: StragglerFinding[Summary]) -> Anomaly:
        ref = f.ref
        rank = int(ref["rank"])
        msg = (f"rank {rank} took {f.value:.3g}s at step {f.step}, {f.value / f.median:.2f}x the median "
               f"{f.median:.3g}s of {f.ranks} ranks (threshold {f.threshold:.3g}s)")
        ctx = {"step": f.step, "ranks_compared": f.ranks, "model_checkpoint": ref.get("model_checkpoint")}
        if "lr" in ref:
            ctx["lr"] = ref["lr"]
        return Anomaly("straggler", "step_time_s", self.job, rank, float(ref["ts"]), f.value, f.median, f.score,
                       f.threshold, "critical" if f.value > 2 * f.median else "warning", msg, ctx,
                       source_file=str(ref.get("file", "")), source_offset=int(ref.get("offset", -1)))

    def tick(self, now: float) -> list[Anomaly]:
        return []

    def finish(self, wall: float | None = None) -> list[Anomaly]:
        return []

    def save_state(self) -> dict[str, Any]:
        return self.detector.save_state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.detector.load_state(state)


def _slowdown_anomaly(fields: dict[str, Any]) -> Anomaly:
    """A stage-1 slowdown finding from a summary, checked whole: it is released later, outside the summary's
    `take`, and must not fail then (processors/stages.py: take_each)."""
    a = Anomaly(**fields)
    if a.detector not in SLOWDOWN_DETECTORS:
        raise ValueError(f"not a slowdown: {a.detector}")
    if a.severity not in ("info", "warning", "critical") or not isinstance(a.message, str):
        raise ValueError(f"not a finding: severity {a.severity!r}")
    if not isinstance(a.context, dict) or not (a.rank is None or type(a.rank) is int):
        raise TypeError("context must be an object, rank an integer or null")
    finite(a.event_time)
    a.to_dict()  # serialisable as an anomaly record
    return a


def _candidate(member: str, step: int, ts: float, fields: dict[str, Any]) -> Candidate[Anomaly]:
    """A held slowdown finding, from a summary or a saved state."""
    a = _slowdown_anomaly(fields)
    return Candidate(member, step, ts, a.detector, finite(a.value), None if a.expected is None else finite(a.expected),
                     a, a.severity)


class SlowdownJob:
    """Stage 2: a step-time or throughput slowdown on most of a job's ranks is one job-wide finding (models/
    job_slowdown.py); one announced pause (a checkpoint, an evaluation) before it makes it `info`."""

    summary_types = ("step", "slowdown", "pause")

    def __init__(self, job: str, ctx: StageContext) -> None:
        c = ctx.config
        self.job = job
        self.ctx = ctx
        self.detector: JobSlowdown[Anomaly] = JobSlowdown(SlowdownConfig(
            c.slowdown_job_share, c.slowdown_job_min_ranks, c.slowdown_hold_s, c.pause_explains_s))
        self.clock = -math.inf  # offline: the latest event time seen; the stream judges on the job's clock

    def process(self, summaries: list[Summary]) -> list[Anomaly]:
        det = self.detector

        def take(s: Summary) -> None:
            t = s["type"]
            ts = finite(s["ts"])
            member = str(s["member"] if "member" in s else s["rank"])  # summaries of workers before members
            if t == "step":
                # auxiliary here (the step-time straggler counts a malformed value): left out, not an error
                values = {k: v for k, f in (("step_time", "value"), ("throughput", "throughput"))
                          if isinstance(v := s.get(f), (int, float)) and math.isfinite(v)}
                det.progress(member, int(s["step"]), ts, values, counted=s.get("counted") is True)
            elif t == "pause":
                step = s.get("step")
                det.announce(ts, str(s["what"]), member, None if step is None else int(step))
            else:
                det.add(_candidate(member, int(s["step"]), ts, s["anomaly"]))
            self.clock = max(self.clock, ts)

        take_each(summaries, take, self.ctx.skip_summary)
        return self._decide(self.clock if self.ctx.wall is None else -math.inf)

    def _decide(self, now: float) -> list[Anomaly]:
        jobs, ranks = self.detector.decide(now)
        return [self._explained(c) for c in ranks] + [self._anomaly(f) for f in jobs]

    @staticmethod
    def _explained(c: Candidate[Anomaly]) -> Anomaly:
        a = c.ref
        if c.pause:
            a.severity = "info"
            a.message += f"; the job paused for the {c.pause} it announced (expected)"
            a.context["pause"] = c.pause
        return a

    def _anomaly(self, f: JobFinding[Anomaly]) -> Anomaly:
        a = f.first.ref
        what, unit = ("step time", "s") if f.detector == "step_time" else ("throughput", "")
        usual = f" (usual {f.expected:.4g}{unit})" if f.expected is not None else ""
        msg = f"{what} {f.value:.4g}{unit} at step {f.step} on {len(f.members)} of {f.of} ranks{usual}: "
        if f.pause:
            msg += f"the job paused for the {f.pause} it announced (expected)"
        else:  # in synchronous training every rank waits for the slowest: a straggler finding names a cause
            msg += "a job-wide slowdown (a straggler finding, if any, names the rank the others wait for)"
        severity = "info" if f.pause else f.severity
        ctx = {**a.context, "step": f.step, "ranks_affected": len(f.members), "ranks_total": f.of,
               "ranks": [int(m) if m.lstrip("-").isdigit() else m for m in f.members[:16]], "pause": f.pause}
        return Anomaly(a.detector, a.signal, self.job, None, a.event_time, f.value, f.expected, a.score,
                       a.threshold, severity, msg, ctx, source_file=a.source_file, source_offset=a.source_offset)

    def tick(self, now: float) -> list[Anomaly]:
        return self._decide(now)

    def finish(self, wall: float | None = None) -> list[Anomaly]:
        return self._decide(math.inf)

    def save_state(self) -> dict[str, Any]:
        d = self.detector
        return {"history": {m: list(h) for m, h in d.history.items()}, "last_ts": d.last_ts,
                "levels": [[step, dets] for step, dets in d.levels.items()],
                "episodes": d.episodes, "pauses": d.pauses, "explained": d.explained,
                "job_steps": list(d.job_steps), "counted_steps": d.counted_steps, "absorbed": d.absorbed, "resumes": d.resumes, "flush": d.flush,
                "clock": self.clock if math.isfinite(self.clock) else None,
                "pending": [[c.member, c.step, c.ts, anomaly_fields(c.ref)] for cs in d.pending.values() for c in cs]}

    def load_state(self, state: dict[str, Any]) -> None:
        d = self.detector
        for m, steps in state.get("history", {}).items():
            d.history[str(m)] = deque((int(x) for x in steps), maxlen=d.history_len)
        d.last_ts = {str(m): float(t) for m, t in state.get("last_ts", {}).items()}
        d.levels = {int(step): {str(det): {str(m): float(v) for m, v in vals.items()} for det, vals in dets.items()}
                    for step, dets in state.get("levels", [])}
        d.episodes = [[str(det), int(step), [str(m) for m in members], None if usual is None else float(usual),
                       float(level), None if checked is None else float(checked)]
                      for det, step, members, usual, level, checked in state.get("episodes", [])]
        d.pauses = [[float(p[0]), str(p[1]), int(p[2]), None if len(p) < 4 or p[3] is None else int(p[3])]
                    for p in state.get("pauses", [])]
        d.explained = list(state.get("explained", []))
        d.job_steps.extend(int(x) for x in state.get("job_steps", []))
        d.counted_steps = bool(state.get("counted_steps", False))
        d.absorbed = int(state.get("absorbed", 0))
        d.resumes = int(state.get("resumes", 0))
        d.flush = bool(state.get("flush", False))
        if state.get("clock") is not None:
            self.clock = float(state["clock"])
        for member, step, ts, fields in state.get("pending", []):
            d.pending.setdefault(int(step), []).append(_candidate(str(member), int(step), float(ts), fields))
