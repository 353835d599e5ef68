"""DeepSpeed's own lines (engine, pipeline engine, throughput timer, fp16 loss scaler).

    [Rank 0] step=40, skipped=2, lr=[5e-05], mom=[[0.9, 0.999]]                    (engine, steps_per_print)
    epoch=0/micro_step=34/global_step=34, RunningAvgSamplesPerSec=7.86, CurrSamplesPerSec=8.01,
        MemAllocated=59.65GB, MaxMemAllocated=63.31GB                               (timer, >= 0.9)
    0/40, SamplesPerSec=83.48609168106144, MemAllocated=0.26GB, MaxMemAllocated=9.02GB   (timer, older)
    steps: 200 loss: 5.5508 lm loss: 5.5103 moe loss: 0.0405 iter time (s): 0.936 samples/sec: 136.706
    [deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 65536, reducing to 32768

The first three are metrics (step, skipped_iterations, lr / throughput, memory_gib); the timer's `GB` is
bytes / 2^30, so memory_gib. The pipeline engine's line gives loss, step_time_s and throughput (samples/s).
An overflow is a log record with event `fp16_overflow` (rank, attempted_loss_scale, new_loss_scale or the
hysteresis step): it explains a loss-scale drop and a skipped step.
"""

from __future__ import annotations

import re
from typing import Any

from rankwatch.formats.base import Parsed, SourceContext, key_name, need_number, number

NAME = "deepspeed"
_STEP = re.compile(r"(?:\[Rank (\d+)\] )?step=(\d+), skipped=(\d+), lr=\[([^\]]*)\]")
_TIMER_NEW = re.compile(r"epoch=(\d+)/micro_step=(\d+)/global_step=(\d+), RunningAvgSamplesPerSec=([^,\s]+), "
                        r"CurrSamplesPerSec=([^,\s]+)(?:, MemAllocated=([\d.]+)GB, MaxMemAllocated=([\d.]+)GB)?")
_TIMER_OLD = re.compile(r"(?<![\w/])(\d+)/(\d+), SamplesPerSec=([^,\s]+)"
                        r"(?:, MemAllocated=([\d.]+)GB, MaxMemAllocated=([\d.]+)GB)?")
_PIPE = re.compile(r"\bsteps?: *(\d+)(?: */ *\d+)? +loss: (\S+) (.*?)iter time \(s\): (\S+) samples/sec: ([^\s,]+)")
_EXTRA_LOSS = re.compile(r"([A-Za-z][\w ]*?) loss: (\S+)")
_OVERFLOW = re.compile(r"OVERFLOW!(?: Rank (\d+))? Skipping step\. Attempted loss scale: ([^,\s]+),? "
                       r"(?:reducing to ([^,\s]+)|but hysteresis is (\d+)\. Reducing hysteresis to (\d+))")


def parse_overflow(body: str, ctx: SourceContext) -> Parsed | None:
    m = _OVERFLOW.search(body)
    if m is None:
        return None
    fields: dict[str, Any] = {"attempted_loss_scale": need_number(m.group(2), "attempted loss scale", NAME)}
    rank = int(m.group(1)) if m.group(1) else None
    if rank is not None:
        fields["rank"] = rank
    if m.group(3):
        fields["new_loss_scale"] = need_number(m.group(3), "new loss scale", NAME)
    else:
        fields["hysteresis"] = int(m.group(4))
        fields["new_hysteresis"] = int(m.group(5))
    return Parsed("log", {"event": "fp16_overflow", "fields": fields}, rank)


def parse_step(body: str, ctx: SourceContext) -> Parsed | None:
    m = _STEP.search(body)
    if m is None:
        return None
    data: dict[str, Any] = {"step": int(m.group(2)), "skipped_iterations": int(m.group(3))}
    lrs = [x for x in (number(t.strip()) for t in m.group(4).split(",")) if x is not None]
    if lrs:
        data["lr"] = lrs[0]  # the first parameter group's
    return Parsed("metrics", data, int(m.group(1)) if m.group(1) else None)


def parse_timer(body: str, ctx: SourceContext) -> Parsed | None:
    m = _TIMER_NEW.search(body)
    if m:
        data: dict[str, Any] = {"step": int(m.group(3)), "epoch": float(m.group(1)),
                                "throughput": need_number(m.group(5), "CurrSamplesPerSec", NAME),
                                "throughput_avg": need_number(m.group(4), "RunningAvgSamplesPerSec", NAME)}
        mem = m.group(6), m.group(7)
    else:
        m = _TIMER_OLD.search(body)
        if m is None:
            return None
        # the older timer prints the running average only, after the epoch and the step count
        data = {"step": int(m.group(2)), "epoch": float(m.group(1)),
                "throughput": need_number(m.group(3), "SamplesPerSec", NAME)}
        mem = m.group(4), m.group(5)
    if mem[0] is not None:
        data["memory_gib"] = float(mem[0])
        data["max_memory_gib"] = float(mem[1])
    return Parsed("metrics", data)


def parse_pipe(body: str, ctx: SourceContext) -> Parsed | None:
    m = _PIPE.search(body)
    if m is None:
        return None
    data: dict[str, Any] = {"step": int(m.group(1)), "loss": need_number(m.group(2), "loss", NAME),
                            "step_time_s": need_number(m.group(4), "iter time (s)", NAME),
                            "throughput": need_number(m.group(5), "samples/sec", NAME)}
    for label, value in _EXTRA_LOSS.findall(m.group(3)):  # "lm loss: 5.5103 moe loss: 0.0405"
        x = number(value)
        if x is not None:
            data.setdefault(key_name(label) + "_loss", x)
    return Parsed("metrics", data)


__all__ = ["NAME", "parse_overflow", "parse_step", "parse_timer", "parse_pipe"]
