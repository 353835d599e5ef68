"""The simulated job's timeline, as synchronous data + tensor parallel training runs, and its NCCL output.

How a real step looks from the logs (NCCL_DEBUG=INFO, NCCL_DEBUG_SUBSYS=INIT,COLL): every rank is released from
the previous step's synchronisation at about the same moment, loads its batch, then its CPU enqueues the
step's collectives in program order: tensor-parallel all-reduces inside forward and backward, then the
data-parallel gradient buckets at the end of backward. NCCL prints a COLL line at each *enqueue*. The step ends
for everyone when the last rank's last collective has completed, so:
- a straggler (slow data loader, busy host) enqueues every op later than its peers, and *every* rank's step
  time grows, because all of them wait at the collective; the victims' intervals across the step boundary grow
  by the same lag; only the cross-rank enqueue times show who is late;
- a slow stream (that rank's compute before that stream's ops is slower) stretches that stream's intervals, and
  as it delays the rank, it also shows as lateness;
- a hang: the stuck rank never enqueues the step's first op; its peers enqueue what their CPU can before
  blocking, then the job goes silent (the GPU sampler still samples); PyTorch's watchdog fires on the waiting
  ranks after its timeout, and the job dies.
Normal life adds heavy-tailed jitter, slow drift, single data-loader hiccups, and evaluation/checkpoint pauses in
which every rank stops issuing collectives at the same op.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rankwatch.simulate import Scenario

TAIL_S = 0.03  # last collective's completion, optimizer step and the per-step sync after the last enqueue


@dataclass
class OpEvent:
    rank: int
    stream: str  # "tp" | "dp"
    op: str
    op_count: int
    ts: float
    count: int


@dataclass
class Timeline:
    release: np.ndarray  # [steps + 1] when every rank leaves step s's start sync (release[s + 1] = end of s)
    ops: list[OpEvent] = field(default_factory=list)
    stopped: dict[int, float] = field(default_factory=dict)  # rank -> time it stops logging (hang)
    hang_at: float | None = None  # when the job went silent
    last_step: int = -1  # last step every rank finished
    windows: dict[int, tuple[float, float]] = field(default_factory=dict)  # fault index -> (start, end) time


def _t(rng: np.random.Generator, size: int | tuple = 1, df: float = 5.0) -> np.ndarray:
    return rng.standard_t(df, size) / math.sqrt(df / (df - 2))


def step_plan(sc: Scenario) -> list[tuple[str, str, float]]:
    """One step's ops in program order: (stream, op name, share of the step's compute before it). Per micro-batch
    forward is a third of the compute, backward two thirds; the DP gradient buckets become ready during the last
    part of the last micro-batch's backward (gradient accumulation: no DP collective before), each after one of
    the last tensor-parallel all-reduces."""
    half = max(sc.tp_ops // 2, 1)
    micro = max(1, sc.grad_accum)
    out: list[tuple[str, str, float]] = []
    for m in range(micro):
        plan: list[tuple[str, str]] = [("tp", "AllReduce")] * half
        bwd_tp = sc.tp_ops - half
        last = m == micro - 1
        for j in range(bwd_tp):
            plan.append(("tp", "AllReduce"))
            if last and j >= bwd_tp - sc.dp_buckets:
                plan.append(("dp", "AllReduce"))
        if last:
            plan += [("dp", "AllReduce")] * (sc.dp_buckets - sum(1 for s, _ in plan if s == "dp"))
        n_bwd = len(plan) - half
        out += [(s, name, ((1 / 3) / half if i < half else (2 / 3) / n_bwd) / micro)
                for i, (s, name) in enumerate(plan)]
    return out


def build_timeline(sc: Scenario) -> Timeline:
    rng = np.random.default_rng(sc.seed + 7_000_003)
    plan = step_plan(sc)
    counts = {"tp": 4 * 1024 * 1024, "dp": 25 * 1024 * 1024 // 2}
    release = np.zeros(sc.steps + 1)
    release[0] = sc.start_ts
    tl = Timeline(release)
    op_count: dict[tuple[int, str], int] = {}
    compute = sc.step_s - 0.015 - TAIL_S  # the base data-loading time and the tail are not compute
    pauses = {int(s): float(p) for s, p in sc.pauses.items()}
    by_kind = {f.kind: [] for f in sc.faults}
    for i, f in enumerate(sc.faults):
        by_kind.setdefault(f.kind, []).append((i, f))
    hang = next((f for _, f in by_kind.get("hang", [])), None)
    for s in range(sc.steps):
        start = release[s]
        drift = 1.0 + sc.step_drift * s / max(sc.steps, 1)
        last_enqueue = start
        batch = np.exp(sc.batch_cv * rng.standard_normal(max(sc.ranks // sc.tp, 1) + 1)) if sc.batch_cv else None
        for r in range(sc.ranks):
            if hang is not None and s >= hang.step and r == hang.rank:
                tl.stopped.setdefault(r, start)
                continue
            if hang is not None and s > hang.step:
                continue
            t = start + 0.015 * math.exp(0.3 * float(rng.standard_normal()))  # data loading
            for _, f in by_kind.get("straggler", []):
                if f.rank == r and f.step <= s < f.step + f.length:
                    t += f.magnitude * (1 + 0.05 * float(_t(rng)[0]))
            for f in sc.hiccups:
                if f.rank == r and f.step == s:
                    t += f.magnitude
            gaps = compute * drift * np.array([share for _, _, share in plan]) * (1 + 0.04 * _t(rng, len(plan)))
            if sc.batch_cv:  # this data-parallel rank's batch this step (its TP group shares it): longer sequences
                gaps = gaps * batch[r // sc.tp]
            for _, f in by_kind.get("throughput_drop", []):  # job-wide: every rank computes slower
                if f.step <= s < f.step + f.length:
                    gaps = gaps * f.magnitude
            for (stream, name, _), gap in zip(plan, gaps, strict=True):
                for _, f in by_kind.get("slow_stream", []):
                    if f.rank == r and f.stream == stream and f.step <= s < f.step + f.length:
                        gap *= f.magnitude
                t += max(float(gap), 1e-5)
                oc = op_count.get((r, stream), 0)
                op_count[(r, stream)] = oc + 1
                tl.ops.append(OpEvent(r, stream, name, oc, t, counts[stream]))
            last_enqueue = max(last_enqueue, t)
        if hang is not None and s >= hang.step:
            tl.hang_at = last_enqueue
            release[s + 1:] = last_enqueue
            break
        release[s + 1] = last_enqueue + TAIL_S * (1 + 0.1 * abs(float(_t(rng)[0]))) + pauses.get(s, 0.0)
        tl.last_step = s
    for i, f in enumerate(sc.faults):
        if f.kind in ("straggler", "slow_stream"):
            end = min(f.step + f.length, sc.steps)
            tl.windows[i] = (float(release[f.step]), float(release[end]))
        elif f.kind == "hang":
            tl.windows[i] = (float(tl.hang_at or release[f.step]), float(tl.hang_at or release[f.step]))
    tl.ops.sort(key=lambda e: e.ts)
    return tl


def _hex(seed: int, *parts: object, bits: int = 48) -> str:
    return "0x" + format(zlib.crc32(repr((seed, *parts)).encode()) * 65537 % (1 << bits), "x")


@dataclass
class RankIdentity:
    host: str
    pid: int
    gpu: int
    comm: dict[str, str]  # stream role -> comm pointer (per process)
    stream: dict[str, str]  # stream role -> CUDA stream pointer
    comm_id: dict[str, str]  # stream role -> commId (shared by the comm's ranks)
    comm_rank: dict[str, int]
    nranks: dict[str, int]


def identities(sc: Scenario) -> dict[int, RankIdentity]:
    out = {}
    dp_size = max(sc.ranks // sc.tp, 1)
    for r in range(sc.ranks):
        tp_group, tp_index = r // sc.tp, r % sc.tp
        out[r] = RankIdentity(
            host=f"node{r // 8:03d}", pid=4100 + r, gpu=r % 8,
            comm={"tp": _hex(sc.seed, "comm", r, "tp"), "dp": _hex(sc.seed, "comm", r, "dp"),
                  "world": _hex(sc.seed, "comm", r, "world")},
            stream={"tp": _hex(sc.seed, "stream", r, "tp"), "dp": _hex(sc.seed, "stream", r, "dp")},
            comm_id={"tp": _hex(sc.seed, "commId", "tp", tp_group, bits=64),
                     "dp": _hex(sc.seed, "commId", "dp", tp_index, bits=64),
                     "world": _hex(sc.seed, "commId", "world", bits=64)},
            comm_rank={"tp": tp_index, "dp": tp_group, "world": r},
            nranks={"tp": sc.tp, "dp": dp_size, "world": sc.ranks})
    return out


def init_line(sc: Scenario, ident: RankIdentity, role: str) -> str:
    """NCCL's "Init COMPLETE" line, in the form of the scenario's NCCL version."""
    head = f"{ident.host}:{ident.pid}:{ident.pid + 60} [{ident.gpu}] NCCL INFO"
    bus = f"{0x18 + 0x10 * ident.gpu:x}000"
    c, cr, n = ident.comm[role], ident.comm_rank[role], ident.nranks[role]
    if sc.nccl_style == "2.14":  # before commId was printed
        return f"{head} comm {c} rank {cr} nranks {n} cudaDev {ident.gpu} busId {bus} - Init COMPLETE"
    if sc.nccl_style == "2.18":
        return (f"{head} comm {c} rank {cr} nranks {n} cudaDev {ident.gpu} nvmlDev {ident.gpu} busId {bus} "
                f"commId {ident.comm_id[role]} - Init COMPLETE")
    return (f"{head} ncclCommInitRank comm {c} rank {cr} nranks {n} cudaDev {ident.gpu} nvmlDev {ident.gpu} "
            f"busId {bus} commId {ident.comm_id[role]} - Init COMPLETE")


def coll_line(ident: RankIdentity, e: OpEvent) -> str:
    return (f"{ident.host}:{ident.pid}:{ident.pid + 60} [{ident.gpu}] NCCL INFO {e.op}: opCount {e.op_count:x} "
            f"sendbuff 0x7f3b{e.op_count % 4096:08x} recvbuff 0x7f3b{e.op_count % 4096:08x} count {e.count} "
            f"datatype 7 op 0 root 0 comm {ident.comm[e.stream]} [nranks={ident.nranks[e.stream]}] "
            f"stream {ident.stream[e.stream]}")


def watchdog_line(rank: int, seq: int, timeout_ms: int, ran_ms: int) -> str:
    return (f"[rank{rank}]:[E ProcessGroupNCCL.cpp:632] [Rank {rank}] Watchdog caught collective operation "
            f"timeout: WorkNCCL(SeqNum={seq}, OpType=ALLREDUCE, NumelIn=6553600, NumelOut=6553600, "
            f"Timeout(ms)={timeout_ms}) ran for {ran_ms} milliseconds before timing out.")
