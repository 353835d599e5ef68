"""How many members of a job are at or past a position, in O(log members): the cross-rank checks ask it for every
record ("has every rank reported this step, or are half of them well past it?"), and walking 4,096 ranks each time
made a job's analysis quadratic in its size."""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterable


class LatestIndex:
    """Each member's latest position (a step, a time bucket), kept sorted. Plain and picklable."""

    def __init__(self, items: Iterable[tuple[Hashable, int]] = ()) -> None:
        self.latest: dict[Hashable, int] = {}
        self._sorted: list[int] = []
        for member, pos in items:
            self.set(member, pos)

    def set(self, member: Hashable, pos: int) -> None:
        before = self.latest.get(member)
        if before == pos:
            return
        if before is not None:
            del self._sorted[bisect.bisect_left(self._sorted, before)]
        self.latest[member] = pos
        bisect.insort(self._sorted, pos)

    def at_least(self, pos: int) -> int:
        """Members whose latest position is `pos` or beyond."""
        return len(self._sorted) - bisect.bisect_left(self._sorted, pos)

    def __len__(self) -> int:
        return len(self._sorted)
