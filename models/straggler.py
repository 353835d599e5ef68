"""Cross-rank step-level straggler detection: a rank whose step time is far above its peers' at the same step.

Each (step, rank, step_time) is collected per step. A step is judged once at least `min_ranks` ranks reported it
and either every known rank has, or it is stale (half the ranks are `stale_steps` ahead): then each rank's time is compared with the median of
all ranks at that step. A rank that reports after its step was judged (a straggler falls behind, so it often
does) is compared with that step's stored statistics. A member whose step goes back has resumed from a checkpoint:
the first to do so starts a new attempt (the old attempt's statistics of the repeated steps are dropped), and the
records of a member still in an ended attempt (read late) are not compared. No I/O, no Kafka.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rankwatch.models.latest_index import LatestIndex
from rankwatch.models.mad import MAD_TO_SIGMA
from rankwatch.models.training import RESTART_BACK_STEPS

T = TypeVar("T")  # whatever the caller needs back to build an anomaly (e.g. the record)


@dataclass
class StragglerConfig:
    ratio: float = 0.3  # at least 30% slower than the median rank ...
    k: float = 8.0  # ... and beyond k robust sigmas of the spread across ranks
    min_ranks: int = 3
    stale_steps: int = 5
    min_step: int = 5  # the first steps (compilation, warm-up) are not judged
    keep_steps: int = 2000  # judged steps whose statistics are kept for late reports
    # one finding per episode (a rank slow on consecutive records); a step under this ratio to the median rank
    # is raised only when the rank's next record is beyond the threshold too (a garbage collection, one batch)
    confirm_below: float = 1.5


@dataclass
class StragglerFinding(Generic[T]):
    rank: Hashable
    step: int
    value: float
    median: float
    threshold: float
    score: float
    ranks: int
    ref: T


class StepStragglerDetector(Generic[T]):
    def __init__(self, config: StragglerConfig | None = None) -> None:
        self.config = config or StragglerConfig()
        self.pending: dict[int, dict[Hashable, tuple[float, T]]] = {}  # step -> member -> (value, ref)
        self.judged: OrderedDict[int, tuple[float, float, int]] = OrderedDict()  # step -> (median, scale, n)
        self.latest: dict[Hashable, int] = {}  # member -> latest step reported
        # resumes from a checkpoint: the job's attempt, and each member's (a lagging member's records of an
        # attempt that has ended, read after the others resumed, are not compared with the new attempt's)
        self.attempt = 0
        self.attempts: dict[Hashable, int] = {}
        self.restarts = 0
        self.steps: dict[Hashable, deque] = {}  # member -> its last steps reported (episodes: its previous one)
        self.flagged_at: dict[Hashable, int] = {}  # member -> step of its last slow step (reported or ongoing)
        self.small_at: dict[Hashable, int] = {}  # member -> step of a small slow step waiting for its next
        # kept for speed, so that a record costs O(log ranks), not O(ranks): the latest steps of the current
        # attempt's members; the pending steps with min_ranks reports
        self._current = LatestIndex()
        self._eligible: set[int] = set()

    def add(self, rank: Hashable, step: int, value: float, ref: T) -> list[StragglerFinding[T]]:
        """`rank`: the member's key (a rank, or a node's local rank with its run folder)."""
        c = self.config
        attempt = self.attempts.setdefault(rank, self.attempt)
        resumed = step < self.latest.get(rank, step) - RESTART_BACK_STEPS
        if resumed:  # this member resumed
            attempt = self.attempts[rank] = attempt + 1
            self.latest[rank] = step
            if attempt > self.attempt:  # the first member of the job to: a new attempt
                self.attempt = attempt
                self._restart(step)
        self.latest[rank] = max(step, self.latest.get(rank, step))
        if resumed:
            self._reindex()  # members changed attempts: rare
        elif attempt == self.attempt:
            self._current.set(rank, self.latest[rank])
        self.steps.setdefault(rank, deque(maxlen=8)).append(step)
        out: list[StragglerFinding[T]] = []
        if attempt < self.attempt:
            return out  # from an attempt that has ended, read late
        if step < c.min_step:
            return out
        if step in self.judged:
            med, scale, n = self.judged[step]
            f = self._verdict(rank, step, value, ref, med, scale, n)
            return [f] if f else []
        bucket = self.pending.setdefault(step, {})
        bucket[rank] = (value, ref)
        if len(bucket) >= c.min_ranks:
            self._eligible.add(step)
        # Fewer than min_ranks: keep waiting, whatever else is true. When a worker catches up on a backlog it may
        # read one rank's partition far ahead of the others, so "every known rank" can be one rank.
        for s in sorted(self._eligible):
            if self._ready(s):
                out.extend(self._judge(s))
        while len(self.pending) > c.keep_steps:
            s = min(self.pending)
            del self.pending[s]  # a step that never gathered enough ranks
            self._eligible.discard(s)
        return out

    def _reindex(self) -> None:
        self._current = LatestIndex((r, s) for r, s in self.latest.items() if self.attempts.get(r, 0) == self.attempt)
        self._eligible = {s for s, b in self.pending.items() if len(b) >= self.config.min_ranks}

    def _restart(self, step: int) -> None:
        """The job resumed from a checkpoint: its steps from `step` on are run again. The first attempt's
        statistics of those steps must not judge the second's (its warm-up is every rank's), and its pending
        steps will not be completed."""
        for s in [s for s in self.judged if s >= step]:
            del self.judged[s]
        for s in [s for s in self.pending if s >= step]:
            del self.pending[s]
            self._eligible.discard(s)
        self.restarts += 1

    def _ready(self, step: int) -> bool:
        """Every member of the current attempt reported the step, or half of them are well past it."""
        n = len(self._current)
        if len(self.pending[step]) >= n:
            return True
        return self._current.at_least(step + self.config.stale_steps) * 2 >= n

    def _judge(self, step: int) -> list[StragglerFinding[T]]:
        bucket = self.pending.pop(step)
        self._eligible.discard(step)
        values = sorted(v for v, _ in bucket.values())
        n = len(values)
        med = _median(values)
        scale = max(MAD_TO_SIGMA * _median([abs(v - med) for v in values]), 0.01 * abs(med), 1e-12)
        self.judged[step] = (med, scale, n)
        while len(self.judged) > self.config.keep_steps:
            self.judged.popitem(last=False)
        return [f for r, (v, ref) in sorted(bucket.items())
                if (f := self._verdict(r, step, v, ref, med, scale, n)) is not None]

    def _verdict(self, rank: Hashable, step: int, value: float, ref: T, med: float, scale: float, n: int
                 ) -> StragglerFinding[T] | None:
        c = self.config
        threshold = max(med * (1 + c.ratio), med + c.k * scale)
        if value > threshold and self._new_episode(rank, step, value / med if med > 0 else math.inf):
            return StragglerFinding(rank, step, value, med, threshold, (value - med) / scale, n, ref)
        return None

    def _new_episode(self, rank: Hashable, step: int, ratio: float) -> bool:
        """Report this slow step? Not when the rank's previous record was slow too (the episode was reported),
        nor a step under `confirm_below` x the median unless its previous one was beyond the threshold too."""
        steps = self.steps.get(rank, ())
        prev = max((s for s in steps if s < step), default=None)
        if prev is not None and self.flagged_at.get(rank) == prev:
            self.flagged_at[rank] = step  # it goes on
            return False
        if ratio < self.config.confirm_below and (prev is None or self.small_at.get(rank) != prev):
            self.small_at[rank] = step
            return False
        self.flagged_at[rank] = step
        return True

    def save_state(self) -> dict[str, Any]:
        return {"judged": [[s, *v] for s, v in self.judged.items()],
                "latest": {str(r): s for r, s in self.latest.items()},  # JSON keys are strings
                "attempt": self.attempt, "attempts": {str(r): a for r, a in self.attempts.items()},
                "steps": {str(r): list(h) for r, h in self.steps.items()},
                "flagged_at": {str(r): s for r, s in self.flagged_at.items()},
                "small_at": {str(r): s for r, s in self.small_at.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        self.judged = OrderedDict((int(s), (m, sc, int(n))) for s, m, sc, n in state.get("judged", []))
        self.latest = {str(r): int(s) for r, s in state.get("latest", {}).items()}  # members are strings
        self.attempt = int(state.get("attempt", 0))
        self.attempts = {str(r): int(a) for r, a in state.get("attempts", {}).items()}
        self.steps = {str(r): deque((int(x) for x in h), maxlen=8) for r, h in state.get("steps", {}).items()}
        self.flagged_at = {str(r): int(x) for r, x in state.get("flagged_at", {}).items()}
        self.small_at = {str(r): int(x) for r, x in state.get("small_at", {}).items()}
        self._reindex()


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
