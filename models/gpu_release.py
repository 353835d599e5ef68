"""A job's processes gone, seen from its GPUs: every GPU it used released its memory at about the same moment.

In the logs a hang and a stopped job look alike: the ranks stop printing. On the GPUs they differ. Hung
processes are alive inside a collective and hold their memory; the processes of a cancelled, preempted or
killed job exit, and the driver frees their memory within a second or two. So where GPUs are sampled
(`producer --gpu` running per node, outside the job, so it outlives it), all of the job's GPUs released
together is a stop, as Slurm's banner would be. One GPU (or one node's) released while the others hold
their memory is a crashed rank whose peers now wait for it: a hang, not a stop. (A crash that tears the
whole job down within seconds, e.g. a single-node job or srun's `--kill-on-bad-exit`, is a stop here too: no
rank is left hanging, and the crash is the log's finding.)

Input, from stage 1 (processors/memory_stage.py): each GPU's `gpu_mem` summaries (its peak share per bucket:
at `busy_share` or more it was in use then) and `gpu_exit` (models/gpu_memory.py: its used memory stayed far
under its recent peaks for 10 s, and NVML listed no process holding memory, dated when it fell). Plain data,
no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, NamedTuple


@dataclass
class GpuReleaseConfig:
    busy_share: float = 0.2  # a GPU holding this share of its memory is in use (the exit test needs a fifth)
    together_s: float = 60.0  # a job's GPUs released within this of one another: stopped together


class Release(NamedTuple):
    at: float  # when the last of the job's GPUs was released
    together: bool  # all within `together_s` of one another
    gpus: int  # how many GPUs the job was using
    ref: tuple[str, int]  # the sample that showed the last release (file, offset)


class GpuRelease:
    """Which of a job's GPUs are in use and which were released; `stop` says when all were."""

    def __init__(self, config: GpuReleaseConfig | None = None) -> None:
        self.config = config or GpuReleaseConfig()
        self.busy: dict[str, float] = {}  # "host/gpu" -> the latest time it held memory
        self.exits: dict[str, float] = {}  # "host/gpu" -> the latest time its process exited
        self.refs: dict[str, tuple[str, int]] = {}  # "host/gpu" -> the sample that showed that exit
        self.ranks: dict[str, int] = {}  # "host/gpu" -> rank, where the sampler mapped it
        self.declared = -math.inf  # the latest release applied (`declare`): GPUs used since are the job's

    def in_use(self, gpu: str, ts: float, rank: int | None = None, *, share: float) -> None:
        if rank is not None:
            self.ranks[gpu] = rank
        if share >= self.config.busy_share and ts > self.busy.get(gpu, -math.inf):
            self.busy[gpu] = ts

    def exited(self, gpu: str, ts: float, rank: int | None = None, ref: tuple[str, int] = ("", -1)) -> None:
        if rank is not None:
            self.ranks[gpu] = rank
        if ts >= self.exits.get(gpu, -math.inf):
            self.exits[gpu], self.refs[gpu] = ts, ref

    def _mine(self) -> list[str]:
        """The job's GPUs: those in use since its last release (a restart's new processes)."""
        return [g for g, t in self.busy.items() if t > self.declared]

    def _all_released(self, mine: list[str]) -> bool:
        return bool(mine) and all(self.exits.get(g, -math.inf) >= self.busy[g] for g in mine)

    def released(self) -> bool:
        """Has every GPU the job used since its last release been released (declared or not)?"""
        return self._all_released(self._mine())

    def stop(self, ranks: Collection[int]) -> Release | None:
        """The job's release not yet declared, when every GPU it used since the last one has been released, and
        they are all of `ranks` (the ranks the job's collectives know; none known: nothing to compare, no stop):
        mapped GPUs must cover them, unmapped ones be as many. A sampler on some nodes only sees those nodes'
        ranks die, which may be a crash the others hang on."""
        mine = self._mine()
        if not ranks or not self._all_released(mine):
            return None
        mapped = {self.ranks[g] for g in mine if g in self.ranks}
        if len(mapped) == len(mine):
            if not all(r in mapped for r in ranks):
                return None
        elif len(mine) < len(ranks):
            return None
        last = max(mine, key=lambda g: self.exits[g])
        at = self.exits[last]
        return Release(at, at - min(self.exits[g] for g in mine) <= self.config.together_s, len(mine),
                       self.refs.get(last, ("", -1)))

    def declare(self, at: float) -> None:
        """The release at `at` was applied: the GPUs in use after it are the next attempt's."""
        self.declared = max(self.declared, at)

    def save_state(self) -> dict[str, Any]:
        return {"busy": self.busy, "exits": self.exits, "refs": {g: list(r) for g, r in self.refs.items()},
                "ranks": self.ranks, "declared": self.declared if math.isfinite(self.declared) else None}

    def load_state(self, state: dict[str, Any]) -> None:
        self.busy = {str(k): float(v) for k, v in (state.get("busy") or {}).items()}
        self.exits = {str(k): float(v) for k, v in (state.get("exits") or {}).items()}
        self.refs = {str(k): (str(v[0]), int(v[1])) for k, v in (state.get("refs") or {}).items()}
        self.ranks = {str(k): int(v) for k, v in (state.get("ranks") or {}).items()}
        d = state.get("declared")
        self.declared = -math.inf if d is None else float(d)
