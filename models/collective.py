"""Cross-rank collective timing of one job (stage 2): who enqueues late, which comm stopped, who is a victim.

Input: per op, (rank, communicator identity, opCount, enqueue time). NCCL's opCount of a communicator is the
same collective on every rank of it, so the enqueue times of (comm, opCount) are directly comparable.

- **Lateness.** An op is judged when every rank seen on its comm has enqueued it, or, once more than half have,
  `op_stale_s` after its first enqueue; decisions are taken once the job's clock is past them, in event-time
  order over all comms, so the stream and an offline run give the same findings. A rank is late on it when it enqueued more than max(k x the comm's usual
  spread, `straggler_min_lag_s`) after the median rank (of a pair, the earlier one); the spread is a robust scale of recent offsets, learned
  without the late ones. Ranks reach stage 2 through different partitions and workers, in no global order: a
  rank whose report arrives after its op was judged is judged against that op's stored median and limit.
- **Straggler**: late in >= `straggler_min_late` of its last `straggler_window` ops on a comm. Victims wait
  for it at the collective, so their intervals grow too, but they are never late: lateness tells them apart.
- **Hang**: a comm whose opCount stopped advancing for max(`hang_min_s`, `hang_factor` x its usual longest gap
  between advances) while some ranks never reached the op the others are stuck in: those are the stalled
  ranks. A pause in which every rank stopped at the same op (evaluation, checkpointing, the end of the job) is
  not a hang. PyTorch's watchdog lines, when they come, are further evidence (and raise a hang on their own if
  the op view has none).
No I/O; plain data; JSON state.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_OP, _LATE = 0, 1  # what `judge` decides at a moment: an op, or one late report of an op already judged


@dataclass
class CollectiveConfig:
    straggler_window: int = 10  # a comm's last judged ops considered
    straggler_min_late: int = 6  # late in at least this many of them
    straggler_spread_k: float = 6.0  # late: behind the median rank by > k x the comm's usual spread ...
    straggler_min_lag_s: float = 0.05  # ... and by at least this (hosts' clocks must agree better than this)
    straggler_report_s: float = 60.0  # while an episode lasts, an updated finding at most this often
    op_stale_s: float = 5.0  # an op not enqueued by every known rank after this long is judged without them
    victim_hold_s: float = 0.5  # an op-timing finding is judged once the job's clock is this far past it ...
    victim_wait_s: float = 30.0  # ... and its op is in from every rank, or (stream) after this much wall time
    hang_factor: float = 10.0
    hang_min_s: float = 30.0
    hang_quiet_s: float = 30.0  # stream: the stalled ranks' ops must also have stopped arriving this long (wall)


@dataclass
class Lateness:
    comm: str
    op_count: int
    rank: int
    lag: float  # seconds after the median rank
    ts: float
    ranks: int  # ranks that enqueued the op


@dataclass
class StragglerEvent:
    rank: int
    lag: float
    late_ops: int
    window: int
    comm: str
    op_count: int
    ts: float
    peers: int
    first: bool  # the episode's first finding (else an update)


@dataclass
class HangEvent:
    kind: str  # "hang" | "resolved"
    ts: float
    stalled: dict[int, int]  # rank -> its last opCount on the stuck comm
    comm: str
    op_count: int  # the op the others are stuck in
    op: str
    silent_s: float
    threshold_s: float
    evidence: list[dict] = field(default_factory=list)


class _Comm:
    """One communicator: per rank last op, ops waiting to be judged, spread, progress gaps, recent lateness."""

    def __init__(self) -> None:
        self.last: dict[int, tuple[int, float, str]] = {}  # rank -> (op_count, ts, op name)
        self.pending: OrderedDict[int, dict[int, float]] = OrderedDict()
        self.waiting = 0  # enqueues in `pending`
        self.first_seen: dict[int, float] = {}
        self.offsets: deque[float] = deque(maxlen=512)  # |offset from median| of on-time enqueues
        self.verdicts: dict[int, deque[bool]] = {}  # rank -> late or not on its last judged ops
        self.max_count = -1
        self.advanced_at = -math.inf
        self.gaps: deque[float] = deque(maxlen=256)
        self.judged_upto = -1
        self.medians: OrderedDict[int, tuple[float, float]] = OrderedDict()  # judged op -> (median, limit)
        self.expected = 0  # the comm's size as printed (0: unknown)
        self.complete: set[int] = set()  # recent ops judged with every rank in (bounded like medians)

    # While catching up a backlog, one rank's partition can be read thousands of ops ahead of its peers' (a
    # tensor-parallel pair's other rank on another worker): its ops wait for them. The wait is bounded by the
    # enqueues held, not by the number of ops, so a small comm can wait long and a 4,096-rank one stays bounded.
    MAX_WAITING = 1 << 20  # enqueues held per comm (~100 MB at the very worst)
    MAX_PENDING_OPS = 1 << 16

    def overflowing(self) -> bool:
        return self.waiting > self.MAX_WAITING or len(self.pending) > self.MAX_PENDING_OPS

    def spread(self) -> float:
        if len(self.offsets) < 16:
            return math.inf  # not judged until the comm's usual spread is known
        a = np.fromiter(self.offsets, float)
        return float(1.4826 * np.median(a))


class CollectiveTracker:
    """All communicators of one job."""

    def __init__(self, config: CollectiveConfig | None = None) -> None:
        self.config = config or CollectiveConfig()
        self.comms: dict[str, _Comm] = {}
        self.recent_late: deque[Lateness] = deque(maxlen=4096)  # for the victim test
        self.episodes: dict[int, dict[str, Any]] = {}  # straggler rank -> episode
        self.hang: HangEvent | None = None
        self.evidence: list[dict] = []
        self.late_reports: list[tuple[float, str, int, int]] = []  # (enqueue, comm, rank, op) of judged ops

    # ---- ops --------------------------------------------------------------------------------------------
    def add(self, comm: str, rank: int, op_count: int, ts: float, op: str = "", nranks: int = 0) -> None:
        """Record one enqueue; it is judged by `judge`. `nranks`: the comm's size as NCCL printed it, so an op is not judged complete before every rank of
        the comm could have reported it (ranks reach stage 2 in no particular order)."""
        c = self.comms.get(comm)
        if c is None:
            c = self.comms[comm] = _Comm()
        c.expected = max(c.expected, nranks)
        c.last[rank] = (op_count, ts, op)
        if op_count > c.max_count:
            if c.max_count >= 0 and math.isfinite(c.advanced_at):
                c.gaps.append(max(ts - c.advanced_at, 0.0))
            c.max_count, c.advanced_at = op_count, ts
        if op_count <= c.judged_upto:  # its op was judged without it: judged against the stored median, in turn
            self.late_reports.append((ts, comm, rank, op_count))
            return
        c.pending.setdefault(op_count, {})[rank] = ts
        c.waiting += 1
        c.first_seen.setdefault(op_count, ts)

    def judge(self, now: float) -> tuple[list[StragglerEvent], list[int]]:
        """Judge what the job's clock `now` has passed, in event-time order over all comms: ops complete by
        then (dated by their last enqueue), ops more than half there and `op_stale_s` old (dated then; ranks
        after that are late reporters), and late reporters (dated by their enqueue). The stream and the offline
        run feed ranks in different orders and tick at different moments; deciding in this order, only behind
        the clock, gives both the same verdicts. Returns (straggler findings: new episodes and periodic
        updates, each at the op that decided it; ranks whose episode ended)."""
        due: list[tuple[float, int, str, int, int]] = []  # heap of (decided at, kind, comm, op, rank)
        stale_s = self.config.op_stale_s
        for name, c in self.comms.items():
            members, prev = max(len(c.last), c.expected), -math.inf
            for n, arrivals in c.pending.items():  # opCount order: an op is decided after the ones before it
                first = c.first_seen.get(n, now)
                if len(arrivals) >= members and max(arrivals.values()) < first + stale_s:
                    at = max(arrivals.values())
                elif 2 * len(arrivals) > members or c.overflowing():
                    at = first + stale_s
                else:
                    break
                prev = at = max(at, prev)
                if at > now and not c.overflowing():
                    break
                due.append((at, _OP, name, n, -1))
        keep = []
        for ts, name, rank, n in self.late_reports:
            if ts > now:
                keep.append((ts, name, rank, n))
            elif n in self.comms[name].medians:  # (one whose op is long forgotten is dropped)
                due.append((ts, _LATE, name, n, rank))
        self.late_reports = keep
        heapq.heapify(due)
        events: list[StragglerEvent] = []
        while due:
            at, kind, name, n, rank = heapq.heappop(due)
            c = self.comms[name]
            if kind == _LATE:
                events.extend(self._verdict(name, c, rank, n, at, *c.medians[n]))
                continue
            arrivals = c.pending.pop(n)
            c.waiting -= len(arrivals)
            c.first_seen.pop(n, None)
            on_time = {r: t for r, t in arrivals.items() if t <= at}
            for r, t in arrivals.items():
                if t > at:  # enqueued after its op went stale: a late reporter
                    if t <= now:
                        heapq.heappush(due, (t, _LATE, name, n, r))
                    else:
                        self.late_reports.append((t, name, r, n))
            c.judged_upto = max(c.judged_upto, n)
            if len(on_time) >= max(len(c.last), c.expected):
                c.complete.add(n)
                c.complete.discard(n - 4096)
            if len(on_time) >= 2:
                events.extend(self._judge_op(name, c, n, on_time))
        ended = [r for r in self.episodes if not any(any(c.verdicts.get(r, ())) for c in self.comms.values())]
        for r in ended:
            del self.episodes[r]
        return events, ended

    def _judge_op(self, name: str, c: _Comm, n: int, arrivals: dict[int, float]) -> list[StragglerEvent]:
        cfg = self.config
        ts = np.fromiter(arrivals.values(), float)
        # the median rank; of two (a tensor-parallel pair), the earlier: a midpoint would halve the lag
        med = float(np.median(ts)) if len(ts) > 2 else float(ts.min())
        limit = max(cfg.straggler_spread_k * c.spread(), cfg.straggler_min_lag_s)
        c.medians[n] = (med, limit)
        while len(c.medians) > 4096:  # judged ops kept for late reporters and held findings
            c.medians.popitem(last=False)
        # learn the usual spread from on-time ranks (a sample, so a 4,096-rank comm stays cheap)
        on_time = [abs(t - med) for t in arrivals.values() if t - med <= limit]
        step = max(1, len(on_time) // 16)
        c.offsets.extend(on_time[::step])
        out: list[StragglerEvent] = []
        for rank, t in arrivals.items():
            out.extend(self._verdict(name, c, rank, n, t, med, limit))
        return out

    def _verdict(self, name: str, c: _Comm, rank: int, n: int, t: float, med: float, limit: float
                 ) -> list[StragglerEvent]:
        cfg = self.config
        lag = t - med
        is_late = lag > limit
        v = c.verdicts.get(rank)
        if v is None:
            v = c.verdicts[rank] = deque(maxlen=cfg.straggler_window)
        v.append(is_late)
        if not is_late:
            return []
        self.recent_late.append(Lateness(name, n, rank, lag, t, len(c.last)))
        k = sum(v)
        if k < cfg.straggler_min_late:
            return []
        ev = StragglerEvent(rank, lag, k, len(v), name, n, t, len(c.last) - 1, False)
        ep = self.episodes.get(rank)
        if ep is None:
            ev.first = True
            self.episodes[rank] = {"since": t, "reported": t, "max_lag": lag}
            return [ev]
        ep["max_lag"] = max(ep["max_lag"], lag)
        if t - ep["reported"] >= cfg.straggler_report_s:
            ep["reported"] = t
            return [ev]
        return []

    def judged(self, comm: str, n: int, complete: bool = False) -> bool:
        """Has op n been judged (`complete`: with every rank of the comm)?"""
        c = self.comms.get(comm)
        if c is None or c.judged_upto < n:
            return False
        return not complete or n in c.complete

    def common_gap(self, comm: str, n: int) -> float | None:
        """The comm's own gap before op n: between the median ranks' enqueues of ops n-1 and n. When a rank's
        long interval is no longer than this, every rank paused together (evaluation, checkpoint): not a slow
        stream of its own."""
        c = self.comms.get(comm)
        if c is None or n not in c.medians or n - 1 not in c.medians:
            return None
        return c.medians[n][0] - c.medians[n - 1][0]

    def late_near(self, t0: float, t1: float) -> dict[int, float]:
        """rank -> largest lag of its late enqueues in [t0, t1] (the victim test)."""
        out: dict[int, float] = {}
        for ev in reversed(self.recent_late):
            if ev.ts < t0 - 60:
                break
            if t0 <= ev.ts <= t1:
                out[ev.rank] = max(out.get(ev.rank, 0.0), ev.lag)
        return out

    # ---- hangs ------------------------------------------------------------------------------------------
    def threshold(self, c: _Comm) -> float:
        usual = float(np.quantile(np.fromiter(c.gaps, float), 0.9)) if len(c.gaps) >= 8 else 0.0
        return max(self.config.hang_min_s, self.config.hang_factor * usual)

    def check_hang(self, now: float, quiet: Callable[[int], bool] = lambda rank: True) -> HangEvent | None:
        """`quiet(rank)`: has that rank's input really stopped? (The stream checks that its ops stopped arriving,
        not just that other partitions ran ahead of it in event time.)"""
        if self.hang is not None:
            return self._check_resolved()
        worst: HangEvent | None = None
        for name, c in self.comms.items():
            if c.max_count < 0:
                continue
            silent, thr = now - c.advanced_at, self.threshold(c)
            behind = {r: n for r, (n, _, _) in c.last.items() if n < c.max_count}
            if silent < thr or not behind or not all(quiet(r) for r in behind):
                continue
            stuck = min(behind.values()) + 1
            op = next((o for (n, _, o) in c.last.values() if n >= stuck), "")
            ev = HangEvent("hang", c.advanced_at + thr, behind, name, stuck, op, silent, thr)
            if worst is None or len(ev.stalled) < len(worst.stalled) or ev.ts < worst.ts:
                worst = ev
        if worst is not None:
            self.hang = worst
        return worst

    def hang_from_evidence(self, ev: dict, now: float) -> HangEvent | None:
        """A watchdog timeout: evidence for the current hang, or proof of one. If the op view shows ranks that
        never reached an op for longer than the threshold, that is the hang, dated when it became one (the
        watchdog proves the waiting is real); otherwise a hang of its own, dated now."""
        self.evidence.append(ev)
        del self.evidence[:-32]
        if self.hang is not None:
            self.hang.evidence = list(self.evidence)
            return None
        h = self.check_hang(now)
        if h is None:
            stalled: dict[int, int] = {}
            comm, stuck = "", -1
            for name, c in self.comms.items():
                behind = {r: n for r, (n, _, _) in c.last.items() if n < c.max_count}
                if behind:
                    stalled.update(behind)
                    comm, stuck = name, min(behind.values()) + 1
            h = self.hang = HangEvent("hang", now, stalled, comm, stuck, str(ev.get("op_type", "")), 0.0, 0.0)
        h.evidence = list(self.evidence)
        return h

    def _check_resolved(self) -> HangEvent | None:
        h = self.hang
        assert h is not None
        c = self.comms.get(h.comm)
        if c is None or c.max_count <= h.op_count:
            return None
        if any(c.last.get(r, (-1,))[0] < h.op_count for r in h.stalled):
            return None
        self.hang = None
        self.evidence = []
        return HangEvent("resolved", c.advanced_at, h.stalled, h.comm, h.op_count, h.op, 0.0, h.threshold_s)

    # ---- persistence -----------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        comms = {}
        for name, c in self.comms.items():
            comms[name] = {"last": [[r, *v] for r, v in c.last.items()], "offsets": list(c.offsets),
                           "gaps": list(c.gaps), "max_count": c.max_count,
                           "advanced_at": c.advanced_at if math.isfinite(c.advanced_at) else None,
                           "judged_upto": c.judged_upto}
        return {"comms": comms, "episodes": {str(r): ep for r, ep in self.episodes.items()},
                "hang": self.hang.__dict__ if self.hang else None}

    def load_state(self, state: dict[str, Any]) -> None:
        for name, d in state.get("comms", {}).items():
            c = self.comms[name] = _Comm()
            c.last = {int(r): (int(n), float(t), str(o)) for r, n, t, o in d.get("last", [])}
            c.offsets.extend(d.get("offsets", []))
            c.gaps.extend(d.get("gaps", []))
            c.max_count = int(d.get("max_count", -1))
            c.advanced_at = -math.inf if d.get("advanced_at") is None else float(d["advanced_at"])
            c.judged_upto = int(d.get("judged_upto", -1))
        self.episodes = {int(r): ep for r, ep in state.get("episodes", {}).items()}
        h = state.get("hang")
        if h:
            h = dict(h)
            h["stalled"] = {int(r): int(n) for r, n in h.get("stalled", {}).items()}
            self.hang = HangEvent(**h)
