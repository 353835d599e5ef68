"""The simulator's job (rankwatch.simulate.metric_rows) written as each framework writes its logs, with the lines
around them that real runs print, so detection can be measured on every built-in format.

    megatron      rank<r>/stdout.log: ` [date] iteration ...|` lines, timers, memory report, checkpoints, eval
    hf_trainer    rank<r>/train.log: `{'loss': ..}` dicts, tqdm bars, eval dicts, the final summary
    deepspeed     rank<r>/train.log: pipeline `steps: N loss: ...` lines, engine/timer lines, config dump
    torchtitan    rank<r>/stdout.log: `[rank<r>]:[titan] date - root - INFO - step: ...` (plain or ANSI colours)
    nanogpt       rank<r>/train.log: `iter N: loss X, time T ms, mfu M%`, eval and checkpoint lines
    lightning_csv rank<r>/lightning_logs/version_0/metrics.csv (+ hparams.yaml)
    mmengine      rank<r>/<timestamp>.log: `date - mmengine - INFO - Iter(train) [N/total]  lr: ...  time: ...`

Each format prints what the framework prints, no more: nanoGPT has no grad norm, DeepSpeed's pipeline line none
either, HF Trainer no step time or throughput, torchtitan tokens/s but no step time, mmengine step time but no throughput. `SIGNALS` says which
metrics a format carries, `STEP_OFFSET` how its step numbers relate to the simulator's (Megatron, DeepSpeed,
torchtitan and mmengine count from 1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from rankwatch.simulate import Scenario, metric_rows

Lines = dict[str, list[tuple[float, str]]]  # relative path -> (event time, line)

SIGNALS: dict[str, set[str]] = {
    "megatron": {"loss", "grad_norm", "throughput", "step_time_s", "lr"},
    "hf_trainer": {"loss", "grad_norm", "lr"},
    "deepspeed": {"loss", "throughput", "step_time_s", "lr"},
    "torchtitan": {"loss", "grad_norm", "throughput"},
    "torchtitan_ansi": {"loss", "grad_norm", "throughput"},
    "nanogpt": {"loss", "step_time_s"},
    "lightning_csv": {"loss", "grad_norm", "lr"},
    "mmengine": {"loss", "grad_norm", "step_time_s", "lr"},
}
STEP_OFFSET = {"megatron": 1, "deepspeed": 1, "torchtitan": 1, "torchtitan_ansi": 1, "mmengine": 1}
GBS = 256  # global batch size: the simulator's throughput is 256 / step time
SEQ = 2048


def _date(ts: float, ms: bool = False) -> str:
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return dt.strftime("%Y-%m-%d %H:%M:%S") + (f",{dt.microsecond // 1000:03d}" if ms else "")


def _e(x: float, digits: int = 6) -> str:
    """Python's %E, which Megatron uses: NAN / INF stay readable."""
    return f"{x:.{digits}E}"


def megatron(sc: Scenario) -> Lines:
    out: Lines = {}
    rng = np.random.default_rng(sc.seed + 101)
    for r, rows in metric_rows(sc).items():
        f = out.setdefault(f"rank{r}/stdout.log", [])
        t0 = rows[0]["ts"] - 30
        f += [(t0, "using world size: 8, data-parallel size: 8, tensor-model-parallel size: 1"),
              (t0, "------------------------ arguments ------------------------"),
              (t0, "  global_batch_size ............................... 256"),
              (t0, "  log_interval .................................... 1"),
              (t0, "> building train, validation, and test datasets ..."),
              (t0 + 20, f"[after dataloaders are built] datetime: {_date(t0 + 20)} "),
              (t0 + 21, "training ...")]
        samples = 0
        for row in rows:
            ts, step = row["ts"], row["step"] + 1
            samples += GBS
            nan = 0 if math.isfinite(row["loss"]) else 1
            tflops = 180.0 * row["throughput"] / 1000.0
            f.append((ts, f" [{_date(ts)}] iteration {step:8d}/{sc.steps:8d} | consumed samples: {samples:12d} | "
                          f"elapsed time per iteration (ms): {row['step_time_s'] * 1000:.1f} | throughput per GPU "
                          f"(TFLOP/s/GPU): {tflops:.1f} | learning rate: {_e(row['lr'])} | global batch size: "
                          f"{GBS:5d} | lm loss: {_e(row['loss'])} | loss scale: 1.0 | grad norm: "
                          f"{row['grad_norm']:.3f} | number of skipped iterations:   0 | number of nan iterations: "
                          f"{nan:3d} |"))
            if step % 10 == 0 or rng.random() < 0.05:
                f.append((ts, f"time (ms) | forward-compute: {rng.uniform(90, 110):.2f} | backward-compute: "
                              f"{rng.uniform(180, 220):.2f} | optimizer: {rng.uniform(20, 30):.2f}"))
            if step == 1:
                f.append((ts, f"[Rank {r}] (after 1 iterations) memory (MB) | allocated: 20123.5 | max allocated: "
                              "31234.9 | reserved: 33000.0 | max reserved: 33000.0"))
            if sc.checkpoint_every and step % sc.checkpoint_every == 0:
                f.append((ts, f"saving checkpoint at iteration {step:7d} to /ckpt/run"))
                f.append((ts, f"validation loss at iteration {step} | lm loss value: {_e(row['loss'] * 1.02)} | "
                              f"lm loss PPL: {_e(math.exp(min(row['loss'], 50)))} | "))
    return out


def hf_trainer(sc: Scenario) -> Lines:
    out: Lines = {}
    for r, rows in metric_rows(sc).items():
        f = out.setdefault(f"rank{r}/train.log", [])
        t0 = rows[0]["ts"] - 10
        f += [(t0, "***** Running training *****"), (t0, "  Num examples = 76,800"),
              (t0, "  Total optimization steps = " + str(sc.steps)),
              (t0, f"  0%|          | 0/{sc.steps} [00:00<?, ?it/s]")]
        for row in rows:
            ts, step = row["ts"], row["step"]
            done = step + 1
            f.append((ts, f" {done * 100 // sc.steps:2d}%|{'█' * (done * 10 // sc.steps):<10}| {done}/{sc.steps} "
                          f"[00:{done // 2:02d}<{(sc.steps - done) // 2:02d}:00,  2.00it/s]"))
            loss, epoch = round(row["loss"], 4), round(done / sc.steps, 2)
            f.append((ts, f"{{'loss': {loss!r}, 'grad_norm': {row['grad_norm']!r}, 'learning_rate': "
                          f"{row['lr']!r}, 'epoch': {epoch!r}}}" + " " * 40))
            if sc.checkpoint_every and done % sc.checkpoint_every == 0:
                f.append((ts, f"{{'eval_loss': {round(loss * 1.05, 4)!r}, 'eval_runtime': 12.3456, "
                              f"'eval_samples_per_second': 81.0, 'eval_steps_per_second': 10.125, 'epoch': "
                              f"{epoch!r}}}"))
                f.append((ts, f"Saving model checkpoint to /ckpt/run/checkpoint-{done}"))
        f.append((rows[-1]["ts"], "{'train_runtime': 150.1234, 'train_samples_per_second': 512.0, "
                                  "'train_steps_per_second': 2.0, 'train_loss': 2.345, 'epoch': 1.0}"))
    return out


def deepspeed(sc: Scenario) -> Lines:
    out: Lines = {}
    for r, rows in metric_rows(sc).items():
        f = out.setdefault(f"rank{r}/train.log", [])
        t0 = rows[0]["ts"] - 5
        f += [(t0, f"[{_date(t0, True)}] [INFO] [config.py:1000:print] DeepSpeedEngine configuration:"),
              (t0, f"[{_date(t0, True)}] [INFO] [config.py:1004:print]   steps_per_print .............. 1"),
              (t0, f"[{_date(t0, True)}] [INFO] [config.py:1004:print]   train_batch_size ............. {GBS}")]
        for row in rows:
            ts, step = row["ts"], row["step"] + 1
            f.append((ts, f"steps: {step} loss: {row['loss']:0.4f} iter time (s): {row['step_time_s']:0.3f} "
                          f"samples/sec: {row['throughput']:0.3f}"))
            if step % 10 == 0:
                f.append((ts, f"[{_date(ts, True)}] [INFO] [logging.py:96:log_dist] [Rank {r}] step={step}, "
                              f"skipped=0, lr=[{row['lr']!r}], mom=[(0.9, 0.95)]"))
                f.append((ts, f"[{_date(ts, True)}] [INFO] [timer.py:260:stop] epoch=0/micro_step={step * 4}/"
                              f"global_step={step}, RunningAvgSamplesPerSec={row['throughput']!r}, "
                              f"CurrSamplesPerSec={row['throughput']!r}, MemAllocated=30.1GB, "
                              f"MaxMemAllocated=35.2GB"))
            if sc.checkpoint_every and step % sc.checkpoint_every == 0:
                f.append((ts, f"[{_date(ts, True)}] [INFO] [logging.py:96:log_dist] [Rank {r}] Saving model "
                              f"checkpoint: /ckpt/run/global_step{step}/mp_rank_00_model_states.pt"))
    return out


_COLOURS = {"red": "\x1b[31m", "green": "\x1b[32m", "orange": "\x1b[38;2;255;165;0m", "turquoise":
            "\x1b[38;2;54;234;195m", "blue": "\x1b[34m", "cyan": "\x1b[36m", "magenta": "\x1b[35m",
            "reset": "\x1b[39m"}


def _torchtitan(sc: Scenario, colours: bool) -> Lines:
    c = _COLOURS if colours else dict.fromkeys(_COLOURS, "")
    out: Lines = {}
    for r, rows in metric_rows(sc).items():
        f = out.setdefault(f"rank{r}/stdout.log", [])
        pre = f"[rank{r}]:[titan] "
        t0 = rows[0]["ts"] - 8
        f += [(t0, f"{pre}{_date(t0, True)} - root - INFO - Starting job: Llama 3 8B training"),
              (t0, f"{pre}{_date(t0, True)} - root - INFO - Building llama3 8B with TransformerModelArgs(dim=4096)"),
              (t0, f"{pre}{_date(t0, True)} - root - INFO - Training starts at step 1.")]
        for row in rows:
            ts, step = row["ts"], row["step"] + 1
            tps = round(row["throughput"] * SEQ / 8)
            mem = 49.66 + 0.01 * (step % 7)
            mfu = 34.0 * row["throughput"] / 1000.0
            f.append((ts, f"{pre}{_date(ts, True)} - root - INFO - {c['red']}step: {step:2}  {c['green']}loss: "
                          f"{row['loss']:8.5f}  {c['orange']}grad_norm: {row['grad_norm']:7.4f}  {c['turquoise']}"
                          f"memory: {mem:5.2f}GiB({mem / 95.0 * 100:.2f}%)  {c['blue']}tps: {tps:,}  {c['cyan']}"
                          f"tflops: {mfu * 9.89:,.2f}  {c['magenta']}mfu: {mfu:.2f}%{c['reset']}"))
            if step % 50 == 0:
                f.append((ts, f"{pre}{_date(ts, True)} - root - INFO - [GC] Peforming periodical GC collection. "
                              "0.06 seconds."))
            if sc.checkpoint_every and step % sc.checkpoint_every == 0:
                f.append((ts, f"{pre}{_date(ts, True)} - root - INFO - Saving the checkpoint (or staging if async "
                              f"is enabled)."))
    return out


def torchtitan(sc: Scenario) -> Lines:
    return _torchtitan(sc, colours=False)


def torchtitan_ansi(sc: Scenario) -> Lines:
    return _torchtitan(sc, colours=True)


def nanogpt(sc: Scenario) -> Lines:
    out: Lines = {}
    for r, rows in metric_rows(sc).items():
        f = out.setdefault(f"rank{r}/train.log", [])
        t0 = rows[0]["ts"] - 3
        f += [(t0, "tokens per iteration will be: 491,520"), (t0, "Initializing a new model from scratch"),
              (t0, "number of parameters: 123.59M"), (t0, "compiling the model... (takes a ~minute)")]
        for row in rows:
            ts, step = row["ts"], row["step"]
            mfu = -100.0 if step < 5 else 40.0 * row["throughput"] / 1000.0
            if sc.checkpoint_every and step and step % sc.checkpoint_every == 0:
                f.append((ts, f"step {step}: train loss {row['loss']:.4f}, val loss {row['loss'] * 1.03:.4f}"))
                f.append((ts, "saving checkpoint to out"))
            f.append((ts, f"iter {step}: loss {row['loss']:.4f}, time {row['step_time_s'] * 1000:.2f}ms, "
                          f"mfu {mfu:.2f}%"))
    return out


def lightning_csv(sc: Scenario) -> Lines:
    out: Lines = {}
    for r, rows in metric_rows(sc).items():
        base = f"rank{r}/lightning_logs/version_0/"
        out[base + "hparams.yaml"] = [(rows[0]["ts"], "lr: 0.0003"), (rows[0]["ts"], "batch_size: 32")]
        f = out.setdefault(base + "metrics.csv", [])
        f.append((rows[0]["ts"], "epoch,grad_norm,lr-AdamW,step,train_loss_step,val_loss"))
        for row in rows:
            ts, step = row["ts"], row["step"]
            f.append((ts, f"0,{row['grad_norm']!r},{row['lr']!r},{step},{row['loss']!r},"))
            if sc.checkpoint_every and step and step % sc.checkpoint_every == 0:
                f.append((ts, f"0,,,{step},,{row['loss'] * 1.03!r}"))
    return out


def mmengine(sc: Scenario) -> Lines:
    """An iteration-based mmengine runner (MMDetection, MMPretrain, XTuner): its `Runner` logs each rank's
    `Iter(train)` lines with the yearful `%Y/%m/%d` date, `Iter(val)` results and `Saving checkpoint at N
    iterations` (a rank's own file, as `log_file` per rank gives)."""
    out: Lines = {}
    rng = np.random.default_rng(sc.seed + 307)
    width = len(str(sc.steps))
    for r, rows in metric_rows(sc).items():
        f = out.setdefault(f"rank{r}/20240613_193845.log", [])
        t0 = rows[0]["ts"] - 12

        def say(ts: float, msg: str, f: list[tuple[float, str]] = f) -> None:
            stamp = datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y/%m/%d %H:%M:%S")
            f.append((ts, f"{stamp} - mmengine - INFO - {msg}"))

        say(t0, f"Config:\ntrain_cfg = dict(by_epoch=False, max_iters={sc.steps}, val_interval=50)")
        say(t0 + 1, "Checkpoints will be saved to /work_dirs/run.")
        for row in rows:
            ts, step = row["ts"], row["step"] + 1
            eta = int((sc.steps - step) * row["step_time_s"])
            say(ts, f"Iter(train) [{step:>{width}}/{sc.steps}]  lr: {row['lr']:.4e}  eta: {eta // 3600}:"
                    f"{eta // 60 % 60:02d}:{eta % 60:02d}  time: {row['step_time_s']:.4f}  data_time: "
                    f"{rng.uniform(0.002, 0.02):.4f}  memory: {5661 + step % 7}  grad_norm: {row['grad_norm']:.4f}  "
                    f"loss: {row['loss']:.4f}")
            if step % 10 == 0:
                say(ts, "Exp name: internlm2_chat_7b_qlora_alpaca_e3_20240613_193845")
            if sc.checkpoint_every and step % sc.checkpoint_every == 0:
                say(ts, f"Saving checkpoint at {step} iterations")
                say(ts, f"Iter(val) [8/8]    accuracy/top1: {rng.uniform(60, 70):.4f}  data_time: 0.0028  "
                        "time: 0.0232")
    return out


RENDERERS: dict[str, Callable[[Scenario], Lines]] = {
    "megatron": megatron, "hf_trainer": hf_trainer, "deepspeed": deepspeed, "torchtitan": torchtitan,
    "torchtitan_ansi": torchtitan_ansi, "nanogpt": nanogpt, "lightning_csv": lightning_csv, "mmengine": mmengine,
}


def write_format_job(sc: Scenario, fmt: str, directory: str | os.PathLike[str]) -> int:
    """Write the job's logs in `fmt` below `directory`; returns the number of lines written."""
    n = 0
    for rel, lines in RENDERERS[fmt](sc).items():
        path = Path(directory) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            for _, text in sorted(lines, key=lambda x: x[0]):  # stable: a step's lines keep their order
                fh.write(text + "\n")
                n += 1
    return n


__all__ = ["RENDERERS", "SIGNALS", "STEP_OFFSET", "write_format_job"]
