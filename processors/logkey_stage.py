"""Log lines in the two stages: stage 1 forwards each line as a summary; stage 2 keeps one template vocabulary
per job and judges every rank's key sequence with DeepLog (models/logkeys.py).

Why the vocabulary lives in stage 2: a job's ranks land on many partitions and workers, and a key id must mean
the same on every rank. Stage 2 holds a job on exactly one worker (the job-keyed summaries topic), so one miner
sees all of a job's lines. New and changed templates are published to the log-keys topic (key job/template id,
compacted: the latest template per id), where users and `rankwatch deeplog train --from-topic` read them.

Order: template ids depend on the order in which a job's lines are mined. Summaries from different workers
arrive interleaved, so stage 2 re-establishes the order `rankwatch analyze` uses (event time, then rank, file,
offset): a line is released once every active rank's stream has passed its time, or after `logkey_reorder_s`
of wall time at most (a rank silent that long stops holding the others back). Ids and verdicts are therefore the
same whatever the number of workers, as long as no rank's lines reach stage 2 more than that late. Files at rest
(`analyze`, no arrival clock) come merged by event time: a line older than the newest one read is released.

Bootstrap: with no trained model, a job's first `deeplog_bootstrap_lines` lines (in that order) train its own
model, in a background thread (`deeplog_train_in_thread`), so the worker's event loop is never blocked by it.
Lines that arrive meanwhile are held (mined and published at once, judged when the model is ready), so which
lines the model judges never depends on how fast it trained: the stream and `analyze` agree. Memory is bounded
by `deeplog_hold_max` lines per job; past it the stage waits for the training (a replayed backlog, analyze).
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from rankwatch.models.logkeys import Finding, Line, LogKeyDetector
from rankwatch.models.templates import LogTemplateMiner
from rankwatch.processors.op_stage import DECIDED_STOPS, job_stop_fields
from rankwatch.processors.stages import MALFORMED, Summary, finite, take_each

from rankwatch.deeplog.model import UNK, DeepLog, Vocabulary, fit_windows, load_checkpoint
from rankwatch.records import Anomaly, Record

if TYPE_CHECKING:
    from rankwatch.processors.pipeline import StageContext

log = logging.getLogger("rankwatch.logkeys")

COLLECTING, TRAINING, READY = "collecting", "training", "ready"


def log_summary(rec: Record, max_chars: int) -> Summary:
    msg = rec.data.get("msg")
    if not isinstance(msg, str):
        msg = str(rec.data.get("raw", ""))
    return {"type": "log", "job": rec.job, "rank": rec.rank, "ts": rec.ts, "file": rec.file,
            "offset": rec.offset, "msg": msg[:max_chars]}


class LogHandler:
    """Stage 1 for the log family: each line becomes a compact summary for the job's stage 2."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def process(self, records: list[Record]) -> tuple[list[Anomaly], list[Summary]]:
        cfg = self.ctx.config
        if not (cfg.logkey_enabled and self.ctx.wants("log")):
            return [], []
        out: list[Summary] = []
        for rec in records:
            try:
                out.append(log_summary(rec, cfg.logkey_max_msg_chars))
            except (TypeError, ValueError) as exc:
                self.ctx.skip(rec, exc)
        return [], out

    def save_state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


class Reorder:
    """Releases a job's lines in (event time, rank, file, offset) order: a line goes once every rank heard from
    in the last `wait_s` (wall) has passed its time, or once it has waited `wait_s`. Nothing goes before the job
    has been heard from for `wait_s`: ranks whose lines reach another worker first are not yet known."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self.first_wall: float | None = None
        self.heap: list[tuple] = []
        self.rank_ts: dict[int, float] = {}
        self.rank_wall: dict[int, float] = {}
        self.arrivals: deque[tuple[float, float]] = deque()  # (wall, ts), arrival order
        self.seq = 0
        self.newest = -math.inf

    def push(self, s: Summary, wall: float | None) -> None:
        """`wall`: the stream's arrival time; None for files at rest, which arrive merged by event time."""
        ts = finite(s["ts"])
        rank = -1 if s.get("rank") is None else int(s["rank"])
        offset = int(s.get("offset", -1))
        self.seq += 1
        heapq.heappush(self.heap, (ts, rank, str(s.get("file", "")), offset, self.seq, s))
        if ts > self.rank_ts.get(rank, -math.inf):
            self.rank_ts[rank] = ts
        self.newest = max(self.newest, ts)
        if wall is None:
            return
        self.rank_wall[rank] = wall
        self.arrivals.append((wall, ts))
        if self.first_wall is None:
            self.first_wall = wall

    def release_merged(self) -> list[Summary]:
        """Files at rest (`analyze`): the lines come merged by event time, so every line older than the newest
        one is in its place. (The stream's rule waits for wall time: an analysis that reads a job's logs in
        seconds held every line until its end, all of them in memory, and then judged them in one batch.)"""
        heap = self.heap
        out = []
        while heap and heap[0][0] < self.newest:
            out.append(heapq.heappop(heap)[-1])
        return out

    def release(self, wall: float, flush: bool = False) -> list[Summary]:
        heap = self.heap
        if flush:
            out = [heapq.heappop(heap)[-1] for _ in range(len(heap))]
            self.arrivals.clear()
            return out
        if self.first_wall is None or wall - self.first_wall < self.wait_s:
            return []
        active = [ts for r, ts in self.rank_ts.items() if wall - self.rank_wall[r] < self.wait_s]
        below = min(active) if active else math.inf  # every active rank is past this time
        waited = -math.inf  # the latest time among lines that have waited long enough
        while self.arrivals and self.arrivals[0][0] <= wall - self.wait_s:
            waited = max(waited, self.arrivals.popleft()[1])
        out = []
        while heap and (heap[0][0] < below or heap[0][0] <= waited):
            out.append(heapq.heappop(heap)[-1])
        return out

    def __len__(self) -> int:
        return len(self.heap)


class BootstrapTraining:
    """Fits a job's own model on its first sequences, in a thread or inline."""

    def __init__(self, det: LogKeyDetector, in_thread: bool, seed: int = 0) -> None:
        windows, targets, weights, self.vocab = det.training_set()
        self.model: DeepLog = det.new_model(len(self.vocab), seed)
        self.error: BaseException | None = None
        self.loss = math.nan
        self.seconds = 0.0
        cfg = det.cfg
        self._args = (windows, targets, weights, cfg.deeplog_bootstrap_steps)
        self.thread = threading.Thread(target=self._run, name="deeplog-bootstrap", daemon=True) if in_thread \
            else None

    def start(self) -> BootstrapTraining:
        if self.thread is not None:
            self.thread.start()
        else:
            self._run()
        return self

    def _run(self) -> None:
        t0 = time.perf_counter()
        windows, targets, weights, steps = self._args
        try:
            self.loss = fit_windows(self.model, windows, targets, weights, steps=steps)
        except Exception as exc:  # noqa: BLE001 - reported by the stage; detection goes on by level
            self.error = exc
        self.seconds = time.perf_counter() - t0

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()


_LOADED: dict[tuple[str, int, int], tuple[DeepLog, Vocabulary]] = {}
_THREADS_SET = False


def _set_torch_threads(n: int) -> None:
    """Process-wide (torch has one intra-op pool): set once, by the first job that needs DeepLog."""
    global _THREADS_SET
    if n > 0 and not _THREADS_SET:
        import torch

        torch.set_num_threads(n)
        _THREADS_SET = True


def resolve_checkpoint(path: str) -> str | None:
    """A checkpoint file, or a folder's newest *.pt (what a training run keeps writing)."""
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".pt")]
        return max(files, key=os.path.getmtime) if files else None
    return path if os.path.isfile(path) else None


def load_model_file(path: str) -> tuple[DeepLog, Vocabulary, tuple[str, int, int]]:
    """Load once per file version; jobs share the (read-only, eval-mode) model."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key not in _LOADED:
        model, vocab, _ = load_checkpoint(path)
        if len(_LOADED) >= 4:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = (model, vocab)
    model, vocab = _LOADED[key]
    return model, vocab, key


class LogKeyJob:
    """Stage 2: one job's template vocabulary and DeepLog verdicts on every rank's key sequence."""

    summary_types = ("log", "job_stop")

    def __init__(self, job: str, ctx: StageContext) -> None:
        self.job = job
        self.ctx = ctx
        self.cfg = cfg = ctx.config
        _set_torch_threads(cfg.deeplog_threads)
        self.det = LogKeyDetector(cfg)
        self.reorder = Reorder(cfg.logkey_reorder_s)
        self.phase = COLLECTING
        self.training: BootstrapTraining | None = None
        self.held: list[Line] = []
        self.model_key: tuple[str, int, int] | None = None
        self.last_check = -math.inf
        self.published_templates = -1
        self.bootstrap_failed = False
        self.stops: list[float] = []  # when the job was stopped by decision (DECIDED_STOPS), latest 8
        if cfg.deeplog_model:
            self._check_model_file(time.monotonic(), first=True)

    # ---- the JobDetector interface ---------------------------------------------------------------------
    def process(self, summaries: list[Summary]) -> list[Anomaly]:
        at_rest = self.ctx.wall is None  # analyze: summaries merged by event time, no arrival clock
        wall = None if at_rest else time.monotonic()

        def take(s: Summary) -> None:
            if s.get("type") == "job_stop":
                try:
                    at, line = job_stop_fields(s)
                except MALFORMED:
                    return  # counted once, by CollectiveJob, which reads stops through the same function
                if line["reason"] in DECIDED_STOPS:  # after a failure, what ranks print may be news
                    self.stops = sorted({*self.stops, at})[-8:]
                return
            if not isinstance(s.get("msg"), str):
                raise TypeError(f"log summary without a message: {s.get('msg')!r}")
            self.reorder.push(s, wall)  # reads every field before it changes anything

        take_each(summaries, take, self.ctx.skip_summary)
        return self._advance(self.reorder.release_merged() if wall is None else self.reorder.release(wall))

    def tick(self, now: float) -> list[Anomaly]:
        wall = time.monotonic()
        if self.cfg.deeplog_model:
            self._check_model_file(wall)
        return self._advance(self.reorder.release(wall))

    def finish(self, wall: float | None = None) -> list[Anomaly]:
        out = self._advance(self.reorder.release(time.monotonic(), flush=True))
        if self.phase == TRAINING and self.training is not None:
            self.training.wait()
            out.extend(self._anomaly(f) for f in self._poll_training())
        return out

    # ---- flow ---------------------------------------------------------------------------------------------
    def _advance(self, released: list[Summary]) -> list[Anomaly]:
        found: list[Finding] = []
        found.extend(self._poll_training())
        ready: list[Line] = []
        for s in released:
            tid, change = self.det.mine(s["msg"])
            if change != "none":
                self._publish_template(tid, change, s)
            line = Line(s.get("rank"), float(s["ts"]), tid, s)
            if self.phase == READY:
                ready.append(line)
            elif self.phase == TRAINING:
                self.held.append(line)
                if len(self.held) > self.cfg.deeplog_hold_max:
                    self.training.wait()  # type: ignore[union-attr]  # bounded: one bootstrap fit
                    found.extend(self._poll_training())
            else:
                f = self.det.collect(line, learn=not self.bootstrap_failed)
                if f is not None:
                    found.append(f)
                if not self.bootstrap_failed and self.det.collected >= self.cfg.deeplog_bootstrap_lines:
                    self._start_training()
                    found.extend(self._poll_training())  # done already when trained inline
        if ready:
            found.extend(self.det.judge(ready))
        if len(self.det.miner) != self.published_templates:
            self._set_gauges()
        return [self._anomaly(f) for f in found]

    def _start_training(self) -> None:
        self.training = BootstrapTraining(self.det, self.cfg.deeplog_train_in_thread).start()
        self.phase = TRAINING

    def _poll_training(self) -> list[Finding]:
        t = self.training
        if self.phase != TRAINING or t is None or not t.done():
            return []
        self.training = None
        if t.error is not None:
            log.error("job %s: bootstrap training failed (%r); judging log keys by level only", self.job,
                      t.error)
            self.phase = COLLECTING
            self.bootstrap_failed = True  # not retried on the same data
            self.det.pairs.clear()
            held, self.held = self.held, []
            return [f for f in (self.det.collect(line, learn=False) for line in held) if f is not None]
        log.info("job %s: bootstrapped a DeepLog model on %d lines (%d keys) in %.1f s, loss %.3f", self.job,
                 self.det.collected, len(t.vocab) - 2, t.seconds, t.loss)
        self.det.install_model(t.model, t.vocab, "bootstrap")
        self.det.pairs.clear()
        self.phase = READY
        self._set_gauges()
        held, self.held = self.held, []
        return self.det.judge(held) if held else []

    def _check_model_file(self, wall: float, first: bool = False) -> None:
        if wall - self.last_check < self.cfg.deeplog_reload_check_s and not first:
            return
        self.last_check = wall
        path = resolve_checkpoint(str(self.cfg.deeplog_model))
        if path is None:
            if first:
                log.warning("job %s: no DeepLog checkpoint at %s yet; bootstrapping", self.job,
                            self.cfg.deeplog_model)
            return
        try:
            st = os.stat(path)
            if self.model_key == (os.path.abspath(path), st.st_mtime_ns, st.st_size):
                return
            model, vocab, key = load_model_file(path)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            log.warning("job %s: cannot load DeepLog checkpoint %s: %s", self.job, path, exc)
            return
        if self.model_key is None and vocab.miner and len(self.det.miner) == 0:
            # the model's keys are its training miner's ids: start this job's vocabulary from that miner
            self.det.miner = LogTemplateMiner.from_state(vocab.miner)
        elif self.model_key is None and vocab.templates and len(self.det.miner) == 0:
            self.det.miner.seed({int(k): t for k, t in vocab.templates.items() if k.lstrip("-").isdigit()})
        self.det.refresh_levels()
        self.model_key = key
        self.det.install_model(model, vocab, f"checkpoint:{path}")
        log.info("job %s: using DeepLog checkpoint %s (%d keys)", self.job, path, len(vocab) - 2)
        if self.phase != READY:
            self.training = None  # a bootstrap still running is no longer needed
            self.phase = READY
            self.det.pairs.clear()
        self._set_gauges()

    # ---- outputs ----------------------------------------------------------------------------------------
    def _publish_template(self, tid: int, change: str, s: Summary) -> None:
        det = self.det
        self.ctx.outbox.put("logkey", f"{self.job}/{tid}", {
            "schema": "rankwatch.logkey/v1", "job": self.job, "template_id": tid,
            "template": det.miner.template(tid), "change": change, "level": det.level(tid),
            "count": det.miner.size(tid), "ts": s["ts"], "rank": s.get("rank"), "file": s.get("file", ""),
            "offset": s.get("offset", -1), "known_to_model": det.model is not None and det.index(tid) != UNK})

    def _set_gauges(self) -> None:
        g, job = self.ctx.gauges, (self.job,)
        n = len(self.det.miner)
        self.published_templates = n
        g.set("rankwatch_log_templates", job, n)
        g.set("rankwatch_log_templates_unknown", job, self.det.unknown_templates() if self.det.model else n)
        g.set("rankwatch_deeplog_model_ready", job, 1.0 if self.phase == READY and self.det.model else 0.0)

    def _anomaly(self, f: Finding) -> Anomaly:
        det, s, g = self.det, f.line.ref, self.cfg.deeplog_top_g
        tid = f.line.tid
        template = det.miner.template(tid)
        ctx: dict[str, Any] = {
            "key": tid, "template": template, "level": f.level, "reason": f.reason,
            "line": str(s.get("msg", ""))[:500], "window": f.window, "top_g": g,
            "predicted": [{"key": t, "template": det.miner.template(t), "p": round(p, 6)} for t, p in f.top],
            "model": det.model_source or "none (bootstrapping: judged by level)",
            "model_version": det.model_version, "escalation": f.escalation,
        }
        who = f"rank {f.line.rank}" if f.line.rank is not None else "a process"
        if f.reason == "new_key":
            msg = f"{who} logged a new {f.level or ''} log key {tid}: {template[:200]}"
        elif f.reason == "new_key_flood":
            msg = (f"{who} logged a never-seen warning {self.cfg.logkey_flood_lines} times within "
                   f"{self.cfg.logkey_flood_window_s:g}s (key {tid}): {template[:200]}")
        else:
            msg = (f"{who} logged key {tid} outside the top-{g} predictions (p={f.prob:.2g}, ranked "
                   f"{f.key_rank}): {template[:200]}")
        severity = f.severity
        stop = self._stopped_before(f.line.ts)
        if stop is not None:  # a job being torn down prints what it never printed (the launcher's Traceback)
            severity, ctx["job_stopped_at"] = "info", stop
            msg += " (while the job was being stopped)"
        return Anomaly("deeplog", "log_key", self.job, f.line.rank, f.line.ts, value=f.prob,
                       expected=f.top[0][1] if f.top else None,
                       score=None if f.key_rank is None else float(f.key_rank),
                       threshold=None if f.reason != "unexpected_key" else float(g), severity=severity,
                       message=" ".join(msg.split()), context=ctx, source_file=str(s.get("file", "")),
                       source_offset=int(s.get("offset", -1)))

    def _stopped_before(self, ts: float) -> float | None:
        """The decided stop (`DECIDED_STOPS`) whose teardown a line at `ts` belongs to: from the stop's time
        (Slurm's banner has whole seconds, so the same second counts) to `stop_grace_s` after it (SIGTERM
        handlers, the scheduler's kill wait), as for hangs (models/hangs.py). Not before it: a rank's crash
        makes srun cancel the step a second or two later, and that crash is the finding."""
        grace = self.cfg.stop_grace_s
        return next((t for t in reversed(self.stops) if t <= ts <= t + grace), None)

    # ---- persistence -------------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        pending = [item[-1] for item in sorted(self.reorder.heap)]
        return {"detector": self.det.save_state(), "phase": self.phase, "stops": self.stops,
                "held": [[ln.ref, ln.tid] for ln in self.held], "pending": pending,
                "model_key": list(self.model_key) if self.model_key else None}

    def load_state(self, state: dict[str, Any]) -> None:
        self.det.load_state(state["detector"])
        self.held = [Line(s.get("rank"), float(s["ts"]), int(tid), s) for s, tid in state.get("held", [])]
        wall = time.monotonic()
        for s in state.get("pending", []):
            self.reorder.push(s, wall)
        self.model_key = tuple(state["model_key"]) if state.get("model_key") else None  # type: ignore[assignment]
        self.stops = [float(t) for t in state.get("stops", [])]
        phase = state.get("phase", COLLECTING)
        if phase == TRAINING:  # the fit did not survive the restart: run it again on the same pairs
            self._start_training()
        else:
            self.phase = READY if self.det.model is not None else COLLECTING
        self._set_gauges()
