"""Hangs of one job's collectives (stage 2): the hang half of `CollectiveTracker` (models/collective.py).

- **Hang**: a comm whose opCount stopped advancing for max(`hang_min_s`, `hang_factor` x its usual longest gap
  between advances) while some ranks never reached the op the others are stuck in: those are the stalled
  ranks. A pause in which every rank stopped at the same op (evaluation, checkpointing, the end of the job) is
  not a hang. PyTorch's watchdog lines, when they come, are further evidence (and raise a hang on their own if
  the op view has none).
- **Stops** (`stop`: Slurm's CANCELLED line, torchrun's agent signalled) leave ranks short of an op too: a comm
  that had stalled for less than the threshold when the job was stopped is not a hang, and a hang still open
  when it is stopped ends.
- **Restarts**: ranks short of an op that go on with other comms' ops are alive (new processes, new comms).
No I/O; plain data; the state is saved by the tracker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rankwatch.models.collective import CollectiveConfig, _Comm

NEWER_HANG_FIELDS = ("end_of_logs", "stopped_at", "moved_on")  # saved only where set, so older workers load it


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
    from_watchdog: bool = False  # found from PyTorch's watchdog lines alone (no collective op view of the job)
    end_of_logs: bool = False  # offline: the logs end with this comm stuck (silent_s: till the analysis)
    stopped_at: float | None = None  # kind "ended": when the job was stopped (its scheduler's or launcher's line)
    moved_on: bool = False  # kind "resolved": the stalled ranks went on with other comms (the job restarted)


def stalled_from_watchdog(evidence: list[dict]) -> tuple[dict[int, int], str, int]:
    """(rank -> the last collective it enqueued, process group, the collective the others are stuck in) from
    watchdog lines. A timed-out rank waits in the op it enqueued last (`WorkNCCL(SeqNum=N)`, or `last enqueued
    NCCL work: N` of the failure and dump-signal lines); the rank that holds the job never enqueued it, so it
    reports a lower number, or nothing at all (then it cannot be named from these lines). Sequence numbers
    count per process group, so only one group's lines are compared: the one most ranks reported in. `reached`
    is the failure and dump-signal lines' last enqueued collective; a timeout line's is its SeqNum."""
    by_pg: dict[str, dict[int, int]] = {}
    for e in evidence:
        reached, rank = e.get("reached", e.get("seq_num")), e.get("rank")
        if isinstance(reached, int) and isinstance(rank, int):
            ranks = by_pg.setdefault(str(e.get("pg") or "0"), {})
            ranks[rank] = max(ranks.get(rank, reached), reached)
    if not by_pg:
        return {}, "", -1
    pg, ranks = max(by_pg.items(), key=lambda kv: len(kv[1]))
    top = max(ranks.values())
    return {r: n for r, n in ranks.items() if n < top}, f"pg {pg}", top


class HangJudge:
    """Hangs over the tracker's comms (a mixin of `CollectiveTracker`, which holds the state below and the
    lateness yardstick `_yardstick`)."""

    config: CollectiveConfig
    comms: dict[str, _Comm]
    hang: HangEvent | None
    evidence: list[dict]
    stops: list[float]
    excused: dict[str, float]

    def _yardstick(self, c: _Comm, n: int, ts: np.ndarray) -> tuple[float, float]:
        raise NotImplementedError

    def threshold(self, c: _Comm) -> float:
        usual = float(np.quantile(np.fromiter(c.gaps, float), 0.9)) if len(c.gaps) >= 8 else 0.0
        return max(self.config.hang_min_s, self.config.hang_factor * usual)

    def check_hang(self, now: float, quiet: Callable[[int], bool] = lambda rank: True,
                   logs_end: tuple[float, float] | None = None) -> HangEvent | None:
        """`quiet(rank)`: has that rank's input really stopped? (The stream checks that its ops stopped arriving,
        not just that other partitions ran ahead of it in event time.) `logs_end` (offline): (the job's last
        line, its last op): the logs end there and nothing followed until `now`. A job stopped mid-collective
        looks much the same, so only a comm at least half of whose ranks reached the op counts, and only if the
        others were already late for it, as a straggler is late, by the job's last op: a job cut at random
        leaves ranks within the usual spread of the op (what it logs after its ops stopped is no evidence)."""
        if self.hang is not None:
            return self._check_resolved(now)
        worst: HangEvent | None = None
        for name, c in self.comms.items():
            silent, thr = now - c.advanced_at, self.threshold(c)
            behind = self._stalled(c)
            if silent < thr or not behind or not all(quiet(r) for r in behind) or self._excused(name, c, thr, behind):
                continue
            stuck = min(behind.values()) + 1
            if logs_end is not None and (now - logs_end[0] < thr or 2 * len(behind) > max(len(c.last), c.expected)
                                         or not self._overdue(c, stuck, logs_end[1])):
                continue
            op = next((o for (n, _, o) in c.last.values() if n >= stuck), "")
            ev = HangEvent("hang", c.advanced_at + thr, behind, name, stuck, op, silent, thr,
                           end_of_logs=logs_end is not None)
            if worst is None or len(ev.stalled) < len(worst.stalled) or ev.ts < worst.ts:
                worst = ev
        if worst is not None:
            self.hang = worst
        return worst

    @staticmethod
    def _stalled(c: _Comm) -> dict[int, int]:
        """The ranks that never reached the earliest op the others are in: those at the lowest last opCount, if
        any rank is past it. (Peers that enqueued fewer of the ops after it before blocking did reach it.)"""
        if c.max_count < 0 or not c.last:
            return {}
        low = min(n for n, _, _ in c.last.values())
        return {r: n for r, (n, _, _) in c.last.items() if n == low} if low < c.max_count else {}

    def stop(self, ts: float) -> None:
        """The job was stopped at `ts` (its scheduler cancelled it, its launcher tore the workers down). The
        stop may reach stage 2 before or after the ops that preceded it, so it is applied when hangs are judged."""
        self.stops = sorted({*self.stops, ts})[-8:]

    def _excused(self, name: str, c: _Comm, thr: float, behind: dict[int, int]) -> bool:
        """Is this comm's stall no hang? Remembered per comm until it advances (a restarted job's later stops
        cannot make an old stall a hang). Two reasons:
        - a stop cut it short, before it had lasted the threshold: the ranks short of the op were stopped, not
          stuck. Ranks die at different moments after the stop (signal delivery, their SIGTERM handlers, the
          scheduler's kill wait), so the comm may have advanced up to `stop_grace_s` after it;
        - the ranks that never reached the op went on with other comms' ops half a threshold and more after the
          stall began: they are alive and not blocked, and a job whose ranks left a comm for good restarted
          (new processes create new communicators; without a launcher line that says so). A rank that skipped
          a collective and runs ahead blocks within a step, long before that."""
        if self.excused.get(name) == c.advanced_at:
            return True
        self.excused.pop(name, None)
        if any(self._stops_stall(t, c, thr) for t in self.stops) or self._moved_on(name, behind,
                                                                                    c.advanced_at + thr / 2):
            self.excused[name] = c.advanced_at
            return True
        return False

    def _moved_on(self, name: str, ranks: Iterable[int], after: float) -> bool:
        """Has each of these ranks enqueued an op of another comm after `after`?"""
        others = [d for other, d in self.comms.items() if other != name]
        return all(any(d.last.get(r, (0, -math.inf))[1] > after for d in others) for r in ranks)

    def _stops_stall(self, t: float, c: _Comm, thr: float) -> bool:
        """Did a stop at `t` end this comm's current stall (however long it had lasted)? (Not a stop from before
        the comm's first op: an earlier attempt's.)"""
        return c.started <= t and c.advanced_at - self.config.stop_grace_s <= t < c.advanced_at + thr

    def _overdue(self, c: _Comm, n: int, at: float) -> bool:
        """Were the ranks missing from op `n` already late for it at `at` (beyond the comm's usual spread)?"""
        if n in c.medians:
            med, limit = c.medians[n]
        else:
            arrivals = np.fromiter(c.pending.get(n, {}).values(), float)
            if not len(arrivals):
                return False
            med, limit = self._yardstick(c, n, arrivals)
        return at - med > limit

    def hang_from_evidence(self, evs: list[dict], now: float) -> HangEvent | None:
        """Watchdog timeouts (the lines of one moment, together): evidence for the current hang, or proof of one.
        If the op view shows ranks that never reached an op for longer than the threshold, that is the hang,
        dated when it became one (the watchdog proves the waiting is real); otherwise a hang of its own, dated
        now, whose stalled ranks come from the op view or, without one (no COLL logging), from the lines."""
        self.evidence.extend(evs)
        del self.evidence[:-32]
        if self.hang is not None:
            self.hang.evidence = list(self.evidence)
            return None
        h = self.check_hang(now)
        if h is None:
            stalled: dict[int, int] = {}
            comm, stuck = "", -1
            for name, c in self.comms.items():
                behind = self._stalled(c)
                if behind:
                    stalled.update(behind)
                    comm, stuck = name, min(behind.values()) + 1
            if not stalled:
                stalled, comm, stuck = stalled_from_watchdog(self.evidence)
            op = next((str(e["op_type"]) for e in self.evidence if e.get("op_type")), "")
            h = self.hang = HangEvent("hang", now, stalled, comm, stuck, op, 0.0, 0.0,
                                      from_watchdog=not self.comms)
        h.evidence = list(self.evidence)
        return h

    def _check_resolved(self, now: float) -> HangEvent | None:
        h = self.hang
        assert h is not None
        grace = self.config.stop_grace_s
        stop = min((t for t in self.stops if h.ts - h.threshold_s - grace <= t <= now), default=None)
        if stop is not None:  # the job was stopped with the hang open (or before it was one: cut short)
            self.hang = None
            self.evidence = []
            self.excused.update((name, c.advanced_at) for name, c in self.comms.items()
                                if c.started <= stop and -math.inf < c.advanced_at <= stop + grace)
            return HangEvent("ended", stop, h.stalled, h.comm, h.op_count, h.op, stop - (h.ts - h.threshold_s),
                             h.threshold_s, stopped_at=stop)
        c = self.comms.get(h.comm)
        if c is None:
            return None
        if h.stalled and self._moved_on(h.comm, h.stalled, h.ts):  # the job restarted: see `_excused`
            self.hang = None
            self.evidence = []
            self.excused[h.comm] = c.advanced_at
            back = max(d.last[r][1] for d in self.comms.values() for r in h.stalled if r in d.last)
            return HangEvent("resolved", back, h.stalled, h.comm, h.op_count, h.op, 0.0, h.threshold_s,
                             moved_on=True)
        if c.max_count <= h.op_count or any(c.last.get(r, (-1,))[0] < h.op_count for r in h.stalled):
            return None
        self.hang = None
        self.evidence = []
        return HangEvent("resolved", c.advanced_at, h.stalled, h.comm, h.op_count, h.op, 0.0, h.threshold_s)
