"""Collective ops, stage 2 (stage 1, per rank/stream, is processors/op_stage.py).

Stage 2, per job (`CollectiveJob`): lateness per (comm, opCount), stragglers (models/collective.py), hangs
(models/hangs.py), and the victim test: an op-timing candidate on a rank that was not late itself while another
rank was late by a comparable amount, just before, is a victim waiting at the collective; it is counted, not
reported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rankwatch.models.collective import CollectiveConfig, CollectiveTracker, StragglerEvent
from rankwatch.models.gpu_release import GpuRelease
from rankwatch.models.hangs import HangEvent
from rankwatch.processors.memory_stage import gpu_fields, gpu_mem_fields
from rankwatch.processors.op_refs import RecentRefs
from rankwatch.processors.op_stage import _OP_DEFAULTS, OP_COLUMNS, _checked_columns, job_stop_fields
from rankwatch.processors.stages import MALFORMED, Summary, finite, take_each

from rankwatch.records import Anomaly

if TYPE_CHECKING:
    from rankwatch.processors.pipeline import StageContext

HANG_GAUGE = "rankwatch_hang_active"
_PAUSE_X = 10.0  # the comm's gap at an op this many times a rank's predicted interval: every rank paused there
_PAUSE_SPREAD = 3.0  # ... and within such a pause, a rank's interval up to this times the comm's gap is the pause
STRAGGLER_GAUGE = "rankwatch_straggler_lag_seconds"


class CollectiveJob:
    """Stage 2 for one job: lateness, stragglers, hangs, and the victim test for op-timing candidates."""

    summary_types = ("ops", "op", "op_flag", "nccl_init", "nccl_timeout", "job_stop", "gpu_mem", "gpu_exit")

    def __init__(self, job: str, ctx: StageContext) -> None:
        self.job = job
        self.ctx = ctx
        self.config: CollectiveConfig = ctx.config
        self.tracker = CollectiveTracker(ctx.config)
        self.comm_ids: dict[tuple[int, str], str] = {}  # (rank, comm pointer) -> shared identity
        self.signatures: dict[tuple[int, str], str] = {}  # fallback identity when no init line was seen
        self.incarnations: dict[tuple[int, str], int] = {}  # (rank, signature) -> its latest incarnation
        self.sig_last: dict[tuple[int, str], int] = {}  # (rank, comm pointer) -> its latest opCount (signatures)
        self.last_ref: dict[int, tuple[str, int]] = {}  # rank -> (file, offset) of its latest op
        self.heard: dict[int, float] = {}  # stream: rank -> wall time its latest op summary arrived
        self.refs = RecentRefs()  # (comm, op, rank) -> line
        self.held: list[dict[str, Any]] = []  # op-timing candidates waiting for the cross-rank view
        self.evidence: list[Summary] = []  # watchdog timeouts waiting for the cross-rank view
        self.clock = float("-inf")  # latest op time seen (a partition ahead of others can push it early)
        self.judged_at = float("-inf")  # the job clock of the last tick (processors/stages.py)
        self.victims = 0
        self.gauge_rank: int | None = None  # the straggler the job's gauge series names
        self.paused = 0  # op-timing candidates explained by a pause of every rank
        self.stop_lines: dict[float, dict[str, Any]] = {}  # the lines that said the job was stopped, by time
        self.gpus = GpuRelease()  # the job's GPUs: all released together is a stop too
        self.gpu_pending = False  # a GPU release to check (arrived, or waiting for a hang to end)
        ctx.gauges.set(HANG_GAUGE, (job,), 0)

    # ---- input ------------------------------------------------------------------------------------------
    def process(self, summaries: list[Summary]) -> list[Anomaly]:
        out: list[Anomaly] = []
        take_each(summaries, self._take, self.ctx.skip_summary)
        self._gpu_stop()
        # ops are judged at ticks, behind the job's clock (see CollectiveTracker.judge)
        out.extend(self._release(self.judged_at))
        return out

    def _take(self, s: Summary) -> None:
        """One summary; a malformed one raises before it changes anything (process counts it)."""
        t = s.get("type")
        if t == "op":  # one op per summary (a worker before columns): its one row
            s = {k: [s.get(k, self.clock if k == "ts" else _OP_DEFAULTS.get(k))] for k in OP_COLUMNS}
            t = "ops"
        if t == "gpu_mem":  # (GPU samples are not the ops' clock)
            try:
                gpu, ts, rank, _, share = gpu_mem_fields(s)
            except MALFORMED:
                return  # counted once, by GpuImbalanceJob, which checks it with the same function
            self.gpus.in_use(gpu, ts, rank, share=share)
            return
        if t == "gpu_exit":
            ref = (str(s.get("file", "")), int(s.get("offset", -1)))
            self.gpus.exited(*gpu_fields(s), ref=ref)
            self.gpu_pending = True
            return
        if t == "ops":
            cols = _checked_columns(s)
            when = max(cols["ts"], default=None)
            self._ops(cols)
        else:
            # (read before anything changes; a stop's time may be an upper bound, `written_by`: not the clock's)
            when = None if s.get("ts") is None or t == "job_stop" else finite(s["ts"])
            if t == "op_flag":
                held = {"anomaly": s["anomaly"], "comm": self._comm(s, int(s["rank"])), "n": int(s["n"])}
                if self.ctx.wall is not None:
                    held["since"] = self.ctx.wall
                self.held.append(held)
            elif t == "nccl_init" and s.get("comm_id"):
                self.comm_ids[(int(s["rank"]), str(s["ptr"]))] = f"id:{s['comm_id']}"
            elif t == "nccl_timeout":  # judged once the job's clock is past it: the ops before it are all in
                self.evidence.append({**s, "ts": finite(s["ts"]), "offset": int(s.get("offset", -1))})
            elif t == "job_stop":
                self._stop(*job_stop_fields(s))
        if when is not None:
            self.clock = max(self.clock, when)

    def _stop(self, at: float, line: dict[str, Any]) -> None:
        self.stop_lines.setdefault(at, line)  # (the first line of a moment: Slurm's banner, then srun's)
        self.tracker.stop(at)
        self.stop_lines = {k: v for k, v in self.stop_lines.items() if k in self.tracker.stops}

    def _gpu_stop(self) -> None:
        """All of the job's GPUs released their memory (models/gpu_release.py): together, the job was stopped,
        as a scheduler's line would say; one by one (a crash, then the others' watchdog), it ends an open hang
        but excuses none. A release waits (`gpu_pending`) while it is not yet a stop and new processes do not
        hold the GPUs: checked when a release arrives and, while one waits, at every tick."""
        if not self.gpu_pending:
            return
        rel = self.gpus.stop(self.last_ref.keys())  # (the ranks with ops)
        if rel is None or not (rel.together or self.tracker.hang is not None):
            # all released, but not a stop yet: the ops' view of the job (a worker reads the GPU topic ahead
            # of the op topic), or the hang a spread-out release ends, may come later
            self.gpu_pending = self.gpus.released()
            return
        self.gpu_pending = False
        self.gpus.declare(rel.at)
        self._stop(rel.at, {"by": None, "reason": f"all {rel.gpus} of its GPUs released their memory",
                            "file": rel.ref[0], "offset": rel.ref[1]})

    def _ops(self, s: Summary) -> None:
        """A batch's ops, as checked columns (`_checked_columns`): nothing here raises."""
        ranks, ts, comms, ptrs, ns, ops, nranks, counts, files, offsets = (s[k] for k in OP_COLUMNS)
        for i, comm in enumerate(comms):
            if not comm:  # a per-process pointer: resolved here, where every rank's init lines arrive
                comms[i] = self._shared(ranks[i], str(ptrs[i]), nranks[i], ops[i], counts[i], ns[i])
        add = self.tracker.add
        for rank, t, comm, n, op, size in zip(ranks, ts, comms, ns, ops, nranks, strict=True):
            add(comm, rank, n, t, op, int(size) if isinstance(size, (int, float)) else 0)
        # the source line of each op (a finding names it), and each rank's latest, in bulk
        self.refs.add(comms, ns, ranks, files, offsets)
        self.last_ref.update(zip(ranks, zip(files, offsets, strict=True), strict=True))
        if self.ctx.wall is not None:  # the stream: when each rank was last heard of
            self.heard.update(dict.fromkeys(ranks, self.ctx.wall))

    def _comm(self, s: Summary, rank: int) -> str:
        if s.get("comm"):
            return str(s["comm"])
        return self._shared(rank, str(s.get("ptr", "")), s.get("nranks"), s.get("op"), s.get("count"))

    def _shared(self, rank: int, ptr: str, nranks: Any, op: Any, count: Any, n: int | None = None) -> str:
        """The identity every rank shares of this rank's comm pointer: from its init line, else a signature:
        ranks create communicators in the same program order, so the k-th comm of a rank with a given size and
        first op is the k-th of every rank. A restarted process (an elastic restart, a requeued job) creates
        them again, with opCounts from 0: a new pointer, or the same one if the allocator repeats itself (then
        `n`, the op's count, going back tells), so the k-th such comm is a new incarnation, not the old comm
        going back thousands of ops."""
        key = (rank, ptr)
        known = self.comm_ids.get(key)
        if known:
            return known
        sig = self.signatures.get(key)
        if sig is None or (n is not None and n < self.sig_last.get(key, -1)):
            base = f"sig:n{nranks}:{op}:{count}"
            k = self.incarnations[(rank, base)] = self.incarnations.get((rank, base), -1) + 1
            sig = self.signatures[key] = f"{base}#{k}" if k else base
        if n is not None:
            self.sig_last[key] = n
        return sig

    # ---- judgement -------------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Anomaly]:
        self.judged_at = max(self.judged_at, now)
        out = self._judge(now)
        out.extend(self._release(now))
        # stream: ranks arrive in no order, and a watchdog line is a rare log line that can overtake the job's
        # backlog of ops; it waits until the job's ops have stopped arriving (in a hang they have)
        wall = self.ctx.wall
        quiet = wall is None or wall - max(self.heard.values(), default=wall) >= self.config.victim_wait_s
        ripe = [e for e in self.evidence if float(e["ts"]) + self.config.victim_hold_s <= now and quiet]
        if ripe:  # the lines of one timeout together: which rank reported the lowest op is the point
            for ev in ripe:
                self.evidence.remove(ev)
            fields = ("rank", "pg", "seq_num", "reached", "op_type", "timeout_ms", "ran_for_ms", "kind")
            h = self.tracker.hang_from_evidence([{k: ev.get(k) for k in fields if ev.get(k) is not None}
                                                 for ev in ripe], max(float(ev["ts"]) for ev in ripe))
            if h is not None:
                out.append(self._hang_anomaly(h, (str(ripe[0].get("file", "")), int(ripe[0].get("offset", -1)))))
        self._gpu_stop()  # a release waiting for a hang (applied before the hang is judged: it may end it)
        h = self.tracker.check_hang(now, lambda r: wall is None or wall - self.heard.get(r, wall) >=
                                    self.config.hang_quiet_s)
        if h is not None:
            out.append(self._hang_anomaly(h))
        return out

    def finish(self, wall: float | None = None) -> list[Anomaly]:
        end = max(self.clock, self.judged_at, *(float(e["ts"]) + self.config.victim_hold_s for e in self.evidence))
        out = self.tick(end)
        out.extend(self._release(float("inf")))
        # A hang whose logs just end (no watchdog line, no later line) is silent past their end till now, if the
        # logs are all there is: judged as the stream would have judged it, `hang_min_s` and more after the end.
        if wall is not None and wall > end and self.tracker.hang is None:
            last_op = max((t for c in self.tracker.comms.values() for _, t, _ in c.last.values()), default=end)
            h = self.tracker.check_hang(wall, logs_end=(end, last_op))
            if h is not None:
                out.append(self._hang_anomaly(h))
        return out

    def _judge(self, now: float) -> list[Anomaly]:
        out = []
        events, ended = self.tracker.judge(now)
        for ev in events:
            out.append(self._straggler_anomaly(ev))
        if self.gauge_rank in ended:  # show the next-worst straggler still going, if any
            self.ctx.gauges.remove(STRAGGLER_GAUGE, (self.job, str(self.gauge_rank)))
            self.gauge_rank = None
            eps = self.tracker.episodes
            if eps:
                worst = max(eps, key=lambda r: eps[r]["max_lag"])
                self._show_straggler(worst, eps[worst]["max_lag"])
        return out

    def _show_straggler(self, rank: int, lag: float) -> None:
        """One series per job (bounded cardinality): the rank holding the job back most, with its lag."""
        if self.gauge_rank is not None and self.gauge_rank != rank:
            shown = self.tracker.episodes.get(self.gauge_rank)
            if shown is not None and shown["max_lag"] > lag:
                return
            self.ctx.gauges.remove(STRAGGLER_GAUGE, (self.job, str(self.gauge_rank)))
        self.gauge_rank = rank
        self.ctx.gauges.set(STRAGGLER_GAUGE, (self.job, str(rank)), lag)

    def _release(self, now: float) -> list[Anomaly]:
        """Candidates whose op the cross-rank view has judged (or whose hold expired): a rank that only paused
        with all the others, or waited for a late peer, is not reported; the rest are."""
        out, keep = [], []
        for h in self.held:
            a = h["anomaly"]
            t = float(a["event_time"])
            if not self._ripe(h, t, now):
                keep.append(h)
                continue
            actual, predicted = float(a["value"] or 0.0), float(a["expected"] or 0.0)
            common = self.tracker.common_gap(h["comm"], h["n"])
            # a pause of every rank (a checkpoint, an evaluation): ranks come out of it spread in proportion to
            # its length (their own I/O: checkpoint shards), so within one a rank is slow only past 3x the comm's gap
            paused = common is not None and (actual <= self.config.op_min_ratio * common or (
                common >= _PAUSE_X * predicted and actual <= _PAUSE_SPREAD * common))
            if paused:
                self.paused += 1
                continue
            late = self.tracker.late_near(t - actual - 0.5, t + 0.5)
            own = late.get(a["rank"], 0.0)
            excess = actual - predicted
            waited_for = {r: lag for r, lag in late.items() if r != a["rank"] and lag >= 0.5 * excess}
            # or it was early at the op before, and waited for the pack's last rank (no rank need be late: a
            # blind test's healthy runs raised 15 findings per 1,000 steps on the post-sync all-reduce, each on
            # the rank that had been 40-90 ms ahead)
            behind = self.tracker.behind_last(h["comm"], h["n"] - 1, t - actual)
            if own == 0.0 and (waited_for or (behind is not None and behind >= 0.5 * excess)):
                self.victims += 1
                continue
            if own:
                a["context"]["late_by_s"] = own
            if common is not None:
                a["context"]["peers_gap_s"] = common
            out.append(Anomaly(**a))
        self.held = keep
        return out

    def _ripe(self, h: dict[str, Any], t: float, now: float) -> bool:
        """May a held finding be judged? When the job's clock is past it by the hold and every rank of its comm
        has enqueued its op (ranks arrive through different partitions and workers, in no order). A rank that
        never comes (gone, hung) must not hold it forever: offline, the clock being well past it ends the wait;
        in the stream, `victim_wait_s` of wall time since it arrived."""
        if t + self.config.victim_hold_s > now:
            return False
        if self.tracker.judged(h["comm"], h["n"], complete=True):
            return True
        wall = self.ctx.wall
        if wall is None:
            return t + 5 * self.config.op_stale_s <= now
        return wall - h.setdefault("since", wall) >= self.config.victim_wait_s

    # ---- anomalies -------------------------------------------------------------------------------------
    def _straggler_anomaly(self, ev: StragglerEvent) -> Anomaly:
        self._show_straggler(ev.rank, ev.lag)
        # everyone on every comm it is late on waits for it (data- and tensor-parallel peers alike)
        waiting = {r for c in self.tracker.comms.values() if any(c.verdicts.get(ev.rank, ())) for r in c.last}
        ev.peers = len(waiting - {ev.rank})
        # the late op that decided it: the same line (and id) whatever the batching or the worker
        file, offset = self.refs.get((ev.comm, ev.op_count, ev.rank), self.last_ref.get(ev.rank, ("", -1)))
        msg = (f"rank {ev.rank} enqueues collectives {ev.lag:.3g}s after the median rank: late on {ev.late_ops} of "
               f"the last {ev.window} ops of comm {ev.comm}; {ev.peers} peers wait for it")
        ctx = {"lag_s": ev.lag, "late_ops": ev.late_ops, "window": ev.window, "comm": ev.comm,
               "op_count": ev.op_count, "peers_waiting": ev.peers, "update": not ev.first,
               "victims_suppressed": self.victims}
        return Anomaly("straggler", "collective_enqueue", self.job, ev.rank, ev.ts, ev.lag, 0.0, None,
                       self.config.straggler_min_lag_s, "critical" if ev.lag >= 1.0 else "warning", msg, ctx,
                       source_file=file, source_offset=offset)

    def _hang_anomaly(self, h: HangEvent, ref: tuple[str, int] | None = None) -> Anomaly:
        """`ref`: the line it points at; by default the stop's line for an ended hang, else the latest op of
        the lowest stalled rank."""
        self.ctx.gauges.set(HANG_GAUGE, (self.job,), 1 if h.kind == "hang" else 0)
        stalled = sorted(h.stalled)
        stop = self.stop_lines.get(h.stopped_at or 0.0, {}) if h.kind == "ended" else {}
        if ref is None:
            ref = ((stop.get("file", ""), stop.get("offset", -1)) if h.kind == "ended"
                   else self.last_ref.get(min(h.stalled, default=-1), ("", -1)))
        if h.kind == "resolved" and h.moved_on:
            msg = (f"hang on comm {h.comm} resolved: rank(s) {stalled} went on with other communicators' ops (the "
                   f"job restarted, or re-created its communicators)")
            severity = "info"
        elif h.kind == "resolved":
            msg = f"hang on comm {h.comm} resolved: progress resumed past opCount {h.op_count}"
            severity = "info"
        elif h.kind == "ended":
            by = " by ".join(str(x) for x in (stop.get("reason"), stop.get("by")) if x)
            msg = (f"hang on comm {h.comm} ended: the job was stopped ({by or 'its launcher said so'}) "
                   f"{h.silent_s:.0f}s after rank(s) {stalled} fell short of opCount {h.op_count}")
            severity = "info"
        elif stalled and h.from_watchdog:
            waiting = sorted({e["rank"] for e in h.evidence if isinstance(e.get("rank"), int)} - set(stalled))
            msg = (f"hang: PyTorch watchdog timeouts on {len(waiting)} rank(s) waiting in {h.op or 'collective'} "
                   f"#{h.op_count} of {h.comm}; rank(s) {stalled} never enqueued it")
            severity = "critical"
        elif stalled and h.end_of_logs:
            msg = (f"hang at the end of the logs: rank(s) {stalled} never reached {h.op or 'op'} opCount "
                   f"{h.op_count} of comm {h.comm}, which the others enqueued and waited in; no progress in "
                   f"the {h.silent_s:.0f}s since, as far as the logs tell (or the job was stopped mid-collective)")
            severity = "critical"
        elif stalled:
            msg = (f"hang: comm {h.comm} has not advanced for {h.silent_s:.0f}s (threshold {h.threshold_s:.0f}s); "
                   f"rank(s) {stalled} never reached {h.op or 'op'} opCount {h.op_count} that the others are "
                   f"stuck in")
            severity = "critical"
        else:
            msg = f"hang: PyTorch watchdog timeout ({h.evidence[-1] if h.evidence else ''})"
            severity = "critical"
        ctx = {"stalled_ranks": stalled, "last_op_count": {str(r): n for r, n in h.stalled.items()},
               "op": h.op, "op_count": h.op_count, "comm": h.comm, "silent_s": h.silent_s,
               "threshold_s": h.threshold_s, "evidence": h.evidence[-8:], "end_of_logs": h.end_of_logs}
        if h.kind == "ended":
            ctx["stopped_by"] = {k: v for k, v in stop.items() if k in ("by", "reason")}
        return Anomaly("hang", "collective_progress", self.job, stalled[0] if len(stalled) == 1 else None, h.ts,
                       h.silent_s, None, None, h.threshold_s, severity, msg, ctx, source_file=ref[0],
                       source_offset=ref[1])

    # ---- persistence -----------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return {"tracker": self.tracker.save_state(),
                "comm_ids": [[r, p, c] for (r, p), c in self.comm_ids.items()],
                "signatures": [[r, p, c] for (r, p), c in self.signatures.items()],
                "incarnations": [[r, b, k] for (r, b), k in self.incarnations.items()],
                "sig_last": [[r, p, n] for (r, p), n in self.sig_last.items()],
                "last_ref": {str(r): list(v) for r, v in self.last_ref.items()}, "held": self.held,
                "refs": self.refs.rows(4096),
                "evidence": self.evidence,
                "clock": self.clock if self.clock != float("-inf") else None, "victims": self.victims,
                "paused": self.paused, "stop_lines": [[t, line] for t, line in self.stop_lines.items()],
                "gpus": self.gpus.save_state(), "gpu_pending": self.gpu_pending}

    def load_state(self, state: dict[str, Any]) -> None:
        self.tracker.load_state(state.get("tracker", {}))
        self.comm_ids = {(int(r), str(p)): c for r, p, c in state.get("comm_ids", [])}
        self.signatures = {(int(r), str(p)): c for r, p, c in state.get("signatures", [])}
        self.incarnations = {(int(r), str(b)): int(k) for r, b, k in state.get("incarnations", [])}
        self.sig_last = {(int(r), str(p)): int(n) for r, p, n in state.get("sig_last", [])}
        self.last_ref = {int(r): (str(v[0]), int(v[1])) for r, v in state.get("last_ref", {}).items()}
        self.held = list(state.get("held", []))
        self.refs = RecentRefs.from_rows(state.get("refs", []))
        self.evidence = list(state.get("evidence", []))
        if state.get("clock") is not None:
            self.clock = float(state["clock"])
        self.victims = int(state.get("victims", 0))
        self.paused = int(state.get("paused", 0))
        self.stop_lines = {float(t): dict(line) for t, line in state.get("stop_lines", [])}
        self.gpus.load_state(state.get("gpus") or {})
        self.gpu_pending = bool(state.get("gpu_pending", False))
        self.ctx.gauges.set(HANG_GAUGE, (self.job,), 1 if self.tracker.hang else 0)


__all__ = ["CollectiveJob", "CollectiveConfig", "HANG_GAUGE", "STRAGGLER_GAUGE"]
