"""Seeded simulator of a multi-rank training job, with labelled faults, writing logs in rankwatch's formats.

Used by `rankwatch demo`, the tests, the quality evaluation and the benchmarks. Noise is realistic rather
than Gaussian: multiplicative Student-t (df=6) jitter on loss, log-normal grad norms, so thresholds chosen on
it hold on real curves.
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

# fault kind -> (signal it shows in, detector expected to catch it)
FAULT_KINDS = {
    "loss_spike": ("loss", "mad"),
    "grad_explosion": ("grad_norm", "mad"),
    "throughput_drop": ("throughput", "throughput"),
    "straggler": ("step_time_s", "straggler"),
    "nonfinite": ("loss", "nonfinite"),
    "drift": ("loss", None),  # a slow upward drift: must NOT be flagged
}


@dataclass
class Fault:
    kind: str
    rank: int
    step: int
    length: int = 1
    magnitude: float = 2.0


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
    ops_per_step: int = 2  # per stream; two streams
    checkpoint_every: int = 100

    def labels(self) -> list[Fault]:
        return [f for f in self.faults if FAULT_KINDS[f.kind][1] is not None]


def default_faults(ranks: int, steps: int, rng: np.random.Generator) -> list[Fault]:
    """For the demo: a loss spike, a grad-norm explosion and a straggler, each on a known rank."""
    return [
        Fault("straggler", rank=6 % ranks, step=int(steps * 0.35), length=10, magnitude=1.8),
        Fault("loss_spike", rank=3 % ranks, step=int(steps * 0.55), magnitude=float(rng.uniform(2.0, 3.0))),
        Fault("grad_explosion", rank=5 % ranks, step=int(steps * 0.75), magnitude=float(rng.uniform(8, 20))),
    ]


def _t_noise(rng: np.random.Generator, size: int, df: float = 6.0) -> np.ndarray:
    # unit-variance Student-t: heavier tails than a Gaussian, like real minibatch noise
    return rng.standard_t(df, size) / math.sqrt(df / (df - 2))


def metric_rows(sc: Scenario) -> dict[int, list[dict]]:
    """rank -> per-step metric dicts (ts, step, loss, grad_norm, throughput, step_time_s, lr)."""
    rng = np.random.default_rng(sc.seed)
    steps = np.arange(sc.steps)
    out: dict[int, list[dict]] = {}
    for r in range(sc.ranks):
        base_loss = 2.0 + 1.5 * (1 + steps / 60.0) ** -0.7
        loss = base_loss * (1 + sc.loss_noise * _t_noise(rng, sc.steps))
        grad = 1.2 * (1 + steps / 200.0) ** -0.3 * np.exp(sc.grad_noise * _t_noise(rng, sc.steps))
        tput = 1000.0 * (1 + 0.02 * _t_noise(rng, sc.steps))
        step_time = 256.0 / tput
        lr = 3e-4 * np.minimum(1.0, (steps + 1) / 20.0)
        for f in sc.faults:
            if f.rank not in (r, -1):  # -1: every rank (a job-wide stall)
                continue
            sl = slice(f.step, min(sc.steps, f.step + f.length))
            if f.kind == "loss_spike":
                loss[sl] *= f.magnitude
            elif f.kind == "grad_explosion":
                grad[sl] *= f.magnitude
            elif f.kind == "throughput_drop":
                tput[sl] /= f.magnitude
                step_time[sl] *= f.magnitude
            elif f.kind == "straggler":
                step_time[sl] *= f.magnitude
                tput[sl] /= f.magnitude
            elif f.kind == "nonfinite":
                loss[sl] = np.nan
            elif f.kind == "drift":
                ramp = np.linspace(0, f.magnitude - 1.0, sc.steps - f.step)
                loss[f.step:] *= 1 + ramp
        # wall clock advances by each step's duration, so a straggler's lines arrive later
        ts = sc.start_ts + np.cumsum(step_time) * sc.step_s / (256.0 / 1000.0)
        out[r] = [{"ts": round(float(ts[i]), 6), "step": int(i), "loss": float(loss[i]),
                   "grad_norm": float(grad[i]), "throughput": round(float(tput[i]), 3),
                   "step_time_s": round(float(step_time[i]), 6), "lr": float(lr[i])} for i in range(sc.steps)]
    return out


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def job_lines(sc: Scenario) -> list[tuple[float, str, str]]:
    """All lines of the job as (event time, relative path, line), in time order."""
    rows = metric_rows(sc)
    lines: list[tuple[float, str, str]] = []
    streams = ("0x7f3a1c000000", "0x7f3a1c100000")
    for r, steps in rows.items():
        host, gpu = f"node{r // 8:03d}", r % 8
        for row in steps:
            ts, step = row["ts"], row["step"]
            train = f"rank{r}/train.log"
            lines.append((ts, train, json.dumps(row)))
            if step % 10 == 0:
                lines.append((ts, train, f"[rank{r}]: {_iso(ts)} INFO trainer: step {step} "
                              f"lr {row['lr']:.2e} tokens/s {row['throughput'] * 2048:.0f}"))
            if sc.checkpoint_every and step and step % sc.checkpoint_every == 0:
                lines.append((ts, train, f"[rank{r}]: {_iso(ts)} INFO checkpoint: Saving checkpoint to "
                              f"/ckpt/run/checkpoint-{step}"))
            for s, stream in enumerate(streams):
                for k in range(sc.ops_per_step):
                    op_count = step * sc.ops_per_step + k
                    name = "AllReduce" if s == 0 else ("AllGather" if k % 2 else "ReduceScatter")
                    lines.append((ts + 0.001 * (k + 1), f"rank{r}/nccl.log",
                                  f"{_iso(ts + 0.001 * (k + 1))} {host}:{4100 + r}:{4200 + r} [{gpu}] NCCL INFO "
                                  f"{name}: opCount {op_count:x} sendbuff 0x7f3b00000000 recvbuff 0x7f3b00000000 "
                                  f"count 7382228 datatype 7 op 0 root 0 comm 0x7f3a00000000 "
                                  f"[nranks={sc.ranks}] stream {stream}"))
            used = 30e9 + 1e9 * math.sin(step / 25.0) + r * 1e8
            lines.append((ts, f"rank{r}/gpu.jsonl", json.dumps(
                {"ts": ts, "host": host, "gpu": gpu, "rank": r, "mem_used_bytes": int(used),
                 "mem_total_bytes": 80 * 1024**3, "util_pct": 97.0, "temp_c": 64.0, "power_w": 610.0})))
    lines.sort(key=lambda x: x[0])
    return lines


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
