"""Job-wide slowdowns: one finding for a pause that every rank shows, not one per rank.

In synchronous training all ranks wait for one another at every collective, so a checkpoint being written, an
evaluation, a slow filesystem or a straggler lengthens the same step on every rank. Each rank's own detector
(models/training.py) then flags that step: a 4,096-rank job would raise 4,096 step-time and 4,096 throughput
findings for one checkpoint. This groups the per-rank findings of a step N once every rank of the job has
reported a record past it (or `slowdown_hold_s` of the job's clock has passed: a rank that died must not hold
the verdict). A rank's finding for that slowdown is at N, or at its next record when the slowdown was small
(the per-rank confirmation rule raises it one record later):

- shown by at least `slowdown_job_share` of the job's ranks (and `slowdown_job_min_ranks`): one job-wide finding
  (rank None) naming how many ranks showed it. The ranks' findings at N and at their next record are part of
  it, also those that come late (after the hold); nothing else is.
- fewer: each rank's finding at N as it was (a slow data loader on one node, a rank whose own time is its own).
- a slowdown at the first or second step the job logs after it announced a pause (a checkpoint save, an
  evaluation's results: on rank 0's log only, typically) is reported as `info`: expected, not alerting. One
  announcement explains one slowdown: the job-wide finding, or the per-rank ones of that step (where one rank
  writes the job's metrics, as Megatron's last rank and nanoGPT's master do, there is no other).

A rank whose steps go back (a resume from a checkpoint) ends what is held: the findings are decided at once, so
one attempt's steps are never grouped with the other's. Ranks silent for `slowdown_hold_s` of the job's clock
are left out of the count. Plain class: no Kafka, files or Prometheus. Members are ranks (or, for logs that
name none, their files).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from rankwatch.models.training import RESTART_BACK_STEPS

T = TypeVar("T")
_HISTORY = 8  # steps remembered per member: enough to find its record after a held step
_EPISODES = 8  # recent job-wide findings that a late finding can still join
_LEVEL_STEPS = 128  # steps whose per-rank values are kept, at most
_PAUSES = 1024  # announced pauses kept: the undated ones of a whole run can arrive at once
# a step's values, oriented so that larger is slower (step time; throughput inverted), on a log scale
_SIGN = {"step_time": 1.0, "throughput": -1.0}
_AS_SLOW = math.log(0.8)  # a rank at least 0.8x as slow as the flagged ones shares their slowdown
_ELEVATED = math.log(1.1)  # ... where the job's median rank is at least 1.1x slower than usual


@dataclass
class SlowdownConfig:
    slowdown_job_share: float = 0.5  # share of the job's ranks that must show a step's slowdown for one finding
    slowdown_job_min_ranks: int = 2
    slowdown_hold_s: float = 60.0  # job-clock seconds a step waits for the job's slower ranks to report past it
    pause_explains_s: float = 3600.0  # an announced pause explains a job-wide slowdown at most this long after it


@dataclass
class Candidate(Generic[T]):
    member: str
    step: int
    ts: float
    detector: str  # step_time | throughput
    value: float
    expected: float | None
    ref: T  # the caller's per-rank finding
    severity: str = "warning"
    pause: str | None = None  # reported per rank: the announced pause that explains it


@dataclass
class JobFinding(Generic[T]):
    detector: str
    step: int
    members: list[str]  # those that showed it, sorted
    of: int  # the job's members
    value: float  # median of theirs
    expected: float | None
    first: Candidate[T]
    severity: str  # the worst of theirs
    pause: str | None = None  # the announced pause that explains it


@dataclass
class JobSlowdown(Generic[T]):
    config: SlowdownConfig = field(default_factory=SlowdownConfig)
    history: dict[str, deque] = field(default_factory=dict)  # member -> its last steps reported, in order
    last_ts: dict[str, float] = field(default_factory=dict)  # member -> event time of its last report
    pending: dict[int, list[Candidate[T]]] = field(default_factory=dict)  # step -> its findings
    # recent job-wide findings: [detector, step, members, usual level, slowdown level (oriented logs), last step
    # seen still slow (None: over)]
    episodes: list[list[Any]] = field(default_factory=list)
    # announced pauses not yet used: [ts, what, the announcer's last step then, the step it named or None]
    pauses: list[list[Any]] = field(default_factory=list)
    explained: list[Any] = field(default_factory=list)  # [step, pause] last explained (for every signal of it)
    job_steps: deque = field(default_factory=lambda: deque(maxlen=256))  # distinct steps the job reported
    counted_steps: bool = False  # some member's steps are record counts: announcements' named steps do not apply
    levels: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)  # step -> detector -> member -> v
    absorbed: int = 0  # per-rank findings folded into job-wide ones
    resumes: int = 0
    flush: bool = False  # a resume: decide everything held now
    history_len: int = _HISTORY

    # ---- input ------------------------------------------------------------------------------------------
    def progress(self, member: str, step: int, ts: float, values: dict[str, float] | None = None,
                 counted: bool = False) -> None:
        """A record of `member` at `step`; `values`: its step time and throughput, where known. `counted`: the
        step is the file's record count (HF Trainer's dicts carry none), not the run's global step."""
        self.counted_steps = self.counted_steps or counted
        h = self.history.get(member)
        if h is None:
            h = self.history[member] = deque(maxlen=self.history_len)
        elif step < h[-1] - RESTART_BACK_STEPS:
            self.flush = bool(self.pending)  # the held findings belong to the attempt that ended
            self.resumes += 1
            h.clear()
            self.episodes.clear()
            self.job_steps.clear()
            self.levels.clear()
        if not h or step != h[-1]:
            h.append(step)
        for detector, v in (values or {}).items():
            if detector in _SIGN and v > 0 and math.isfinite(v):
                self.levels.setdefault(step, {}).setdefault(detector, {})[member] = _SIGN[detector] * math.log(v)
        while len(self.levels) > _LEVEL_STEPS:
            del self.levels[min(self.levels)]
        self.last_ts[member] = max(ts, self.last_ts.get(member, ts))
        if not self.job_steps or step > self.job_steps[-1]:
            self.job_steps.append(step)

    def add(self, c: Candidate[T]) -> None:
        if self._joins_episode(c):
            self.absorbed += 1
            return
        self.pending.setdefault(c.step, []).append(c)

    def announce(self, ts: float, what: str, member: str | None = None, step: int | None = None) -> None:
        """A pause announced by `member` after `step`, or where the announcement names none, after that member's
        last step (whatever other ranks' logs have reached). A named step is matched by step alone: such lines
        are often undated (Megatron's rank 0), so their time is the file's previous one, hours off."""
        h = self.history.get(member) if member is not None else None
        last = h[-1] if h else (self.job_steps[-1] if self.job_steps else -1)
        if any(p[1] == what and p[2:] == [last, step] for p in self.pauses):
            return  # the same save announced twice ("saving ...", then "successfully saved ...")
        if len(self.pauses) % 16 == 15:  # now and then: the list stays short where each pause is used or passed
            self._drop_spent_pauses()
        self.pauses.append([ts, what, last, step])
        del self.pauses[:-_PAUSES]

    def _follows(self, p: list[Any]) -> tuple[int, bool]:
        """The step a pause follows, and whether its time must fit: the step it names unless the job's steps
        are record counts (HF's `checkpoint-500` is no record number), else the announcer's last step then."""
        return (p[2], True) if p[3] is None or self.counted_steps else (p[3], False)

    def _drop_spent_pauses(self) -> None:
        """Pauses that can explain nothing more: the two steps the job logged after them are past the verdicts
        (every active rank beyond them, nothing held). Undated announcements all arrive at the start of an
        analysis, so the ones still ahead of the job are kept (up to `_PAUSES`)."""
        floor = min([*(self.history[m][-1] for m in self._active()), *self.pending], default=-math.inf)
        steps = list(self.job_steps)  # increasing: a resume clears it

        def spent(p: list[Any]) -> bool:
            i = bisect.bisect_right(steps, self._follows(p)[0]) + 1  # the second step logged after the pause
            return i < len(steps) and steps[i] < floor

        self.pauses = [p for p in self.pauses if not spent(p)]

    # ---- verdicts -----------------------------------------------------------------------------------------
    def decide(self, now: float) -> tuple[list[JobFinding[T]], list[Candidate[T]]]:
        """Steps every active member has reported a record past, or whose findings waited `hold_s` of the job's
        clock: (job-wide findings, per-rank findings to report as they are)."""
        if not self.pending:
            self.flush = False
            return [], []
        flush, self.flush = self.flush, False
        active = self._active()
        done = min((self.history[m][-1] for m in active), default=-math.inf)
        self._follow_episodes(done)
        jobs: list[JobFinding[T]] = []
        ranks: list[Candidate[T]] = []
        for step in sorted(self.pending):
            cands = self.pending.get(step)
            if not cands:
                self.pending.pop(step, None)  # its findings joined an earlier step's
                continue
            if not flush and step >= done and now - min(c.ts for c in cands) < self.config.slowdown_hold_s:
                break  # later steps wait too: episodes are decided in step order
            del self.pending[step]
            for detector in sorted({c.detector for c in cands}):
                j, r = self._judge(step, detector, [c for c in cands if c.detector == detector], len(active))
                jobs += j
                ranks += r
        return jobs, ranks

    def _follow_episodes(self, done: float) -> None:
        """Close the job-wide slowdowns the job has come out of: a step every rank has passed whose median rank
        is back below halfway between the usual level and the slowdown's."""
        for ep in self.episodes:
            detector, usual, level = ep[0], ep[3], ep[4]
            if ep[5] is None:
                continue
            for step in sorted(s for s in self.levels if ep[5] < s < done):
                med = _median(list(self.levels[step].get(detector, {}).values()))
                if med is None:
                    continue  # no value of this signal at that step
                if usual is None or med < usual + max(0.5 * (level - usual), 0.05):
                    ep[5] = None  # over: a later slowdown is a new one
                    break
                ep[5] = step
        keep = min([done, *self.pending]) if self.pending else done
        for step in [s for s in self.levels if s < keep - 2]:
            del self.levels[step]

    def _judge(self, step: int, detector: str, cands: list[Candidate[T]], n: int
               ) -> tuple[list[JobFinding[T]], list[Candidate[T]]]:
        c = self.config
        if self._ongoing(detector, step):
            self.absorbed += len(cands)  # the ranks' detectors raising it again while it lasts
            return [], []
        group = list(cands)
        seen = {x.member for x in cands}
        for member, h in self.history.items():  # their confirmations: the finding at their next record
            nxt = next((s for s in h if s > step), None)
            if member in seen or nxt is None:
                continue
            later = [x for x in self.pending.get(nxt, ()) if x.member == member and x.detector == detector]
            group += later[:1]
            seen.update(x.member for x in later[:1])
        needed = max(c.slowdown_job_min_ranks, math.ceil(c.slowdown_job_share * n))
        if n >= c.slowdown_job_min_ranks:
            seen |= self._as_slow(step, detector, group)  # the ranks that showed it, flagged or not
        if n < c.slowdown_job_min_ranks or len(seen) < needed:
            for x in cands:  # one rank's log is often all there is (Megatron's last rank, nanoGPT's master)
                x.pause = self._explained(x.ts, step)
            return [], cands
        for x in group[len(cands):]:
            self.pending[x.step].remove(x)
        members = sorted(seen)
        values = sorted(x.value for x in group)
        expected = sorted(x.expected for x in group if x.expected is not None)
        level = _median(list(self.levels.get(step, {}).get(detector, {}).values()))
        usual = _oriented(detector, expected[len(expected) // 2]) if expected else None
        if level is None:
            level = _oriented(detector, values[len(values) // 2])
        self.episodes.append([detector, step, members, usual, level, step])
        del self.episodes[:-_EPISODES]
        self.absorbed += len(group) - 1
        first = min(group, key=lambda x: (x.ts, x.member))  # the same finding whatever the arrival order
        return [JobFinding(detector, step, members, max(n, len(members)), values[len(values) // 2],
                           expected[len(expected) // 2] if expected else None, first,
                           "critical" if any(x.severity == "critical" for x in group) else "warning",
                           self._explained(first.ts, step))], []

    def _active(self) -> list[str]:
        """Members heard from within `hold_s` of the newest report: a rank that died stops counting."""
        if not self.last_ts:
            return []
        newest = max(self.last_ts.values())
        return [m for m, t in self.last_ts.items() if t >= newest - self.config.slowdown_hold_s]

    def _joins_episode(self, c: Candidate[T]) -> bool:
        """A late finding of a recent job-wide slowdown: at its step, or at the rank's first record after it
        (a rank that reported late, after the hold)."""
        h = self.history.get(c.member, ())
        before = max((s for s in h if s < c.step), default=None)
        return any(ep[0] == c.detector and (c.step == ep[1] or (before is not None and before <= ep[1] < c.step))
                   for ep in self.episodes)

    def _ongoing(self, detector: str, step: int) -> bool:
        """Is a job-wide slowdown of this signal still going on at `step`? Every step since it began had the
        job's median rank at least halfway between the usual level and the slowdown's (`_follow_episodes`)."""
        return any(ep[0] == detector and ep[5] is not None and ep[1] < step <= ep[5] for ep in self.episodes)

    def _as_slow(self, step: int, detector: str, group: list[Candidate[T]]) -> set[str]:
        """The ranks as slow at `step` as the flagged ones, where the job's median rank is: then a slowdown of
        every rank that only some ranks' thresholds caught (a shared 1.3x step against tight and loose
        baselines), not theirs alone. Empty where the flagged ranks stand out from their peers."""
        peers = self.levels.get(step, {}).get(detector, {})
        usual = _median([_oriented(detector, x.expected) for x in group if x.expected and x.expected > 0])
        flagged = _median([_oriented(detector, x.value) for x in group if x.value > 0])
        median = _median(list(peers.values()))
        if (len(peers) < self.config.slowdown_job_min_ranks or usual is None or flagged is None
                or median is None or median < flagged + _AS_SLOW or median < usual + _ELEVATED):
            return set()
        return {m for m, v in peers.items() if v >= flagged + _AS_SLOW}

    def _explained(self, ts: float, step: int) -> str | None:
        """The pause the job announced just before this slowdown: the slowdown is at the first or second step
        logged after the announcement, within `pause_explains_s`. Used up (one pause, one slowdown: its step
        time and throughput findings alike)."""
        if self.explained and self.explained[0] == step:
            return str(self.explained[1])
        steps = list(self.job_steps)
        for p in sorted(self.pauses, key=lambda x: (-self._follows(x)[0], -x[0])):  # the latest first
            follows, dated = self._follows(p)
            after = bisect.bisect_left(steps, step) - bisect.bisect_right(steps, follows)  # steps logged between
            in_time = not dated or p[0] <= ts <= p[0] + self.config.pause_explains_s
            if in_time and follows < step and after <= 1:
                self.pauses.remove(p)
                self.explained = [step, str(p[1])]
                return str(p[1])
        return None


def _oriented(detector: str, v: float) -> float:
    return _SIGN[detector] * math.log(v)


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[len(s) // 2]
