"""Job-wide slowdowns: one finding for a pause that every rank shows, not one per rank.

In synchronous training all ranks wait for one another at every collective, so a checkpoint being written, an
evaluation, a slow filesystem or a straggler lengthens the same step on every rank. Each rank's own detector
(models/training.py) then flags that step: a 4,096-rank job would raise 4,096 step-time and 4,096 throughput
findings for one checkpoint. This groups the per-rank findings of a step once every rank of the job has
reported it (or `hold_s` of the job's clock has passed: a rank that died must not hold the verdict):

- flagged on at least `share` of the job's ranks (and `min_ranks`): one job-wide finding (rank None) naming
  how many ranks showed it. Findings within `merge_steps` steps of it join it: ranks whose confirmation rule
  flagged the step after.
- fewer: each rank's finding as it was (a slow data loader on one node, a rank whose own time is its own).
- a job-wide slowdown that follows a pause the job announced (a checkpoint save, an evaluation: on rank 0's log
  only, typically) is reported as `info`: expected, not alerting. One announcement explains one slowdown.

Plain class: no Kafka, files or Prometheus. Members are ranks (or, for logs that name none, their files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class SlowdownConfig:
    slowdown_job_share: float = 0.5  # share of the job's ranks that must show a step's slowdown for one finding
    slowdown_job_min_ranks: int = 2
    slowdown_hold_s: float = 60.0  # job-clock seconds a step waits for the job's slower ranks to report it
    slowdown_merge_steps: int = 2  # later steps' findings within this many steps join a job-wide one
    pause_explains_s: float = 3600.0  # an announced pause explains a job-wide slowdown up to this long after it


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
    latest: dict[str, int] = field(default_factory=dict)  # member -> latest step reported
    pending: dict[int, list[Candidate[T]]] = field(default_factory=dict)  # step -> its findings
    episodes: dict[str, int] = field(default_factory=dict)  # detector -> last step of its job-wide episode
    pauses: list[list[Any]] = field(default_factory=list)  # [ts, what] announced, not yet used
    absorbed: int = 0  # per-rank findings folded into job-wide ones
    explained: list[Any] = field(default_factory=list)  # [step, pause] last explained (for every signal of it)

    def progress(self, member: str, step: int) -> None:
        self.latest[member] = step

    def add(self, c: Candidate[T]) -> None:
        self.latest.setdefault(c.member, c.step)
        self.pending.setdefault(c.step, []).append(c)

    def announce(self, ts: float, what: str) -> None:
        self.pauses.append([ts, what])
        del self.pauses[:-16]  # a handful is all a slowdown can be explained by

    def decide(self, now: float) -> tuple[list[JobFinding[T]], list[Candidate[T]]]:
        """Steps every member has passed, or whose findings waited `hold_s` of the job's clock: (job-wide
        findings, per-rank findings to report as they are)."""
        if not self.pending:
            return [], []
        done = min(self.latest.values())
        jobs: list[JobFinding[T]] = []
        ranks: list[Candidate[T]] = []
        for step in sorted(self.pending):
            cands = self.pending[step]
            if step > done and now - min(c.ts for c in cands) < self.config.slowdown_hold_s:
                break  # later steps wait too: episodes are decided in step order
            del self.pending[step]
            for detector in sorted({c.detector for c in cands}):
                mine = [c for c in cands if c.detector == detector]
                j, r = self._judge(step, detector, mine)
                jobs += j
                ranks += r
        return jobs, ranks

    def _judge(self, step: int, detector: str, cands: list[Candidate[T]]) -> tuple[list[JobFinding[T]],
                                                                                   list[Candidate[T]]]:
        c = self.config
        n = len(self.latest)
        members = sorted({x.member for x in cands})
        last = self.episodes.get(detector)
        if last is not None and last < step <= last + c.slowdown_merge_steps:
            self.episodes[detector] = step  # the same job-wide slowdown, seen a record later on these ranks
            self.absorbed += len(cands)
            return [], []
        if n < c.slowdown_job_min_ranks or len(members) < max(c.slowdown_job_min_ranks,
                                                               math.ceil(c.slowdown_job_share * n)):
            return [], cands
        self.episodes[detector] = step
        self.absorbed += len(cands) - 1
        values = sorted(x.value for x in cands)
        expected = sorted(x.expected for x in cands if x.expected is not None)
        first = min(cands, key=lambda x: x.ts)
        return [JobFinding(detector, step, members, n, values[len(values) // 2],
                           expected[len(expected) // 2] if expected else None, first,
                           "critical" if any(x.severity == "critical" for x in cands) else "warning",
                           self._explained(first.ts, step))], []

    def _explained(self, ts: float, step: int) -> str | None:
        """The announced pause just before this slowdown, used up (one pause, one slowdown: its step time and
        throughput findings alike)."""
        if self.explained and self.explained[0] == step:
            return str(self.explained[1])
        before = [p for p in self.pauses if p[0] <= ts and ts - p[0] <= self.config.pause_explains_s]
        if not before:
            return None
        p = max(before, key=lambda x: x[0])
        self.pauses = [x for x in self.pauses if x[0] > p[0]]
        self.explained = [step, str(p[1])]
        return str(p[1])
