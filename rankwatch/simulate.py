"""Seeded simulator of a multi-rank training job, with labelled faults, writing logs in rankwatch's formats.

Used by `rankwatch demo`, the tests, the quality evaluation and the benchmarks. Noise is realistic rather
than Gaussian: multiplicative Student-t (df=6) jitter on loss, log-normal grad norms, so thresholds chosen on
it hold on real curves. Timing comes from a synchronous job's timeline (rankwatch/sim_collectives.py): every
rank's step time is the job's, a straggler shows in collective enqueue times, not in its own step time.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from rankwatch.sim_collectives import (
    RankIdentity,
    Timeline,
    build_timeline,
    coll_line,
    identities,
    init_line,
    watchdog_line,
)

# fault kind -> (signal it shows in, detector expected to catch it)
FAULT_KINDS = {
    "loss_spike": ("loss", "mad"),
    "grad_explosion": ("grad_norm", "mad"),
    "throughput_drop": ("throughput", "throughput"),
    "nonfinite": ("loss", "nonfinite"),
    "drift": ("loss", None),  # a slow upward drift: must NOT be flagged
    # collective timing (magnitude: straggler = lag in seconds on every op; slow_stream = interval factor)
    "straggler": ("collective_enqueue", "straggler"),
    "slow_stream": ("op_interval", "op_timing"),
    "hang": ("collective_progress", "hang"),
}


@dataclass
class Fault:
    kind: str
    rank: int
    step: int
    length: int = 1
    magnitude: float = 2.0
    stream: str = ""  # slow_stream: "tp" or "dp"


@dataclass
class Scenario:
    ranks: int = 8
    steps: int = 300
    seed: int = 0
    faults: list[Fault] = field(default_factory=list)
    start_ts: float = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    step_s: float = 0.5
    loss_noise: float = 0.03
    grad_noise: float = 0.12
    checkpoint_every: int = 100
    tp: int = 2  # tensor-parallel group size (TP comms of `tp` ranks, DP comms of ranks / tp)
    tp_ops: int = 4  # tensor-parallel all-reduces per step (half in forward, half in backward)
    dp_buckets: int = 3  # data-parallel gradient buckets per step
    grad_accum: int = 1  # micro-batches per step: TP ops in each, the DP buckets only in the last one's backward
    batch_cv: float = 0.0  # per DP rank and step, compute x exp(cv * N(0,1)): variable sequence lengths (TP shares)
    nccl_style: str = "2.18"  # NCCL init-line form: "2.14" (no commId), "2.18", "2.19" (ncclCommInitRank)
    step_drift: float = 0.0  # relative step-time growth over the run (normal drift)
    pauses: dict[int, float] = field(default_factory=dict)  # step -> seconds every rank pauses after it (eval)
    hiccups: list[Fault] = field(default_factory=list)  # one-off data-loader delays (must not alarm)
    watchdog_s: float = 600.0  # PyTorch's NCCL timeout: the watchdog lines come this long after a hang
    hang_tail: bool = True  # after a hang, GPU samples then the watchdog; False: the logs end at the hang
    gpu_interval_s: float = 1.0  # GPU sampler period while the job hangs
    hang_crash: bool = False  # the hang's stalled rank crashed: its GPU's memory is freed while the others wait
    cancel_s: float | None = None  # the scheduler cancels the job this long after its start (mid-step, as a rule)
    cancel_jitter_s: float = 2.0  # ... and each rank's processes die within this after the cancel
    slurm_output: bool = True  # a cancelled job's Slurm output (banner, srun's and torchrun's lines) is there
    # a per-node GPU sampler outlives the job: it samples the bare driver this long after each rank dies
    gpu_after_exit_s: float = 0.0

    def labels(self) -> list[Fault]:
        return [f for f in self.faults if FAULT_KINDS[f.kind][1] is not None]


def default_faults(ranks: int, steps: int, rng: np.random.Generator) -> list[Fault]:
    """For the demo: a loss spike, a grad-norm explosion and a straggler, each on a known rank."""
    return [
        Fault("straggler", rank=6 % ranks, step=int(steps * 0.35), length=30, magnitude=0.25),
        Fault("loss_spike", rank=3 % ranks, step=int(steps * 0.55), magnitude=float(rng.uniform(2.0, 3.0))),
        Fault("grad_explosion", rank=5 % ranks, step=int(steps * 0.75), magnitude=float(rng.uniform(8, 20))),
    ]


def _t_noise(rng: np.random.Generator, size: int, df: float = 6.0) -> np.ndarray:
    # unit-variance Student-t: heavier tails than a Gaussian, like real minibatch noise
    return rng.standard_t(df, size) / math.sqrt(df / (df - 2))


def metric_rows(sc: Scenario, timeline: Timeline | None = None) -> dict[int, list[dict]]:
    """rank -> per-step metric dicts (ts, step, loss, grad_norm, throughput, step_time_s, lr). Step times and
    times come from the job's synchronous timeline: every rank's step time is the job's."""
    tl = timeline or build_timeline(sc)
    rng = np.random.default_rng(sc.seed)
    steps = np.arange(sc.steps)
    done = tl.last_step + 1  # a hang ends the job: no step completes after it
    step_time = np.diff(tl.release)[:done]
    out: dict[int, list[dict]] = {}
    for r in range(sc.ranks):
        base_loss = 2.0 + 1.5 * (1 + steps / 60.0) ** -0.7
        loss = base_loss * (1 + sc.loss_noise * _t_noise(rng, sc.steps))
        grad = 1.2 * (1 + steps / 200.0) ** -0.3 * np.exp(sc.grad_noise * _t_noise(rng, sc.steps))
        measured = step_time * (1 + 0.003 * _t_noise(rng, sc.steps)[:done])  # each rank's own timer
        tput = 256.0 / measured
        lr = 3e-4 * np.minimum(1.0, (steps + 1) / 20.0)
        for f in sc.faults:
            if f.rank not in (r, -1):  # -1: every rank (a job-wide stall)
                continue
            sl = slice(f.step, min(sc.steps, f.step + f.length))
            if f.kind == "loss_spike":
                loss[sl] *= f.magnitude
            elif f.kind == "grad_explosion":
                grad[sl] *= f.magnitude
            elif f.kind == "nonfinite":
                loss[sl] = np.nan
            elif f.kind == "drift":
                ramp = np.linspace(0, f.magnitude - 1.0, sc.steps - f.step)
                loss[f.step:] *= 1 + ramp
        ts = tl.release[1:done + 1]
        out[r] = [{"ts": round(float(ts[i]), 6), "step": int(i), "loss": float(loss[i]),
                   "grad_norm": float(grad[i]), "throughput": round(float(tput[i]), 3),
                   "step_time_s": round(float(measured[i]), 6), "lr": float(lr[i])} for i in range(done)]
    return out


def _iso(ts: float, digits: int = 3) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:20 + digits] + "Z"


def job_lines(sc: Scenario) -> list[tuple[float, str, str]]:
    """All lines of the job as (event time, relative path, line), in time order."""
    tl = build_timeline(sc)
    rows = metric_rows(sc, tl)
    ids = identities(sc)
    lines: list[tuple[float, str, str]] = []
    for r, steps in rows.items():
        ident = ids[r]
        train, nccl = f"rank{r}/train.log", f"rank{r}/nccl.log"
        t_init = sc.start_ts - 5.0
        for role in ("world", "dp", "tp"):
            lines.append((t_init, nccl, f"{_iso(t_init)} {init_line(sc, ident, role)}"))
        for row in steps:
            ts, step = row["ts"], row["step"]
            lines.append((ts, train, json.dumps(row)))
            if step % 10 == 0:
                lines.append((ts, train, f"[rank{r}]: {_iso(ts)} INFO trainer: step {step} "
                              f"lr {row['lr']:.2e} tokens/s {row['throughput'] * 2048:.0f}"))
            if sc.checkpoint_every and step and step % sc.checkpoint_every == 0:
                lines.append((ts, train, f"[rank{r}]: {_iso(ts)} INFO checkpoint: Saving checkpoint to "
                              f"/ckpt/run/checkpoint-{step}"))
            lines.append((ts, f"rank{r}/gpu.jsonl", _gpu_line(ts, ident, r, step)))
    for e in tl.ops:
        lines.append((e.ts, f"rank{e.rank}/nccl.log", f"{_iso(e.ts, 6)} {coll_line(ids[e.rank], e)}"))
    if tl.hang_at is not None and sc.hang_tail:
        lines.extend(_hang_lines(sc, tl, ids))
    lines.sort(key=lambda x: x[0])
    return _cancelled(sc, lines, ids) if sc.cancel_s is not None else lines


def _cancelled(sc: Scenario, lines: list[tuple[float, str, str]], ids: dict[int, RankIdentity]
               ) -> list[tuple[float, str, str]]:
    """The job cancelled by Slurm at `start_ts + cancel_s`: its banner (whole seconds, as Slurm prints it),
    srun's lines and torchrun's agent taking the SIGTERM in the job's Slurm output, and each rank's lines end
    when its processes die, within `cancel_jitter_s` after (SIGTERM reaches nodes and processes at different
    moments), so ranks stop either side of an op as a real cancellation leaves them."""
    assert sc.cancel_s is not None
    at = sc.start_ts + sc.cancel_s
    rng = np.random.default_rng(sc.seed + 7)
    dies = {f"rank{r}/": at + float(rng.uniform(0.0, sc.cancel_jitter_s)) for r in range(sc.ranks)}
    kept = [ln for ln in lines if ln[0] <= dies[ln[1][:ln[1].index("/") + 1]]]
    for r, ident in ids.items():  # the driver frees a dead process's memory: NVML shows what it keeps itself
        t = dies[f"rank{r}/"] + 0.5
        while t <= dies[f"rank{r}/"] + sc.gpu_after_exit_s:
            kept.append((t, f"rank{r}/gpu.jsonl", _gpu_line(t, ident, r, 0.0, bare=True)))
            t += sc.gpu_interval_s
    if not sc.slurm_output:
        return sorted(kept, key=lambda x: x[0])
    job_id = 40_000 + sc.seed
    banner = datetime.fromtimestamp(math.floor(at), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    out = f"slurm-{job_id}.out"
    agent = datetime.fromtimestamp(at + 0.05, tz=timezone.utc).strftime("W%m%d %H:%M:%S.%f")
    kept += [(at, out, f"slurmstepd: error: *** STEP {job_id}.0 ON node001 CANCELLED AT {banner} ***"),
             (at, out, "srun: Job step aborted: Waiting up to 32 seconds for job step to finish."),
             (at + 0.05, out, f"{agent} 4242 torch/distributed/elastic/agent/server/api.py:719] Received 15 death "
                              "signal, shutting down workers"),
             (at + 0.05, out, "srun: forcing job termination")]
    kept.sort(key=lambda x: x[0])
    return kept


def _gpu_line(ts: float, ident: RankIdentity, r: int, step: float, bare: bool = False) -> str:
    used = 0.5e9 if bare else 30e9 + 1e9 * math.sin(step / 25.0) + r * 1e8
    return json.dumps({"ts": round(ts, 6), "host": ident.host, "gpu": ident.gpu, "rank": r,
                       "mem_used_bytes": int(used), "mem_total_bytes": 80 * 1024**3, "util_pct": 0.0 if bare else 97.0,
                       "temp_c": 64.0, "power_w": 610.0})


def _hang_lines(sc: Scenario, tl: Timeline, ids: dict[int, RankIdentity]) -> list[tuple[float, str, str]]:
    """The silence after a hang: GPU samples go on (the GPUs spin in NCCL), then the watchdog fires on the
    waiting ranks and the job dies."""
    assert tl.hang_at is not None
    out: list[tuple[float, str, str]] = []
    end = tl.hang_at + sc.watchdog_s
    t = tl.hang_at + sc.gpu_interval_s
    frozen_step = tl.last_step + 1
    while t < end + 2.0:
        for r, ident in ids.items():
            bare = sc.hang_crash and r in tl.stopped
            out.append((t, f"rank{r}/gpu.jsonl", _gpu_line(t, ident, r, frozen_step, bare=bare)))
        t += sc.gpu_interval_s
    seq = (tl.last_step + 2) * (sc.tp_ops * sc.grad_accum + sc.dp_buckets)
    for r in ids:
        if r in tl.stopped:
            continue
        out.append((end, f"rank{r}/train.log", f"{_iso(end)} " + watchdog_line(
            r, seq, int(sc.watchdog_s * 1000), int(sc.watchdog_s * 1000) + 85)))
    return out


def write_job(sc: Scenario, directory: str | os.PathLike[str], speed: float | None = None,
              sleep: Callable[[float], None] = time.sleep, on_progress: Callable[[float], None] | None = None
              ) -> int:
    """Write the job's logs; with `speed` (x real time) the lines are paced like a live job. Returns lines."""
    root = Path(directory)
    handles: dict[str, object] = {}
    lines = job_lines(sc)
    t0_event, t0_wall = (lines[0][0] if lines else 0.0), time.monotonic()
    try:
        for i, (ts, rel, text) in enumerate(lines):
            if speed:
                due = (ts - t0_event) / speed - (time.monotonic() - t0_wall)
                if due > 0.02:
                    for fh in handles.values():
                        fh.flush()
                    sleep(due)
                    if on_progress:
                        on_progress(i / len(lines))
            fh = handles.get(rel)
            if fh is None:
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                fh = handles[rel] = open(path, "a", encoding="utf-8")
            fh.write(text + "\n")
    finally:
        for fh in handles.values():
            fh.close()
    return len(lines)
