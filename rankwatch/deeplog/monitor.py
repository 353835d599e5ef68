"""What a long training run tells the person watching it: a log line every N steps (loss, running average,
learning rate, per-GPU memory and utilisation, elapsed time and ETA), a per-GPU block (memory, utilisation,
temperature, power) from NVML when there are GPUs, a progress bar on a terminal, and the loss curves as a plot.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

log = logging.getLogger("rankwatch.deeplog")


def human_duration(seconds: float) -> str:
    if seconds != seconds or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h {rem // 60}m"


def gpu_stats() -> list[dict[str, Any]]:
    """Per visible GPU: memory used/total (MB), utilisation %, temperature C, power W. [] without NVML."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: a CPU machine
        return []
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            entry: dict[str, Any] = {"gpu": i, "mem_used_mb": mem.used / 2**20, "mem_total_mb": mem.total / 2**20}
            for name, fn in (("util_pct", lambda h=h: pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                             ("temp_c", lambda h=h: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
                             ("power_w", lambda h=h: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0)):
                try:
                    entry[name] = fn()
                except Exception:  # noqa: BLE001 - not every GPU reports every field
                    entry[name] = None
            out.append(entry)
    except Exception:  # noqa: BLE001
        return out
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return out


def gpu_brief(stats: list[dict[str, Any]]) -> str:
    return " ".join(f"[{g['gpu']}:{g['mem_used_mb']:.0f}MB|{g['util_pct'] if g['util_pct'] is not None else '?'}%]"
                    for g in stats)


def gpu_block(stats: list[dict[str, Any]], step: int) -> str:
    lines = [f"GPU status (step {step}):"]
    for g in stats:
        pct = 100.0 * g["mem_used_mb"] / g["mem_total_mb"] if g["mem_total_mb"] else 0.0
        lines.append(f"  GPU {g['gpu']}: memory {g['mem_used_mb']:.0f}/{g['mem_total_mb']:.0f}MB ({pct:.1f}%) | "
                     f"util {_v(g['util_pct'], '%')} | temp {_v(g['temp_c'], 'C')} | power {_v(g['power_w'], 'W')}")
    return "\n".join(lines)


def _v(x: Any, unit: str) -> str:
    return "?" if x is None else f"{x:.0f}{unit}"


def step_line(step: int, loss: float, avg: float, lr: float, elapsed: float, eta: float,
              gpus: list[dict[str, Any]]) -> str:
    gpu = f" | GPU: {gpu_brief(gpus)}" if gpus else ""
    return (f"[Step {step}] Loss: {loss:.4f} (avg: {avg:.4f}) | LR: {lr:.2e}{gpu} | "
            f"Time: {human_duration(elapsed)} (ETA: {human_duration(eta)})")


class Progress:
    """A rich progress bar when stderr is a terminal (and this is the main process); otherwise nothing."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                    TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("training", total=total, loss="-")
            self.bar.start()

    def update(self, completed: int, loss: float, epoch: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, loss=f"{loss:.4f}", description=f"epoch {epoch}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def write_history(output_dir: str, history: dict[str, list]) -> str:
    path = os.path.join(output_dir, "training_history.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(history, fh, indent=2)
    os.replace(tmp, path)
    return path


def plot_history(output_dir: str, history: dict[str, list]) -> str | None:
    """training_curve.png: train/validation loss and the learning rate per epoch."""
    if not history.get("train_loss"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = history.get("epoch") or list(range(1, len(history["train_loss"]) + 1))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, history["train_loss"], marker="o", label="train")
    if any(v is not None for v in history.get("val_loss", [])):
        ax1.plot(epochs, [v if v is not None else float("nan") for v in history["val_loss"]], marker="o",
                 label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss (cross-entropy)")
    ax1.set_title("DeepLog loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, history.get("learning_rate", []), marker="o", color="tab:green")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("learning rate")
    ax2.set_title("learning rate (end of epoch)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(output_dir, "training_curve.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
