"""The source line of each recent collective op, for stage 2's findings to name.

Stage 2 takes every op of a job (~50,000/s per worker at the target load) and names a source line only in a
finding (a few per hour). Keeping a bounded (comm, opCount, rank) -> line table by inserting and evicting each
op cost ~5% of a worker's CPU (measured: bench/bench_worker_capacity.py with py-spy). Here a batch's columns are
kept as they came, and one batch is indexed only when a finding first looks into it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

Ref = tuple[str, int]  # (file, offset)


class _Chunk:
    __slots__ = ("comms", "ns", "ranks", "files", "offsets", "index")

    def __init__(self, comms: list[str], ns: list[int], ranks: list[int], files: list[str],
                 offsets: list[int]) -> None:
        self.comms, self.ns, self.ranks, self.files, self.offsets = comms, ns, ranks, files, offsets
        self.index: dict[tuple[str, int, int], int] | None = None

    def find(self, key: tuple[str, int, int]) -> Ref | None:
        if self.index is None:  # a later row of the same op wins, as a later insert into a table would
            self.index = {k: i for i, k in enumerate(zip(self.comms, self.ns, self.ranks, strict=True))}
        i = self.index.get(key)
        return None if i is None else (self.files[i], self.offsets[i])


class RecentRefs:
    """(comm, opCount, rank) -> (file, offset) over at least the latest `keep` op rows (a replayed op counts
    twice): a late op is judged within seconds of arriving, so older ones are never asked for."""

    def __init__(self, keep: int = 65536) -> None:
        self.keep = max(1, keep)
        self.chunks: deque[_Chunk] = deque()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, comms: list[str], ns: list[int], ranks: list[int], files: list[str], offsets: list[int]) -> None:
        """A batch's ops as columns of equal length (the lists are kept, not copied: the caller lets go of them)."""
        if not comms:
            return
        self.chunks.append(_Chunk(comms, ns, ranks, files, offsets))
        self.size += len(comms)
        while self.size - len(self.chunks[0].comms) >= self.keep:
            self.size -= len(self.chunks.popleft().comms)

    def get(self, key: tuple[str, int, int], default: Ref | None = None) -> Ref | None:
        for chunk in reversed(self.chunks):  # newest first: the op's latest line
            found = chunk.find(key)
            if found is not None:
                return found
        return default

    def rows(self, last: int) -> list[list[Any]]:
        """The latest `last` ops as [comm, opCount, rank, file, offset] rows, oldest first (saved state)."""
        out: list[list[Any]] = []
        for chunk in reversed(self.chunks):
            out.extend(reversed([list(r) for r in zip(chunk.comms, chunk.ns, chunk.ranks, chunk.files,
                                                      chunk.offsets, strict=True)]))
            if len(out) >= last:
                break
        return out[:last][::-1]

    @classmethod
    def from_rows(cls, rows: list[list[Any]], keep: int = 65536) -> RecentRefs:
        refs = cls(keep)
        if rows:
            cols = list(zip(*((str(c), int(n), int(r), str(f), int(o)) for c, n, r, f, o in rows), strict=True))
            refs.add(*(list(c) for c in cols))
        return refs


__all__ = ["RecentRefs"]
