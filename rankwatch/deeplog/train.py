"""`rankwatch deeplog train`: fit a DeepLog model on normal log-key sequences.

Data are encoded once into an on-disk cache (cache.py) and streamed each epoch, so memory stays flat whatever
the input size. On CUDA: fp16 autocast with a GradScaler (`mixed_precision`), DataParallel over all visible GPUs,
or DistributedDataParallel when started by torchrun (`torchrun --nproc_per_node 4 -m rankwatch.cli deeplog train
...`; gloo on CPU, nccl on GPUs): each process reads its own shard of pieces and all take the same number of
steps. Checkpoints (`best_model.pt`, `epoch_N.pt`, `step_N.pt`) hold weights, the model's args, the
vocabulary, optimizer/scheduler/scaler state and the step, and load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import math
import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from rankwatch.deeplog.cache import KeyCache, build_cache, shuffled_batches
from rankwatch.deeplog.config import DeepLogConfig
from rankwatch.deeplog.data import SourceStats, file_chunks, topic_chunks
from rankwatch.deeplog.model import DeepLog, Vocabulary, load_checkpoint, save_checkpoint, unwrap
from rankwatch.deeplog.monitor import (
    Progress,
    gpu_block,
    gpu_stats,
    human_duration,
    plot_history,
    step_line,
    write_history,
)

log = logging.getLogger("rankwatch.deeplog")


class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    def __init__(self, device_pref: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = device_pref.startswith("cuda") or (device_pref == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise RuntimeError(f"device {device_pref} requested but CUDA is not available")
        if want_cuda:
            idx = int(device_pref.split(":")[1]) if ":" in device_pref else self.local_rank
            self.device = torch.device("cuda", idx)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, *values: float) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def setup_logging(output_dir: str, main: bool) -> logging.Handler | None:
    """training.log in this run's output dir (main process); returns the handler, removed when the run ends."""
    log.setLevel(logging.INFO if main else logging.WARNING)
    if not main:
        return None
    fh = logging.FileHandler(os.path.join(output_dir, "training.log"))
    fh.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(message)s"))
    log.addHandler(fh)
    return fh


def source_signature(cfg: DeepLogConfig, from_topic: bool) -> str:
    """Identifies the input (paths, sizes, mtimes, data settings): a cache built from it can be reused."""
    from rankwatch.deeplog.data import discover_files

    d = cfg.data
    parts = [f"topic={from_topic}", f"h={d.window}", f"L={d.max_seq_length}", f"fmt={d.format}", f"job={d.job}",
             f"eos={d.end_of_sequence}",
             f"field={d.sequence_field}", f"miner={d.miner_sim_th},{d.miner_depth}"]
    if not from_topic:
        for f in discover_files(d.data_dir):
            st = os.stat(f)
            parts.append(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def prepare_cache(cfg: DeepLogConfig, dist: Distributed, vocab: Vocabulary, settings: Any = None,
                  vocab_cap: int | None = None) -> KeyCache:
    """The encoded keys: built by the main process (or reused when the input has not changed)."""
    d = cfg.data
    cache_dir = d.cache_dir or os.path.join(cfg.output_dir, "cache")
    signature = source_signature(cfg, settings is not None)
    if dist.main:
        reuse = False
        if os.path.exists(os.path.join(cache_dir, "meta.json")):
            cached = KeyCache(cache_dir)
            known = cached.vocab.keys[: len(vocab.keys)]
            reuse = cached.meta.get("signature") == signature and known == vocab.keys
        if not reuse:
            t0 = time.perf_counter()
            stats = SourceStats()
            if settings is not None:
                chunks = topic_chunks(settings, stats, d.job, d.miner_sim_th, d.miner_depth)
                what = f"topics {settings.topic_logs} + {settings.topic_logkeys}"
            else:
                if not d.data_dir:
                    raise ValueError("no training data: give --data-dir (or data.data_dir), or --from-topic")
                chunks = file_chunks(d.data_dir, stats, d.format, d.sequence_field, d.job,
                                     miner_sim_th=d.miner_sim_th, miner_depth=d.miner_depth)
                what = ", ".join(d.data_dir)
            cache = build_cache(cache_dir, _with_templates(chunks, stats, vocab), vocab, d.window,
                                d.max_seq_length, vocab_cap, {"signature": signature, "source": what},
                                end_of_sequence=d.end_of_sequence)
            log.info("encoded %s keys in %s pieces from %s (%d sequences, %d skipped records) in %s; %d keys in "
                     "the vocabulary", f"{cache.meta['n_targets']:,}", f"{cache.meta['n_pieces']:,}", what,
                     stats.sequences, stats.skipped, human_duration(time.perf_counter() - t0), len(cache.vocab) - 2)
            if cache.meta["unknown"]:
                log.warning("%d keys did not fit model.vocab_size=%s and were encoded as unknown",
                            cache.meta["unknown"], vocab_cap)
    dist.barrier()
    return KeyCache(cache_dir)


def _with_templates(chunks, stats: SourceStats, vocab: Vocabulary):
    """Pass chunks through; once the source is exhausted (before the cache is closed), name the keys."""
    yield from chunks
    vocab.templates.update(stats.templates)
    vocab.miner = stats.miner or vocab.miner


def _scheduler(opt: torch.optim.Optimizer, cfg: DeepLogConfig, total_steps: int) -> Any:
    kind = cfg.training.lr_schedule
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps),
                                                          eta_min=cfg.training.learning_rate * 0.01)
    if kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    return None


def train(cfg: DeepLogConfig, resume: str | None = None, settings: Any = None,
          evaluate_after: bool = True) -> dict[str, Any]:
    """Train; returns a summary (paths, history, best validation loss). `settings`: read the topics."""
    dist = Distributed(cfg.training.device)
    handler = None
    try:
        os.makedirs(os.path.join(cfg.output_dir, "checkpoints"), exist_ok=True)
        handler = setup_logging(cfg.output_dir, dist.main)
        ckpt = load_checkpoint(resume, map_location="cpu")[2] if resume else None
        vocab = Vocabulary.from_dict(ckpt["vocabulary"]) if ckpt else Vocabulary()
        cap = int(ckpt["model_args"]["vocab_size"]) if ckpt else cfg.model.vocab_size
        cache = prepare_cache(cfg, dist, vocab, settings, cap)
        vocab = cache.vocab
        return _fit(cfg, dist, cache, vocab, ckpt, resume, evaluate_after)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        dist.close()


def _fit(cfg: DeepLogConfig, dist: Distributed, cache: KeyCache, vocab: Vocabulary, ckpt: dict | None,
         resume: str | None, evaluate_after: bool) -> dict[str, Any]:
    t_cfg, d_cfg, m_cfg = cfg.training, cfg.data, cfg.model
    torch.manual_seed(t_cfg.seed)
    if t_cfg.threads > 0:
        torch.set_num_threads(t_cfg.threads)
    if ckpt:
        model = DeepLog.from_args(ckpt["model_args"])
        model.load_state_dict(ckpt["model_state_dict"])
    else:
        size = m_cfg.vocab_size or len(vocab)
        model = DeepLog(size, m_cfg.embedding_dim, m_cfg.hidden_size, m_cfg.num_layers, m_cfg.dropout,
                        d_cfg.window)
    model.to(dist.device)
    cuda = dist.device.type == "cuda"
    net: nn.Module = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dist.device.index] if cuda else None)
    elif cuda and t_cfg.use_multi_gpu and torch.cuda.device_count() > 1:
        net = nn.DataParallel(model)
        log.info("DataParallel over %d GPUs", torch.cuda.device_count())
    amp = bool(t_cfg.mixed_precision and cuda)
    per_rank_batch = max(1, t_cfg.batch_size // dist.world)
    counts = [cache.count("train", s, dist.world, d_cfg.validation_split, t_cfg.seed) for s in range(dist.world)]
    steps_per_epoch = min(counts) // per_rank_batch
    if steps_per_epoch == 0:
        raise ValueError(f"not enough training windows ({min(counts)}) for one batch of {per_rank_batch}")
    total_steps = steps_per_epoch * t_cfg.num_epochs
    if t_cfg.max_steps:
        total_steps = min(total_steps, t_cfg.max_steps)
    opt = torch.optim.Adam(net.parameters(), lr=t_cfg.learning_rate, weight_decay=t_cfg.weight_decay)
    sched = _scheduler(opt, cfg, total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    history: dict[str, list] = {"epoch": [], "train_loss": [], "val_loss": [], "learning_rate": [],
                                "epoch_time_s": [], "steps": []}
    step, start_epoch, skip, best, bad_epochs = 0, 1, 0, math.inf, 0
    if ckpt:
        opt.load_state_dict(ckpt["optimizer_state_dict"])
        if sched is not None and "scheduler_state_dict" in ckpt:
            sched.load_state_dict(ckpt["scheduler_state_dict"])
        if "scaler_state_dict" in ckpt:
            scaler.load_state_dict(ckpt["scaler_state_dict"])
        step = int(ckpt["step"])
        history = ckpt.get("history") or history
        best = float(ckpt.get("best_val_loss", math.inf))
        bad_epochs = int(ckpt.get("bad_epochs", 0))
        if ckpt.get("epoch_complete", True):
            start_epoch = int(ckpt["epoch"]) + 1
        else:
            start_epoch, skip = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0))
        log.info("resumed from %s at epoch %d, step %d", resume, start_epoch, step)
    log.info("training on %s: %s windows/epoch (%s validation), %d steps/epoch of %d per process x %d processes, "
             "vocabulary %d, model %s", dist.device, f"{sum(counts):,}",
             f"{cache.count('val', 0, 1, d_cfg.validation_split, t_cfg.seed):,}", steps_per_epoch, per_rank_batch,
             dist.world, len(vocab), model.model_args)
    loss_fn = nn.CrossEntropyLoss()
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    extra = {"config": cfg.to_dict(), "steps_per_epoch": steps_per_epoch}

    def save(path: str, epoch: int, complete: bool, in_epoch: int) -> None:
        if dist.main:
            save_checkpoint(path, net, vocab, optimizer=opt, scheduler=sched, scaler=scaler, step=step,
                            epoch=epoch, epoch_complete=complete, step_in_epoch=in_epoch, history=history,
                            best_val_loss=best, bad_epochs=bad_epochs, **extra)

    progress = Progress(total_steps, enabled=dist.main)
    t_start = time.perf_counter()
    steps_at_start = step
    stopped = ""
    try:
        for epoch in range(start_epoch, t_cfg.num_epochs + 1):
            t_epoch = time.perf_counter()
            rng = np.random.default_rng([t_cfg.seed, epoch, dist.rank])
            lazy = d_cfg.lazy_loading
            # chunks of a quarter of the shuffle buffer, read in a random order: batches mix the whole input
            chunks = cache.chunks("train", dist.rank, dist.world, d_cfg.validation_split, t_cfg.seed,
                                  tokens_per_chunk=max(256, lazy.buffer_size // 4),
                                  order=rng if lazy.shuffle_buffer else None)
            batches = shuffled_batches(chunks, per_rank_batch, lazy.buffer_size, lazy.shuffle_buffer, rng)
            net.train()
            total, n_loss, recent = 0.0, 0, []
            for in_epoch, batch in enumerate(batches, start=1):
                if in_epoch > steps_per_epoch:
                    break
                if in_epoch <= skip:  # resuming inside an epoch: the same batches, already trained on
                    continue
                x = torch.from_numpy(batch.windows).to(dist.device, non_blocking=True)
                y = torch.from_numpy(batch.targets).to(dist.device, non_blocking=True)
                with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                    loss = loss_fn(net(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(net.parameters(), t_cfg.max_grad_norm)
                scaler.step(opt)
                scaler.update()
                if sched is not None and t_cfg.lr_schedule == "cosine":
                    sched.step()
                step += 1
                value = float(loss.detach())
                total, n_loss = total + value, n_loss + 1
                recent = (recent + [value])[-max(1, t_cfg.log_every):]
                progress.update(step, value, epoch)
                if dist.main and t_cfg.log_every and step % t_cfg.log_every == 0:
                    elapsed = time.perf_counter() - t_start
                    rate = (step - steps_at_start) / max(elapsed, 1e-9)
                    gpus = gpu_stats() if cuda else []
                    log.info(step_line(step, float(np.mean(recent)), total / n_loss, opt.param_groups[0]["lr"],
                                       elapsed, (total_steps - step) / max(rate, 1e-9), gpus))
                    if gpus and t_cfg.gpu_stats_every and step % t_cfg.gpu_stats_every == 0:
                        log.info(gpu_block(gpus, step))
                if t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0:
                    save(os.path.join(ckpt_dir, f"step_{step}.pt"), epoch, False, in_epoch)
                    _prune_step_checkpoints(ckpt_dir, t_cfg.keep_step_checkpoints, dist.main)
                if t_cfg.max_steps and step >= t_cfg.max_steps:
                    stopped = f"max_steps {t_cfg.max_steps} reached"
                    break
            skip = 0
            tot, cnt = dist.sum(total, n_loss)
            train_loss = tot / max(cnt, 1)
            val_loss = validation_loss(net, cache, cfg, dist)
            if sched is not None and t_cfg.lr_schedule == "plateau":
                sched.step(val_loss if val_loss is not None else train_loss)
            lr = opt.param_groups[0]["lr"]
            for k, v in (("epoch", epoch), ("train_loss", train_loss), ("val_loss", val_loss),
                         ("learning_rate", lr), ("epoch_time_s", time.perf_counter() - t_epoch), ("steps", step)):
                history[k].append(v)
            watched = val_loss if val_loss is not None else train_loss
            improved = watched < best - t_cfg.early_stopping.min_delta
            if improved:
                best, bad_epochs = watched, 0
            else:
                bad_epochs += 1
            log.info("epoch %d: train loss %.4f, validation loss %s, lr %.2e, %s%s", epoch, train_loss,
                     "-" if val_loss is None else f"{val_loss:.4f}", lr, human_duration(history["epoch_time_s"][-1]),
                     " (best)" if improved else "")
            save(os.path.join(ckpt_dir, f"epoch_{epoch}.pt"), epoch, not stopped, 0)
            if improved:
                save(os.path.join(ckpt_dir, "best_model.pt"), epoch, not stopped, 0)
            if dist.main:
                write_history(cfg.output_dir, history)
                plot_history(cfg.output_dir, history)
            if stopped:
                break
            if t_cfg.early_stopping.enabled and bad_epochs >= t_cfg.early_stopping.patience:
                stopped = f"early stopping: no improvement >= {t_cfg.early_stopping.min_delta} in {bad_epochs} epochs"
                break
    finally:
        progress.close()
    seconds = time.perf_counter() - t_start
    log.info("training finished in %s (%d steps)%s; best loss %.4f", human_duration(seconds), step,
             f": {stopped}" if stopped else "", best)
    summary: dict[str, Any] = {"output_dir": cfg.output_dir, "best_model": os.path.join(ckpt_dir, "best_model.pt"),
                               "history": history, "best_loss": best, "steps": step, "seconds": seconds,
                               "stopped": stopped, "device": str(dist.device), "world": dist.world}
    dist.barrier()
    if evaluate_after and dist.main and os.path.exists(summary["best_model"]):
        from rankwatch.deeplog.evaluate import evaluate

        summary["evaluation"] = evaluate(summary["best_model"], cfg, output_dir=cfg.output_dir,
                                         device=str(dist.device))
    return summary


@torch.no_grad()
def validation_loss(net: nn.Module, cache: KeyCache, cfg: DeepLogConfig, dist: Distributed) -> float | None:
    if cfg.data.validation_split <= 0:
        return None
    net.eval()
    total, n = 0.0, 0
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    model = unwrap(net)  # no gradient sync needed: each process sums its shard, then all-reduce
    cap = cfg.data.max_validation_windows // dist.world if cfg.data.max_validation_windows else 0
    for chunk in cache.chunks("val", dist.rank, dist.world, cfg.data.validation_split, cfg.training.seed):
        if cap and n >= cap:  # the same pieces every epoch (file order), so epochs compare
            break
        for s in range(0, len(chunk.targets), 4096):
            x = torch.from_numpy(chunk.windows[s:s + 4096]).to(dist.device)
            y = torch.from_numpy(chunk.targets[s:s + 4096]).to(dist.device)
            total += float(loss_fn(model.forward_bucketed(x).float(), y))
            n += len(y)
    total, n = dist.sum(total, n)
    return total / n if n else None


def _prune_step_checkpoints(ckpt_dir: str, keep: int, main: bool) -> None:
    if not main or keep <= 0:
        return
    files = sorted(glob.glob(os.path.join(ckpt_dir, "step_*.pt")),
                   key=lambda p: int(os.path.basename(p)[5:-3]))
    for old in files[:-keep]:
        try:
            os.remove(old)
        except OSError:
            pass
