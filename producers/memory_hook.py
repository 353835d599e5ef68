"""GPU and host memory for the in-training hook (`TrainingMonitor(..., gpu_memory=True)`, producers/training.py).

- `torch_memory_stats`: the CUDA caching allocator's view of the current device (`allocated_bytes`,
  `reserved_bytes`, `active_bytes`, `inactive_split_bytes`, `num_alloc_retries`, `num_ooms`, and on request
  `peak_allocated_bytes` since the previous sample) plus the device's used/total memory (`cudaMemGetInfo`), as
  a GPU sample. Any function returning such a dict can stand in for it
  (tests run on CPU with an injected one).
- `HostMemoryTracker`: the process's resident memory and, with tracemalloc, the Python allocation sites that grew
  most since the last look: the Python side of a leak hunt.
"""

from __future__ import annotations

import functools
import os
import socket
import tracemalloc
from collections.abc import Callable
from typing import Any

StatsFn = Callable[[], dict[str, Any] | None]

_STATS = {"allocated_bytes": "allocated_bytes.all.current", "reserved_bytes": "reserved_bytes.all.current",
          "active_bytes": "active_bytes.all.current", "inactive_split_bytes": "inactive_split_bytes.all.current",
          "num_alloc_retries": "num_alloc_retries", "num_ooms": "num_ooms"}


def physical_gpu(ordinal: int, env: dict[str, str] | None = None) -> int:
    """The CUDA ordinal as the index NVML and nvidia-smi show, through CUDA_VISIBLE_DEVICES when it lists indices
    (set CUDA_DEVICE_ORDER=PCI_BUS_ID so that CUDA and NVML count GPUs in the same order)."""
    env = dict(os.environ) if env is None else env
    visible = [x.strip() for x in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    if ordinal < len(visible) and visible[ordinal].isdigit():
        return int(visible[ordinal])
    return ordinal


def cuda_in_use() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available() and torch.cuda.is_initialized())


def torch_memory_stats(device: int | None = None, reset_peak: bool = False) -> dict[str, Any] | None:
    """A GPU sample of the current CUDA device from torch's allocator; None when CUDA is not in use.

    `reset_peak`: also report `peak_allocated_bytes`, the most allocated since the previous sample, and reset
    torch's peak counters for the next one. A sample lands at one moment of a step; this is the step's peak,
    which a sampler every few seconds sees only by chance. It resets what `torch.cuda.max_memory_allocated()`
    returns, hence opt-in (`TrainingMonitor(memory_peaks=True)`)."""
    if not cuda_in_use():
        return None
    import torch

    dev = torch.cuda.current_device() if device is None else device
    stats = torch.cuda.memory_stats(dev)
    free, total = torch.cuda.mem_get_info(dev)
    out: dict[str, Any] = {"gpu": physical_gpu(dev), "mem_used_bytes": int(total - free),
                           "mem_total_bytes": int(total)}
    for name, key in _STATS.items():
        if key in stats:
            out[name] = int(stats[key])
    if reset_peak and "allocated_bytes.all.peak" in stats:
        out["peak_allocated_bytes"] = int(stats["allocated_bytes.all.peak"])
        torch.cuda.reset_peak_memory_stats(dev)
    return out


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux /proc; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None


class HostMemoryTracker:
    """Host RSS and the top growing Python allocation sites (tracemalloc) between two looks."""

    def __init__(self, frames: int = 1) -> None:
        self.started_here = not tracemalloc.is_tracing()
        if self.started_here:
            tracemalloc.start(frames)
        self.previous = tracemalloc.take_snapshot()

    def report(self, top: int = 10) -> dict[str, Any]:
        snapshot = tracemalloc.take_snapshot().filter_traces((
            tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")))
        diff = snapshot.compare_to(self.previous, "lineno")
        self.previous = snapshot
        growing = [d for d in diff if d.size_diff > 0][:top]
        return {"rss_bytes": rss_bytes(), "python_traced_bytes": tracemalloc.get_traced_memory()[0],
                "top_growth": [{"site": f"{d.traceback[0].filename}:{d.traceback[0].lineno}",
                                "size_diff_bytes": d.size_diff, "count_diff": d.count_diff, "size_bytes": d.size}
                               for d in growing]}

    def close(self) -> None:
        if self.started_here and tracemalloc.is_tracing():
            tracemalloc.stop()


class MemoryProbe:
    """When to take a GPU sample in the training loop, and how (the stats function and this host's name)."""

    def __init__(self, stats_fn: StatsFn | None, interval_s: float, host: str | None = None,
                 track_host: bool = False, peaks: bool = False) -> None:
        self.stats_fn = stats_fn or functools.partial(torch_memory_stats, reset_peak=peaks)
        self.interval_s = interval_s
        self.host = host or socket.gethostname()
        self.last: float | None = None
        self.tracker = HostMemoryTracker() if track_host else None

    def sample(self, now: float) -> dict[str, Any] | None:
        if self.last is not None and now - self.last < self.interval_s:
            return None
        data = self.stats_fn()
        if not data:
            return None
        self.last = now
        out = {"host": self.host, **data}
        if self.tracker is not None:
            rss = rss_bytes()
            if rss is not None:
                out["rss_bytes"] = rss
        return out

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
