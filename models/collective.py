"""Cross-rank collective timing of one job (stage 2): who enqueues late, which comm stopped, who is a victim.

Input: per op, (rank, communicator identity, opCount, enqueue time). NCCL's opCount of a communicator is the
same collective on every rank of it, so the enqueue times of (comm, opCount) are directly comparable.

- **Lateness.** An op is judged when every rank seen on its comm has enqueued it, or, once more than half have,
  `op_stale_s` after its first enqueue; decisions are taken once the job's clock is past them, in event-time
  order over all comms, so the stream and an offline run give the same findings. A rank is late on it when it enqueued more than max(k x the comm's usual
  spread, `straggler_min_lag_s`) after the median rank (of a pair, the earlier one); the spread is a robust scale of recent offsets, learned
  without the late ones. Ranks reach stage 2 through different partitions and workers, in no global order: a
  rank whose report arrives after its op was judged is judged against that op's stored median and limit.
- **Straggler**: late in >= 60% (`straggler_min_late` / `straggler_window`) of its ops on a comm over the last
  `straggler_steps` of the comm's steps (at least `straggler_window` ops; a step is the comm's period, from the
  gaps between its ops' median enqueue times), against the comm's usual spread at that point of the step: a rank
  whose batch was long is late on one step's every op, a straggler step after step. Victims wait for it at the
  collective, so their intervals grow too, but they are never late: lateness tells them apart.
- **Hang**: models/hangs.py (the tracker's hang half).
No I/O; plain data; JSON state.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from rankwatch.models.hangs import NEWER_HANG_FIELDS, HangEvent, HangJudge
from rankwatch.models.op_timing import step_period

_OP, _LATE = 0, 1  # what `judge` decides at a moment: an op, or one late report of an op already judged
_MAX_PERIOD = 64  # longest step pattern (ops per step of one comm) the straggler window follows


@dataclass
class CollectiveConfig:
    straggler_window: int = 10  # a comm's last judged ops considered
    straggler_min_late: int = 6  # late in at least this many of them (the same share of a longer window below)
    straggler_steps: int = 3  # the window spans at least this many of the comm's steps (ops per step: its period)
    straggler_spread_k: float = 6.0  # late: behind the median rank by > k x the comm's usual spread ...
    straggler_min_lag_s: float = 0.05  # ... and by at least this (hosts' clocks must agree better than this)
    straggler_report_s: float = 60.0  # while an episode lasts, an updated finding at most this often
    op_stale_s: float = 5.0  # an op not enqueued by every known rank after this long is judged without them
    victim_hold_s: float = 0.5  # an op-timing finding is judged once the job's clock is this far past it ...
    victim_wait_s: float = 30.0  # ... and its op is in from every rank, or (stream) after this much wall time
    hang_factor: float = 10.0
    hang_min_s: float = 30.0
    hang_quiet_s: float = 30.0  # stream: the stalled ranks' ops must also have stopped arriving this long (wall)
    stop_grace_s: float = 300.0  # ranks may run this long after a stop (SIGTERM handlers, preemption grace)


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


class _Comm:
    """One communicator: per rank last op, ops waiting to be judged, spread, progress gaps, recent lateness."""

    def __init__(self) -> None:
        self.last: dict[int, tuple[int, float, str]] = {}  # rank -> (op_count, ts, op name)
        self.pending: OrderedDict[int, dict[int, float]] = OrderedDict()
        self.waiting = 0  # enqueues in `pending`
        self.first_seen: dict[int, float] = {}
        self.offsets: deque[float] = deque(maxlen=512)  # |offset from median| of on-time enqueues
        self.phase_offsets: dict[int, deque[float]] = {}  # the same per position in the step (opCount % period)
        self.verdicts: dict[int, deque[bool]] = {}  # rank -> late or not on its last judged ops
        self.max_count = -1
        self.advanced_at = -math.inf
        self.gaps: deque[float] = deque(maxlen=256)
        self.judged_upto = -1
        self.medians: OrderedDict[int, tuple[float, float]] = OrderedDict()  # judged op -> (median, limit)
        self.bounds: OrderedDict[int, tuple[float, float]] = OrderedDict()  # judged op -> first, last on-time enqueue
        self.expected = 0  # the comm's size as printed (0: unknown)
        self.complete: set[int] = set()  # recent ops judged with every rank in (bounded like medians)
        self.period = 0  # ops per step, from the median enqueue times (0: not known yet)
        self.started = math.inf  # its earliest enqueue seen (a stop before it belongs to an earlier attempt)

    # While catching up a backlog, one rank's partition can be read thousands of ops ahead of its peers' (a
    # tensor-parallel pair's other rank on another worker): its ops wait for them. The wait is bounded by the
    # enqueues held, not by the number of ops, so a small comm can wait long and a 4,096-rank one stays bounded.
    MAX_WAITING = 1 << 20  # enqueues held per comm (~100 MB at the very worst)
    MAX_PENDING_OPS = 1 << 16

    def overflowing(self) -> bool:
        return self.waiting > self.MAX_WAITING or len(self.pending) > self.MAX_PENDING_OPS

    def spread(self, phase: int | None = None) -> float:
        """The usual |offset from the median rank| at this point of the step where known, else over all ops.
        Ranks' batches differ (sequence lengths, MoE routing), so offsets grow through a step: the last
        buckets of backward are spread wide by that imbalance alone, the first ops of forward barely."""
        d = self.phase_offsets.get(phase) if phase is not None else None
        src = d if d is not None and len(d) >= 16 else self.offsets
        if len(src) < 16:
            return math.inf  # not judged until the comm's usual spread is known
        return float(1.4826 * np.median(np.fromiter(src, float)))


class CollectiveTracker(HangJudge):
    """All communicators of one job: lateness and stragglers here, hangs in `HangJudge`."""

    def __init__(self, config: CollectiveConfig | None = None) -> None:
        self.config = config or CollectiveConfig()
        self.comms: dict[str, _Comm] = {}
        self.recent_late: deque[Lateness] = deque(maxlen=4096)  # for the victim test
        self.episodes: dict[int, dict[str, Any]] = {}  # straggler rank -> episode
        self.hang: HangEvent | None = None
        self.evidence: list[dict] = []
        self.late_reports: list[tuple[float, str, int, int]] = []  # (enqueue, comm, rank, op) of judged ops
        self.stops: list[float] = []  # when the job was stopped (latest few), in no particular order of arrival
        self.excused: dict[str, float] = {}  # comm -> the advance whose stall is no hang (stopped, or moved on)

    # ---- ops --------------------------------------------------------------------------------------------
    def add(self, comm: str, rank: int, op_count: int, ts: float, op: str = "", nranks: int = 0) -> None:
        """Record one enqueue; it is judged by `judge`. `nranks`: the comm's size as NCCL printed it, so an op is not judged complete before every rank of
        the comm could have reported it (ranks reach stage 2 in no particular order)."""
        c = self.comms.get(comm)
        if c is None:
            c = self.comms[comm] = _Comm()
        c.expected = max(c.expected, nranks)
        c.started = min(c.started, ts)
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
                yardstick = c.medians.get(n)  # none when fewer than 2 ranks were on time for the op
                if yardstick is not None:
                    events.extend(self._verdict(name, c, rank, n, at, *yardstick))
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
        ended = [r for r in self.episodes
                 if not any(any(itertools.islice(reversed(c.verdicts.get(r, ())), self._window(c)))
                            for c in self.comms.values())]
        for r in ended:
            del self.episodes[r]
        return events, ended

    def _judge_op(self, name: str, c: _Comm, n: int, arrivals: dict[int, float]) -> list[StragglerEvent]:
        med, limit = self._yardstick(c, n, np.fromiter(arrivals.values(), float))
        phase = n % c.period if c.period > 1 else None
        c.medians[n] = (med, limit)
        c.bounds[n] = (min(arrivals.values()), max(arrivals.values()))
        while len(c.medians) > 4096:  # judged ops kept for late reporters and held findings
            c.medians.popitem(last=False)
        while len(c.bounds) > 4096:
            c.bounds.popitem(last=False)
        # learn the usual spread from on-time ranks (a sample, so a 4,096-rank comm stays cheap)
        on_time = [abs(t - med) for t in arrivals.values() if t - med <= limit]
        sample = on_time[::max(1, len(on_time) // 16)]
        c.offsets.extend(sample)
        if phase is not None:
            c.phase_offsets.setdefault(phase, deque(maxlen=128)).extend(sample)
        # after the sample: its phase is of the period it was judged with; a new period starts new phases
        if len(c.medians) >= 48 and (c.period == 0 or n % 64 == 0):
            period = self._period(c)
            if period != c.period:
                c.period, c.phase_offsets = period, {}
        out: list[StragglerEvent] = []
        for rank, t in arrivals.items():
            out.extend(self._verdict(name, c, rank, n, t, med, limit))
        return out

    def _yardstick(self, c: _Comm, n: int, ts: np.ndarray) -> tuple[float, float]:
        """(the median rank's enqueue of op `n`, how far past it a rank is late). Of two ranks (a tensor-parallel
        pair), the earlier is the median: a midpoint would halve the lag."""
        med = float(np.median(ts)) if len(ts) > 2 else float(ts.min())
        phase = n % c.period if c.period > 1 else None
        return med, max(self.config.straggler_spread_k * c.spread(phase), self.config.straggler_min_lag_s)

    def _verdict(self, name: str, c: _Comm, rank: int, n: int, t: float, med: float, limit: float
                 ) -> list[StragglerEvent]:
        cfg = self.config
        lag = t - med
        is_late = lag > limit
        v = c.verdicts.get(rank)
        if v is None:
            v = c.verdicts[rank] = self._verdict_history()
        v.append(is_late)
        if not is_late:
            return []
        self.recent_late.append(Lateness(name, n, rank, lag, t, len(c.last)))
        # Late on most of the comm's ops over several of its steps: a rank whose batch was long this step is
        # late on every op of that one step (all of them, where a step has dozens of gradient buckets), then
        # another rank's is; a straggler stays late step after step.
        window = self._window(c)
        k = sum(itertools.islice(reversed(v), window))
        if c.period == 0 or k < math.ceil(cfg.straggler_min_late * window / cfg.straggler_window):
            return []  # (no verdict before the comm's step pattern is known: its first 48 ops)
        ev = StragglerEvent(rank, lag, k, window, name, n, t, len(c.last) - 1, False)
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

    def _verdict_history(self, bits: Iterable[bool] = ()) -> deque[bool]:
        """A rank's late / on time on a comm's last ops: as many as the longest window can ask for."""
        return deque(bits, maxlen=self.config.straggler_steps * _MAX_PERIOD)

    def _window(self, c: _Comm) -> int:
        """Ops of a comm over which a straggler must be late again and again: at least `straggler_steps` of
        its steps."""
        return max(self.config.straggler_window, self.config.straggler_steps * c.period)

    @staticmethod
    def _period(c: _Comm) -> int:
        """The comm's ops per step, from the gaps between its ops' median enqueue times (one step's pattern of
        bucket gaps repeats every step); 1 when no lag predicts the gaps clearly better than the last one (no
        step pattern: the window stays `straggler_window`)."""
        times = np.fromiter((m for m, _ in itertools.islice(reversed(c.medians.values()), 4 * _MAX_PERIOD + 1)),
                            float)[::-1]
        y = np.log(np.maximum(np.diff(times), 1e-4))
        p = step_period(y, _MAX_PERIOD)
        if p > 1:
            lag1, lagp = np.abs(y[p:] - y[p - 1:-1]).mean(), np.abs(y[p:] - y[:-p]).mean()
            if lagp > 0.7 * lag1:
                return 1
        return p

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

    def behind_last(self, comm: str, n: int, enqueued: float) -> float | None:
        """How long before the comm's last rank a rank enqueued op n (at `enqueued`): where op n+1 waits for op n
        to complete (the step's last collective before the optimizer, the loss all-reduce after it), so long it
        waited. An interval that long on a rank that was early is its peers' doing, not a slow stream."""
        c = self.comms.get(comm)
        bounds = c.bounds.get(n) if c is not None else None
        if bounds is None or enqueued < bounds[0] - 1e-3:
            return None  # unknown, or the interval began before anyone enqueued op n: not that op's wait
        return bounds[1] - enqueued

    def late_near(self, t0: float, t1: float) -> dict[int, float]:
        """rank -> largest lag of its late enqueues in [t0, t1] (the victim test)."""
        out: dict[int, float] = {}
        for ev in reversed(self.recent_late):
            if ev.ts < t0 - 60:
                break
            if t0 <= ev.ts <= t1:
                out[ev.rank] = max(out.get(ev.rank, 0.0), ev.lag)
        return out

    # ---- persistence -----------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        comms = {}
        for name, c in self.comms.items():
            comms[name] = {"last": [[r, *v] for r, v in c.last.items()], "offsets": list(c.offsets),
                           "phase_offsets": {str(p): list(d) for p, d in c.phase_offsets.items()},
                           "gaps": list(c.gaps), "max_count": c.max_count,
                           "advanced_at": c.advanced_at if math.isfinite(c.advanced_at) else None,
                           "judged_upto": c.judged_upto, "period": c.period,
                           "started": c.started if math.isfinite(c.started) else None,
                           # the last ops' medians: the period's input, and late reporters' yardstick
                           "medians": [[n, m, lim] for n, (m, lim) in
                                       itertools.islice(reversed(c.medians.items()), 4 * _MAX_PERIOD + 1)][::-1],
                           "bounds": [[n, *b] for n, b in itertools.islice(reversed(c.bounds.items()), 64)][::-1],
                           "verdicts": {str(r): [int(x) for x in itertools.islice(v, max(0, len(v) - self._window(c)),
                                                                                    None)]
                                        for r, v in c.verdicts.items()}}
        return {"comms": comms, "episodes": {str(r): ep for r, ep in self.episodes.items()},
                "hang": {**{k: v for k, v in self.hang.__dict__.items() if k not in NEWER_HANG_FIELDS or v},
                         "stalled": {str(r): n for r, n in self.hang.stalled.items()}}  # JSON keys are strings
                if self.hang else None,
                "stops": self.stops, "excused": self.excused}

    def load_state(self, state: dict[str, Any]) -> None:
        for name, d in state.get("comms", {}).items():
            c = self.comms[name] = _Comm()
            c.last = {int(r): (int(n), float(t), str(o)) for r, n, t, o in d.get("last", [])}
            c.offsets.extend(d.get("offsets", []))
            c.phase_offsets = {int(p): deque(v, maxlen=128) for p, v in d.get("phase_offsets", {}).items()}
            c.gaps.extend(d.get("gaps", []))
            c.max_count = int(d.get("max_count", -1))
            c.advanced_at = -math.inf if d.get("advanced_at") is None else float(d["advanced_at"])
            c.judged_upto = int(d.get("judged_upto", -1))
            c.period = int(d.get("period", 0))
            c.started = -math.inf if d.get("started") is None else float(d["started"])  # older state: any stop counts
            c.medians.update((int(n), (float(m), float(lim))) for n, m, lim in d.get("medians", []))
            c.bounds.update((int(n), (float(a), float(b))) for n, a, b in d.get("bounds", []))
            for r, bits in d.get("verdicts", {}).items():
                c.verdicts[int(r)] = self._verdict_history(bool(b) for b in bits)
        self.episodes = {int(r): ep for r, ep in state.get("episodes", {}).items()}
        self.stops = [float(t) for t in state.get("stops", [])]
        self.excused = {str(k): float(v) for k, v in state.get("excused", {}).items()}
        h = state.get("hang")
        if h:
            h = dict(h)
            h["stalled"] = {int(r): int(n) for r, n in h.get("stalled", {}).items()}
            self.hang = HangEvent(**h)
