"""Seeded simulator of GPU memory samples as a sampler sees a training job: for the memory detectors' quality
measurements (bench/bench_memory.py, tests/test_memory_quality.py) and demos.

What a real job shows, modelled per step (vectorised over samples):
- a per-step sawtooth: activations rise during the forward pass (to a per-step peak that varies a few percent
  with the batch, now and then a larger batch), fall during the backward pass, a small optimizer bump;
- steps of 0.6-6 s with jitter, sampled every 1-5 s, so samples land at arbitrary phases of the sawtooth;
- the CUDA caching allocator: in "caching" mode NVML sees the reserved memory, a plateau that only grows (in
  granules of 2, 20 or 64 MiB: the segment sizes of small, mid-size and leaked tensors) and is sometimes released (empty_cache after evaluation); in
  "releasing" mode (expandable segments, other frameworks) NVML sees the sawtooth itself;
- job start (weights loaded over seconds, the allocator settling over a minute), evaluation phases every
  15-30 min (smaller activations, extra buffers), checkpoint saves every 20-40 min (staging buffers for
  10-30 s), the CUDA context, small noise;
- faults: a leak of persistent memory (a fixed amount per step), a fast ramp, fragmentation growth (reserved
  drifting above what is allocated, split blocks, allocation retries near the limit), one GPU of a job holding
  more memory than its peers;
- the OOM: the first step whose needed memory exceeds the total; the process dies and NVML then shows the bare
  driver footprint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIB = float(2**20)
GIB = float(2**30)
TOTALS = (40960 * MIB, 81559 * MIB)  # A100-40GB, A100/H100-80GB as NVML reports them
START_TS = 1_767_225_600.0  # 2026-01-01T00:00:00Z

LEAK_TIERS = {  # name -> (rate bytes/s, minutes from leak start to OOM, leak start (s), sampling intervals (s))
    "10MB/min": (10 * MIB / 60, (240, 480), (0, 0), (5.0, 10.0)),
    "60MB/min": (60 * MIB / 60, (90, 180), (0, 0), (1.0, 5.0)),
    "10MB/s": (10 * MIB, (10, 33), (600, 1200), (1.0, 2.0)),
    "50MB/s": (50 * MIB, (3.3, 10), (300, 900), (1.0, 2.0)),
    "200MB/s": (200 * MIB, (1.7, 3.3), (300, 900), (1.0, 2.0)),
}


@dataclass
class GpuRun:
    host: str
    gpu: int
    rank: int | None
    samples: list[dict[str, Any]]
    oom_ts: float | None = None
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobProfile:
    """The shape of one job's memory: shared by all GPUs of a job (same model, same steps)."""

    total: float
    ctx: float
    step_s: float
    fwd_frac: float
    amp: float  # activation peak per step
    jitter: float  # per-step peak variation (fraction of amp)
    allocator: str  # caching | releasing
    granule: float
    interval: float
    settle: float
    settle_tau: float
    load_s: float
    eval_every: float
    eval_len: float
    eval_scale: float
    eval_shift: float
    ckpt_every: float
    ckpt_len: float
    ckpt_bump: float


def job_profile(rng: np.random.Generator, intervals: tuple[float, ...] = (1.0, 1.0, 2.0, 5.0)) -> JobProfile:
    total = TOTALS[int(rng.random() < 0.7)]
    return JobProfile(
        total=total, ctx=rng.uniform(300, 800) * MIB, step_s=rng.uniform(0.6, 6.0), fwd_frac=rng.uniform(0.3, 0.5),
        amp=min(rng.uniform(2, 12) * GIB, 0.3 * total), jitter=rng.uniform(0.01, 0.05),
        allocator="caching" if rng.random() < 0.5 else "releasing",
        granule=float(rng.choice([2 * MIB, 20 * MIB, 64 * MIB])), interval=float(rng.choice(intervals)),
        settle=rng.uniform(0.2, 1.0) * GIB, settle_tau=rng.uniform(20, 90), load_s=rng.uniform(5, 30),
        eval_every=rng.uniform(900, 1800), eval_len=rng.uniform(60, 180), eval_scale=rng.uniform(0.3, 1.1),
        eval_shift=rng.uniform(0, 0.5) * GIB, ckpt_every=rng.uniform(1200, 2400), ckpt_len=rng.uniform(10, 30),
        ckpt_bump=rng.uniform(0.1, 1.0) * GIB)


def headroom_peak(p: JobProfile) -> float:
    """The most a stable step can need above its persistent memory (for choosing a safe base)."""
    return p.amp * (1 + 2 * p.jitter) * max(1.0, p.eval_scale) + max(p.ckpt_bump, p.eval_shift) + p.settle


@dataclass
class Faults:
    leak_rate: float = 0.0  # bytes/s of persistent memory, accrued per step
    leak_start: float = 0.0  # seconds from the start of sampling
    frag_end: float = 0.0  # fragmentation (reserved above need, as a fraction) reached at frag_over_s
    frag_over_s: float = 3600.0
    extra: float = 0.0  # persistent bytes above the job's base (the imbalanced GPU)


def simulate_gpu(p: JobProfile, base: float, duration: float, rng: np.random.Generator, faults: Faults,
                 *, from_job_start: bool = True, allocator_stats: bool = False, steps: np.ndarray | None = None,
                 host: str = "node000", gpu: int = 0, rank: int | None = None, hook_peaks: bool = False) -> GpuRun:
    """One GPU's samples over `duration` seconds (sampling starts with the job, or mid-run when not
    `from_job_start`). `base`: persistent bytes (weights, optimizer state) besides the context. `hook_peaks`:
    the allocator stats carry `peak_allocated_bytes`, the most allocated since the previous sample (the hook's
    `memory_peaks`)."""
    if steps is None:
        steps = step_starts(p, duration, rng)
    load = p.load_s if from_job_start else 0.0
    k = np.arange(len(steps) - 1)
    s0, d = steps[:-1], np.diff(steps)
    amp = p.amp * (1 + rng.uniform(-p.jitter, p.jitter, len(k)))
    amp[rng.random(len(k)) < 0.01] = p.amp * (1 + 2 * p.jitter)  # now and then the longest batch
    in_eval = (s0 % p.eval_every) > p.eval_every - p.eval_len
    in_ckpt = (s0 % p.ckpt_every) > p.ckpt_every - p.ckpt_len
    amp = np.where(in_eval, amp * p.eval_scale, amp)
    settle = p.settle * (1 - np.exp(-np.maximum(s0 - load, 0) / p.settle_tau)) if from_job_start else p.settle
    persist = (base + faults.extra + settle + faults.leak_rate * np.maximum(s0 - faults.leak_start, 0)
               + np.where(in_eval, p.eval_shift, 0.0) + np.where(in_ckpt, p.ckpt_bump, 0.0))
    need = persist + amp  # the step's peak of allocated memory
    frag = np.zeros(len(k))
    if faults.frag_end:
        frag = 0.03 + (faults.frag_end - 0.03) * np.clip(s0 / faults.frag_over_s, 0, 1)
    if p.allocator == "caching":
        seg = np.ceil(need * (1 + frag) / p.granule) * p.granule
        reserved = _cached(seg, in_eval, rng)
        oom_step = np.nonzero(seg + p.ctx > p.total)[0]
    else:
        reserved = need * (1 + frag)
        oom_step = np.nonzero(need * (1 + frag) + p.ctx > p.total)[0]
    oom_ts, oom_cause = None, None
    if len(oom_step):
        i = int(oom_step[0])
        oom_ts = float(s0[i] + p.fwd_frac * d[i])
        oom_cause = "checkpoint" if in_ckpt[i] else "evaluation" if in_eval[i] else "step"
    # samples
    n = int(duration / p.interval)
    t = np.arange(n) * p.interval + rng.uniform(-0.05, 0.05, n) * p.interval
    t = np.clip(t, 0, None)
    if oom_ts is not None:
        t = t[t < oom_ts]
    idx = np.clip(np.searchsorted(steps, t, side="right") - 1, 0, len(k) - 1)
    phase = np.clip((t - s0[idx]) / d[idx], 0, 1)
    f = p.fwd_frac
    shape = np.where(phase < f, phase / f, np.where(phase < 0.9, 1 - 0.9 * (phase - f) / (0.9 - f),
                                                    0.1 + 0.05 * np.sin(np.pi * (phase - 0.9) / 0.1)))
    loading = t < load
    alloc = np.where(loading, base * t / max(load, 1e-9), persist[idx] + amp[idx] * shape)
    if p.allocator == "caching":
        res = np.where(loading, alloc, np.maximum(reserved[idx], alloc))
        used = np.minimum(p.ctx + res + rng.integers(0, 3, len(t)) * MIB, p.total)
    else:
        res = alloc * (1 + frag[idx]) + rng.uniform(0, 64, len(t)) * MIB
        used = p.ctx + res
    peak_alloc = _interval_peaks(t, alloc, s0 + f * d, need) if allocator_stats and hook_peaks else None
    retries = np.cumsum((res + p.ctx > 0.96 * p.total) & (rng.random(len(t)) < 0.05)) if faults.frag_end else None
    samples = []
    for i in range(len(t)):
        s = {"ts": round(START_TS + float(t[i]), 3), "host": host, "gpu": gpu, "mem_used_bytes": int(used[i]),
             "mem_total_bytes": int(p.total)}
        if rank is not None:
            s["rank"] = rank
        if allocator_stats:
            s.update(allocated_bytes=int(alloc[i]), reserved_bytes=int(res[i]),
                     active_bytes=int(alloc[i] + 8 * MIB),
                     inactive_split_bytes=int(max(0.0, 0.7 * (res[i] - alloc[i])) * (frag[idx[i]] > 0.05)),
                     num_alloc_retries=int(retries[i]) if retries is not None else 0, num_ooms=0)
            if peak_alloc is not None:
                s["peak_allocated_bytes"] = int(peak_alloc[i])
        samples.append(s)
    if oom_ts is not None:  # the process died: the driver's footprint is all that is left
        for j in range(1, 4):
            samples.append({"ts": round(START_TS + oom_ts + j * p.interval, 3), "host": host, "gpu": gpu,
                            "mem_used_bytes": int(300 * MIB), "mem_total_bytes": int(p.total),
                            **({"rank": rank} if rank is not None else {})})
    return GpuRun(host, gpu, rank, samples, None if oom_ts is None else START_TS + oom_ts,
                  {"oom_cause": oom_cause} if oom_cause else {})


def _interval_peaks(t: np.ndarray, alloc: np.ndarray, peak_t: np.ndarray, need: np.ndarray) -> np.ndarray:
    """The most allocated between each sample and the previous one (torch's peak counter, reset at each
    sample): the allocations at both ends and the peaks of the steps in between (`peak_t`: when each peaks)."""
    out = np.maximum(alloc, np.concatenate([alloc[:1], alloc[:-1]]))
    j = np.searchsorted(peak_t, t, side="right")  # steps peaking at or before each sample
    lo = np.concatenate([[0], j[:-1]])
    for i in np.nonzero(j > lo)[0]:
        out[i] = max(out[i], float(need[lo[i]:j[i]].max()))
    return out


def step_starts(p: JobProfile, duration: float, rng: np.random.Generator) -> np.ndarray:
    n = int(duration / p.step_s * 1.2) + 10
    d = p.step_s * np.clip(1 + 0.03 * rng.standard_normal(n), 0.8, 1.3)
    return np.concatenate([[p.load_s * 0], np.cumsum(d)]) + 0.0


def _cached(seg: np.ndarray, in_eval: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Reserved memory under a caching allocator: the running maximum of what steps needed, released to the
    current need when a framework empties the cache after evaluation (30% of evaluations)."""
    out = np.empty_like(seg)
    cur = 0.0
    released = rng.random(len(seg)) < 0.3
    for i in range(len(seg)):
        if i and in_eval[i - 1] and not in_eval[i] and released[i]:
            cur = seg[i]
        cur = max(cur, seg[i])
        out[i] = cur
    return out


# ---- scenarios -----------------------------------------------------------------------------------------------
def stable_run(seed: int, duration: float = 7200.0, hook_peaks: bool = False) -> GpuRun:
    rng = np.random.default_rng([seed, 1])
    p = job_profile(rng)
    peak_frac = rng.uniform(0.5, 0.93)
    base = peak_frac * p.total - p.ctx - headroom_peak(p)
    base = max(base, 0.05 * p.total)
    run = simulate_gpu(p, base, duration, rng, Faults(), allocator_stats=bool(rng.random() < 0.5),
                       hook_peaks=hook_peaks)
    run.labels = {"kind": "stable", "allocator": p.allocator, "interval": p.interval, "peak_frac": peak_frac}
    return run


def leak_run(seed: int, tier: str, hook_peaks: bool = False) -> GpuRun:
    """A job that leaks at the tier's rate from `leak start` until it runs out of memory: slow leaks from the
    job's start (hours of samples, at the 5-10 s intervals production samplers use), fast ones after a stable
    phase. The headroom is set so that the earliest a step can fail (the longest batch during a checkpoint)
    is the tier's minutes after the leak began. `hook_peaks`: see simulate_gpu."""
    rate, minutes, start, intervals = LEAK_TIERS[tier]
    rng = np.random.default_rng([seed, 2, list(LEAK_TIERS).index(tier)])
    p = job_profile(rng, intervals)
    to_oom = rng.uniform(*minutes) * 60
    leak_start = rng.uniform(*start)
    need_max = p.amp * (1 + 2 * p.jitter) * max(1.0, p.eval_scale) + max(p.ckpt_bump, p.eval_shift)
    base = p.total - p.ctx - need_max - rate * to_oom - p.settle
    if p.allocator == "caching":
        base -= p.granule
    base = max(base, 0.05 * p.total)
    duration = leak_start + to_oom * 1.5 + 120
    run = simulate_gpu(p, base, duration, rng, Faults(leak_rate=rate, leak_start=leak_start),
                       allocator_stats=bool(rng.random() < 0.5), hook_peaks=hook_peaks)
    run.labels = {**run.labels, "kind": "leak", "tier": tier, "rate": rate, "leak_start": START_TS + leak_start,
                  "allocator": p.allocator, "interval": p.interval}
    return run


def ramp_run(seed: int) -> GpuRun:
    """A fast OOM ramp: memory blows up at 0.25-1 GiB/s (a runaway cache, a sequence-length jump)."""
    rng = np.random.default_rng([seed, 3])
    p = job_profile(rng, (1.0,))
    rate = rng.uniform(0.25, 1.0) * GIB
    start = rng.uniform(300, 600)
    headroom = rng.uniform(20, 40) * GIB
    base = max(p.total - p.ctx - p.amp * (1 + 2 * p.jitter) - p.settle - headroom, 0.05 * p.total)
    run = simulate_gpu(p, base, start + 300, rng, Faults(leak_rate=rate, leak_start=start))
    run.labels = {**run.labels, "kind": "ramp", "rate": rate, "leak_start": START_TS + start, "interval": p.interval}
    return run


def fragmentation_run(seed: int) -> GpuRun:
    rng = np.random.default_rng([seed, 4])
    p = job_profile(rng, (1.0, 2.0))
    p.allocator = "caching"
    frag_end = rng.uniform(0.35, 0.6)
    over = rng.uniform(1800, 3600)
    base = max(0.75 * p.total / (1 + frag_end) - p.ctx - headroom_peak(p), 0.05 * p.total)
    run = simulate_gpu(p, base, over + 600, rng, Faults(frag_end=frag_end, frag_over_s=over),
                       allocator_stats=True)
    run.labels = {"kind": "fragmentation", "frag_end": frag_end, "over_s": over, "interval": p.interval}
    return run


def imbalance_job(seed: int, imbalanced: bool = True, duration: float = 1200.0) -> list[GpuRun]:
    """A job of 8 or 16 GPUs on 1-2 hosts; with `imbalanced`, one GPU holds 12-30% of total memory more."""
    rng = np.random.default_rng([seed, 5, int(imbalanced)])
    p = job_profile(rng, (1.0, 2.0))
    n = int(rng.choice([8, 16]))
    steps = step_starts(p, duration, rng)
    victim = int(rng.integers(n))
    gap = rng.uniform(0.12, 0.30) * p.total if imbalanced else 0.0
    base = max(rng.uniform(0.4, 0.85) * p.total - gap - p.ctx - headroom_peak(p), 0.05 * p.total)
    runs = []
    for g in range(n):
        own = np.random.default_rng([seed, 6, g, int(imbalanced)])
        extra = gap if g == victim else 0.0
        jitter = own.uniform(-0.015, 0.015) * p.total
        runs.append(simulate_gpu(p, max(base + jitter, 0.0), duration, own, Faults(extra=extra),
                                 steps=steps + own.uniform(0, 0.05), host=f"node{g // 8:03d}", gpu=g % 8,
                                 rank=g))
    for r in runs:
        r.labels = {"kind": "imbalance" if imbalanced else "balanced", "victim": f"node{victim // 8:03d}/{victim % 8}",
                    "gap_frac": gap / p.total, "interval": p.interval}
    return runs


def to_records(runs: list[GpuRun], job: str = "memjob", file: str = "") -> list:
    """Samples as pipeline records, merged by event time (as a worker or `analyze` would see them)."""
    from rankwatch.records import Record

    out = []
    for r in runs:
        for i, s in enumerate(r.samples):
            data = {k: v for k, v in s.items() if k not in ("ts", "rank")}
            out.append(Record("gpu", job, s.get("rank"), s["ts"], file or f"{r.host}-gpu{r.gpu}.jsonl", i, data))
    out.sort(key=lambda rec: rec.ts)
    return out


def write_jsonl(run: GpuRun, path: str) -> int:
    import orjson

    with open(path, "wb") as fh:
        for s in run.samples:
            fh.write(orjson.dumps(s) + b"\n")
    return len(run.samples)


__all__ = ["GpuRun", "JobProfile", "Faults", "LEAK_TIERS", "simulate_gpu", "stable_run", "leak_run", "ramp_run",
           "fragmentation_run", "imbalance_job", "to_records", "write_jsonl"]
