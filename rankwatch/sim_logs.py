"""Seeded simulator of the text a distributed training job prints, per rank, with labelled error bursts.

What a torchrun job (`--tee 3`, so every line carries `[defaultN]:`) running a Megatron/DeepSpeed-style trainer
prints, in its phases: startup (c10d rendezvous, NCCL communicator init, model build, a checkpoint that is not
there yet, datasets), the first steps (fp16 loss-scale overflows, DDP and deprecation warnings), steady training
(a progress line per rank every few steps; on rank 0 Megatron's iteration line and timers; data shards opening at
irregular times; memory reports), and the later phases a model bootstrapped on the start has never seen:
checkpoint saves (every rank writes its ZeRO shard), evaluation loops, learning-rate schedule messages, epoch
boundaries. NCCL lines carry no timestamp, as in real output.

Injected faults, each on one rank and labelled with its lines' event times (`LogBurst`):
- `nccl_net`: NCCL WARN NET/IB completion errors (status=12, vendor err 129) and the proxy's error returns,
  repeated `magnitude` times;
- `transport_retry`: socket connect retries (as many as the magnitude), then the peer closing the connection
  (retries alone are NCCL's INFO lines: a transient it recovers from, counted as warnings, not raised);
- `cuda_error`: an illegal memory access from the watchdog and Python's traceback (magnitude 1: just the
  RuntimeError line); the rank dies, so it is the scenario's last event;
- `out_of_order`: phases out of order: the rank runs its startup again mid-run (magnitude >= 3: rendezvous,
  NCCL init, checkpoint load), or (magnitude 1-2) prints a startup-only line in the middle of training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

LOG_FAULT_KINDS = ("nccl_net", "transport_retry", "cuda_error", "out_of_order")


@dataclass
class LogFault:
    kind: str
    rank: int
    step: int
    magnitude: int = 3


@dataclass
class LogBurst:
    """Ground truth of one injected fault: the rank and the event times of its lines."""

    kind: str
    rank: int
    magnitude: int
    start: float
    end: float


@dataclass
class LogScenario:
    ranks: int = 8
    steps: int = 4000
    seed: int = 0
    faults: list[LogFault] = field(default_factory=list)
    start_ts: float = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    step_s: float = 0.8
    log_every: int = 5
    checkpoint_every: int = 1500
    eval_every: int = 1500
    eval_offset: int = 750  # evaluation at eval_offset + k * eval_every
    eval_batches: int = 25
    lr_milestones: tuple[int, ...] = (2000, 3000)
    epoch_steps: int = 2000
    warmup_steps: int = 200
    ckpt_dir: str = "/ckpt/gpt-1b3"


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]


class _RankWriter:
    """The lines of one rank with the formats of the libraries that print them."""

    def __init__(self, sc: LogScenario, rank: int, rng: np.random.Generator) -> None:
        self.sc, self.r, self.rng = sc, rank, rng
        self.host = f"gpu-node{rank // 8:03d}"
        self.gpu = rank % 8
        self.pid = 41000 + 37 * rank
        self.ip = f"10.42.{rank // 8}.{11 + rank % 8}"
        self.lines: list[tuple[float, str]] = []

    def add(self, ts: float, text: str) -> None:
        self.lines.append((ts, f"[default{self.r}]:{text}"))

    def py(self, ts: float, level: str, logger: str, msg: str) -> None:
        self.add(ts, f"{_stamp(ts)} {level} {logger}: {msg}")

    def ds(self, ts: float, where: str, msg: str) -> None:
        self.add(ts, f"[{_stamp(ts)}] [INFO] [{where}] {msg}")

    def nccl(self, ts: float, msg: str, tid_off: int = 0, where: str = "") -> None:
        loc = f"{where} " if where else ""
        self.add(ts, f"{self.host}:{self.pid}:{self.pid + tid_off} [{self.gpu}] {loc}NCCL {msg}")

    # ---- phases ---------------------------------------------------------------------------------------
    def startup(self, t: float, replay: bool = False) -> float:
        sc, r, rng = self.sc, self.r, self.rng
        self.py(t, "INFO", "torch.distributed.distributed_c10d", f"Added key: store_based_barrier_key:1 to store "
                f"for rank: {r}")
        if rng.random() < 0.4 and not replay:
            self.add(t, "[W socket.cpp:464] [c10d] The server socket has failed to bind to [::]:29500 (errno: 98 - "
                        "Address already in use).")
        t += rng.uniform(0.2, 1.5)
        self.py(t, "INFO", "torch.distributed.distributed_c10d", f"Rank {r}: Completed store-based barrier for "
                f"key:store_based_barrier_key:1 with {sc.ranks} nodes.")
        self.nccl(t, f"INFO Bootstrap : Using eth0:{self.ip}<0>")
        self.nccl(t, "INFO NET/Plugin : No plugin found (libnccl-net.so), using internal implementation")
        self.nccl(t, f"INFO cudaDriverVersion {12040}")
        if r == 0:
            self.add(t, "NCCL version 2.20.5+cuda12.4")
        t += rng.uniform(0.1, 0.4)
        self.nccl(t, f"INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB [2]mlx5_2:1/IB [3]mlx5_3:1/IB ; OOB "
                     f"eth0:{self.ip}<0>", 81)
        self.nccl(t, "INFO Using network IB", 81)
        self.nccl(t, f"INFO comm 0x{0x55d1c0000000 + r * 0x1000:x} rank {r} nranks {sc.ranks} cudaDev {self.gpu} "
                     f"nvmlDev {self.gpu} busId {0x18000 + self.gpu * 0x10000:x} commId 0x7c3e9a11b2d4f5e6 - Init "
                     "START", 81)
        for ch in range(int(rng.integers(2, 5))):
            nxt = (r + 1) % sc.ranks
            via = "P2P/IPC/read" if nxt // 8 == r // 8 else f"NET/IB/{ch % 4}/GDRDMA"
            self.nccl(t, f"INFO Channel {ch:02d}/0 : {r}[{self.gpu}] -> {nxt}[{nxt % 8}] via {via}", 81)
        self.nccl(t, "INFO Connected all rings", 81)
        self.nccl(t, "INFO Connected all trees", 81)
        self.nccl(t, "INFO threadThresholds 8/8/64 | 64/8/64 | 512 | 512", 81)
        self.nccl(t, "INFO 24 coll channels, 0 nvls channels, 32 p2p channels, 32 p2p channels per peer", 81)
        t += rng.uniform(0.5, 2.0)
        self.nccl(t, f"INFO comm 0x{0x55d1c0000000 + r * 0x1000:x} rank {r} nranks {sc.ranks} cudaDev {self.gpu} "
                     f"nvmlDev {self.gpu} busId {0x18000 + self.gpu * 0x10000:x} commId 0x7c3e9a11b2d4f5e6 - Init "
                     "COMPLETE", 81)
        if r == 0 and not replay:
            self.py(t, "INFO", "megatron.training", "building GPT model ...")
        t += rng.uniform(1.0, 3.0)
        self.add(t, f" > number of parameters on (tensor, pipeline) model parallel rank ({r % 2}, {r // 2 % 4}): "
                    f"{163_950_592 + (r % 2) * 1024:,}")
        self.py(t, "INFO", "megatron.checkpointing", f"loading checkpoint from {sc.ckpt_dir} at iteration 0")
        self.py(t, "WARNING", "megatron.checkpointing", f"could not find the metadata file {sc.ckpt_dir}/"
                "latest_checkpointed_iteration.txt; will not load any checkpoints and will start from random")
        t += rng.uniform(0.5, 2.0)
        if replay:
            return t
        if r == 0:
            self.py(t, "INFO", "megatron.data", "> building train, validation, and test datasets for GPT ...")
            self.py(t, "INFO", "megatron.data", " > dataset split: train: document indices in [0, 948123) total "
                    "of 948123 documents")
        self.py(t, "INFO", "megatron.data", f"loaded indexed file /data/pile/pile_text_document.bin in "
                f"{rng.uniform(0.01, 0.2):.3f} seconds")
        self.py(t, "INFO", "megatron.training", f"setting training iterations to {sc.steps}")
        t += rng.uniform(0.2, 1.0)
        self.add(t, f"[after dataloaders are built] datetime: {_stamp(t)[:19]}")
        self.py(t, "INFO", "megatron.training", "done with setup ... training ...")
        return t

    def first_steps(self, step: int, t: float) -> None:
        rng, r = self.rng, self.r
        if step == 1:
            self.add(t, "[W reducer.cpp:1389] Warning: find_unused_parameters=True was specified in DDP "
                        "constructor, but did not find any unused parameters in the forward pass.")
            self.add(t, "/usr/lib/python3/dist-packages/torch/utils/checkpoint.py:464: UserWarning: "
                        "torch.utils.checkpoint: the use_reentrant parameter should be passed explicitly.")
        if step <= 4:
            scale = 65536 >> (step - 1)
            self.ds(t + rng.uniform(0, 0.05), "loss_scaler.py:183:update_scale", f"[deepspeed] OVERFLOW! Rank {r} "
                    f"Skipping step. Attempted loss scale: {scale}, reducing to {scale // 2}")

    def progress(self, step: int, t: float, loss: float, lr: float) -> None:
        sc, rng, r = self.sc, self.rng, self.r
        self.py(t, "INFO", "trainer", f"step {step} | samples/s {rng.normal(212, 4):.1f} | step time "
                f"{rng.normal(sc.step_s, 0.02):.3f}s | loss {loss:.4f}")
        if r == 0:
            self.add(t, f" iteration {step:8d}/{sc.steps:8d} | consumed samples: {step * 256:12d} | elapsed time "
                        f"per iteration (ms): {rng.normal(sc.step_s * 1000, 15):.1f} | learning rate: {lr:.3E} | "
                        f"global batch size:   256 | lm loss: {loss:.6E} | loss scale: 8192.0 | grad norm: "
                        f"{rng.lognormal(0, 0.2):.3f} | number of skipped iterations:   0 | number of nan "
                        "iterations:   0 |")
            self.py(t, "INFO", "megatron.timers", f"(min, max) time across ranks (ms): forward-backward: "
                    f"({rng.normal(600, 10):.2f}, {rng.normal(640, 10):.2f}) | optimizer: ({rng.normal(40, 2):.2f}, "
                    f"{rng.normal(45, 2):.2f})")

    def shard(self, t: float, shard: int) -> None:
        self.py(t, "INFO", "data", f"worker {self.rng.integers(0, 4)} opened shard /data/shards/"
                f"train-{shard:05d}-of-00512.parquet ({int(self.rng.integers(7800, 8400))} rows)")

    def memory(self, t: float) -> None:
        rng = self.rng
        alloc = rng.normal(41000, 300)
        self.add(t, f"[Rank {self.r}] (after {self.sc.log_every} iterations) memory (MB) | allocated: {alloc:.1f} | "
                    f"max allocated: {alloc * 1.17:.1f} | reserved: 52224.0 | max reserved: 52224.0")

    def checkpoint(self, step: int, t: float) -> float:
        sc, r, rng = self.sc, self.r, self.rng
        d = f"{sc.ckpt_dir}/global_step{step}"
        if r == 0:
            self.py(t, "INFO", "megatron.checkpointing", f"saving checkpoint at iteration {step:7d} to {sc.ckpt_dir}")
        self.ds(t, "logging.py:96:log_dist", f"[Rank {r}] Saving model checkpoint: {d}/mp_rank_00_model_states.pt")
        t += rng.uniform(2, 6)
        shard = f"{d}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        self.ds(t, "torch_checkpoint_engine.py:21:save", f"[Torch] Saving {shard}...")
        t += rng.uniform(5, 15)
        self.ds(t, "torch_checkpoint_engine.py:23:save", f"[Torch] Saved {shard}.")
        self.ds(t, "engine.py:3478:_save_zero_checkpoint", f"zero checkpoint saved {shard}")
        if r == 0:
            self.py(t, "INFO", "megatron.checkpointing", f"  successfully saved checkpoint at iteration {step:7d} "
                    f"to {sc.ckpt_dir}")
        return t

    def evaluate(self, step: int, t: float, loss: float) -> float:
        sc, r, rng = self.sc, self.r, self.rng
        self.py(t, "INFO", "evaluate", f"running evaluation at iteration {step} ({sc.eval_batches} batches)")
        for b in range(1, sc.eval_batches + 1):
            t += rng.uniform(0.3, 0.5)
            if b % 5 == 0:
                self.py(t, "INFO", "evaluate", f"Evaluating iter {b}/{sc.eval_batches}")
        if r == 0:
            self.add(t, "-" * 100)
            self.add(t, f" validation loss at iteration {step} | lm loss value: {loss * 1.02:.6E} | lm loss PPL: "
                        f"{np.exp(loss * 1.02):.6E} | ")
            self.add(t, "-" * 100)
        self.py(t, "INFO", "evaluate", f"evaluation done in {sc.eval_batches * 0.4:.1f}s")
        return t

    # ---- faults -----------------------------------------------------------------------------------------
    def fault(self, f: LogFault, t: float) -> tuple[float, float]:
        start, rng, m = t, self.rng, max(1, f.magnitude)
        if f.kind == "nccl_net":
            for _ in range(m):
                peer = f"10.42.{rng.integers(0, 4)}.{rng.integers(11, 19)}<{rng.integers(40000, 60000)}>"
                self.nccl(t, f"WARN NET/IB : Got completion from peer {peer} with status=12 opcode=0 len=0 vendor "
                             f"err 129 (Recv) localGid fe80::a288:c2ff:fe1b:{rng.integers(4096, 65535):x} remoteGids"
                             f" fe80::a288:c2ff:fe1b:{rng.integers(4096, 65535):x}", 907, "transport/net_ib.cc:1696")
                self.nccl(t, "INFO transport/net.cc:1302 -> 6", 907)
                self.nccl(t, "INFO proxy.cc:698 -> 6", 907)
                self.nccl(t, "INFO proxy.cc:878 -> 6 [Progress Thread]", 907)
                t += rng.uniform(0.5, 3.0)
        elif f.kind == "transport_retry":
            for _ in range(m):
                self.nccl(t, "INFO Call to connect returned Connection timed out, retrying", 12)
                t += rng.uniform(1.0, 2.0)
            self.nccl(t, f"WARN socketProgress: Connection closed by remote peer gpu-node{rng.integers(0, 4):03d}"
                         f"<{rng.integers(40000, 60000)}>", 12, "misc/socket.cc:49")
        elif f.kind == "cuda_error":
            if m >= 2:
                self.add(t, f"[E ProcessGroupNCCL.cpp:1537] [PG 0 Rank {self.r}] Process group watchdog thread "
                            "terminated with exception: CUDA error: an illegal memory access was encountered")
                self.add(t, "CUDA kernel errors might be asynchronously reported at some other API call, so the "
                            "stacktrace below might be incorrect.")
                self.add(t, "For debugging consider passing CUDA_LAUNCH_BLOCKING=1.")
                self.add(t, "Traceback (most recent call last):")
                self.add(t, '  File "/workspace/megatron/pretrain_gpt.py", line 233, in <module>')
                self.add(t, '  File "/workspace/megatron/megatron/training.py", line 905, in train_step')
            self.add(t, "RuntimeError: CUDA error: an illegal memory access was encountered")
        elif f.kind == "out_of_order":
            if m >= 3:
                t = self.startup(t, replay=True)
            else:
                self.py(t, "INFO", "megatron.checkpointing", f"loading checkpoint from {self.sc.ckpt_dir} at iteration 0")
                if m == 2:
                    self.py(t, "INFO", "megatron.training", f"setting training iterations to {self.sc.steps}")
        else:
            raise ValueError(f"unknown log fault kind {f.kind!r}")
        return start, t


def rank_lines(sc: LogScenario) -> tuple[dict[int, list[tuple[float, str]]], list[LogBurst]]:
    """rank -> [(event time, line)] in time order, and the labelled bursts."""
    master = np.random.default_rng(sc.seed)
    out: dict[int, list[tuple[float, str]]] = {}
    bursts: list[LogBurst] = []
    end_step = min([sc.steps] + [f.step for f in sc.faults if f.kind == "cuda_error"])  # a CUDA error ends it
    loss = 2.0 + 8.0 / np.sqrt(1.0 + np.arange(sc.steps + 1) / 40.0)
    for r in range(sc.ranks):
        rng = np.random.default_rng(master.integers(1 << 62))
        w = _RankWriter(sc, r, rng)
        t = w.startup(sc.start_ts + rng.uniform(0, 2.0))
        next_shard = int(rng.integers(30, 200))
        shard = int(rng.integers(0, 500))
        faults = sorted((f for f in sc.faults if f.rank == r), key=lambda f: f.step)
        for step in range(1, end_step + 1):
            t = max(t, sc.start_ts + 20.0 + step * sc.step_s) + rng.uniform(0, 0.05)
            lr = 3e-4 * min(1.0, step / sc.warmup_steps) * 0.5 ** sum(step >= m for m in sc.lr_milestones)
            w.first_steps(step, t)
            if step == sc.warmup_steps:
                w.py(t, "INFO", "scheduler", f"warmup finished at step {step}, lr {lr:.2E}; cosine decay over "
                     f"{sc.steps - step} steps")
            if step % sc.log_every == 0:
                w.progress(step, t, float(loss[step] * (1 + 0.02 * rng.standard_normal())), lr)
            if step == next_shard:
                shard += 1
                w.shard(t + rng.uniform(0, 0.3), shard)
                next_shard = step + int(rng.integers(60, 260))
            if step % 500 == 0:
                w.memory(t)
            if step in sc.lr_milestones:
                w.py(t, "INFO", "scheduler", f"Epoch {step // sc.epoch_steps:05d}: reducing learning rate of group 0"
                     f" to {lr:.4e}.")
            if step % sc.epoch_steps == 0 and step < sc.steps:
                w.py(t, "INFO", "trainer", f"epoch {step // sc.epoch_steps} finished: {sc.epoch_steps} steps in "
                     f"{sc.epoch_steps * sc.step_s:.1f}s")
                w.py(t, "INFO", "trainer", f"starting epoch {step // sc.epoch_steps + 1}")
            if sc.checkpoint_every and step % sc.checkpoint_every == 0:
                t = w.checkpoint(step, t)
            if sc.eval_every and step >= sc.eval_offset and (step - sc.eval_offset) % sc.eval_every == 0:
                t = w.evaluate(step, t, float(loss[step]))
            for f in faults:
                if f.step == step:
                    start, end = w.fault(f, t + rng.uniform(0.1, 0.5))
                    bursts.append(LogBurst(f.kind, r, f.magnitude, start, end))
                    t = end
        out[r] = sorted(w.lines, key=lambda x: x[0])
    return out, bursts


def write_log_job(sc: LogScenario, directory: str | os.PathLike[str]) -> list[LogBurst]:
    """Writes `<directory>/rank<N>.log` per rank; returns the labelled bursts."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lines, bursts = rank_lines(sc)
    for r, items in lines.items():
        with open(d / f"rank{r}.log", "w") as fh:
            fh.writelines(text + "\n" for _, text in items)
    return bursts


def random_faults(sc: LogScenario, rng: np.random.Generator, n: int, after_step: int,
                  kinds: tuple[str, ...] = LOG_FAULT_KINDS, magnitudes: tuple[int, ...] = (1, 2, 3, 5)
                  ) -> list[LogFault]:
    """`n` faults on random ranks at least 150 steps apart after `after_step`; a CUDA error (fatal) goes last."""
    steps = np.sort(rng.choice(np.arange(after_step, sc.steps - 50, 150), size=n, replace=False))
    chosen = [str(rng.choice([k for k in kinds if k != "cuda_error"] or list(kinds))) for _ in range(n)]
    if "cuda_error" in kinds and rng.random() < 0.5:
        chosen[-1] = "cuda_error"
    return [LogFault(k, int(rng.integers(0, sc.ranks)), int(s), int(rng.choice(magnitudes)))
            for k, s in zip(chosen, steps, strict=True)]


@dataclass
class BurstScore:
    """Detections against labelled bursts: a log-key anomaly matches a burst on its rank from `before` seconds
    before its first line (NCCL lines carry no time of their own) to `after` seconds past its last."""

    found: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (kind, magnitude) -> [hit, total]
    true_alarms: int = 0
    false_alarms: list = field(default_factory=list)

    @property
    def alarms(self) -> int:
        return self.true_alarms + len(self.false_alarms)

    def recall(self, kind: str | None = None) -> float:
        hits = sum(v[0] for k, v in self.found.items() if kind in (None, k[0]))
        total = sum(v[1] for k, v in self.found.items() if kind in (None, k[0]))
        return hits / total if total else float("nan")

    def precision(self) -> float:
        return self.true_alarms / self.alarms if self.alarms else float("nan")

    def add(self, other: BurstScore) -> None:
        for k, (h, t) in other.found.items():
            cur = self.found.setdefault(k, [0, 0])
            cur[0] += h
            cur[1] += t
        self.true_alarms += other.true_alarms
        self.false_alarms.extend(other.false_alarms)


def score_bursts(anomalies: list, bursts: list[LogBurst], before: float = 5.0, after: float = 30.0
                 ) -> BurstScore:
    score = BurstScore()
    hit = [False] * len(bursts)
    for a in anomalies:
        if a.detector != "deeplog":
            continue
        match = [i for i, b in enumerate(bursts)
                 if a.rank == b.rank and b.start - before <= a.event_time <= b.end + after]
        if match:
            score.true_alarms += 1
            for i in match:
                hit[i] = True
        else:
            score.false_alarms.append(a)
    for b, h in zip(bursts, hit, strict=True):
        cur = score.found.setdefault((b.kind, b.magnitude), [0, 0])
        cur[0] += int(h)
        cur[1] += 1
    return score
