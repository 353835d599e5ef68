"""Hugging Face Trainer / Accelerate / TRL: the dict the Trainer prints at every logging step.

    {'loss': 2.3456, 'grad_norm': 1.23, 'learning_rate': 4.9e-05, 'epoch': 0.01}
    [INFO|trainer.py:2035] 2024-01-15 10:28:50,371 >> {'loss': 0.63, 'learning_rate': 4.9e-05, 'epoch': 0.09}

The dict may follow other text on the line (a logger prefix, a tqdm bar drawn with carriage returns) and trailing
spaces. It carries no step (the TF trainer and some forks add `'step'`): the file's step counter numbers the
lines. Evaluation dicts (`eval_*`, `test_*`, `predict_*` keys) are never training loss: they become log records
with event `eval`. The end-of-training summary (`train_runtime`, `train_samples_per_second`, ...) is an average
over the whole run, not a step: it becomes a log record with event `hf_train_summary`, so no detector takes the
run's mean loss for a step's loss.
"""

from __future__ import annotations

import math
from typing import Any

from rankwatch.formats.base import Parsed, ParseError, SourceContext, key_name
from rankwatch.formats.pyrepr import ReprError, parse_dict

NAME = "hf_trainer"
_RENAME = {"loss": "loss", "train_loss": "loss", "grad_norm": "grad_norm", "learning_rate": "lr", "lr": "lr",
           "epoch": "epoch", "train_samples_per_second": "throughput", "samples_per_second": "throughput",
           "train_tokens_per_second": "tokens_per_s", "tokens_per_second": "tokens_per_s",
           "loss_scale": "loss_scale", "step_time": "step_time_s", "mfu": "mfu", "tflops": "tflops"}
_TRIGGERS = ("loss", "grad_norm", "learning_rate")
_EVAL_PREFIXES = ("eval_", "test_", "predict_")
MAX_EXTRA = 32  # other numeric keys carried along (TRL rewards, token accuracy, ...), bounded


def find_dict(body: str) -> int:
    """Where a `{'`-dict starts in the body, or -1. The dict must close the line."""
    if not body.rstrip().endswith("}"):
        return -1
    return body.find("{'")


def parse(body: str, ctx: SourceContext, start: int) -> Parsed | None:
    try:
        obj = parse_dict(body.rstrip(), start)
    except ReprError:
        return None
    return from_dict(obj, ctx)


def _scalar(value: Any, key: str) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # some trainers log formatted strings: {'loss': '2.205'}
        try:
            return float(value)
        except ValueError:
            if key in _RENAME:
                raise ParseError(f"{NAME}: {key} is not a number: {value[:40]!r}") from None
    return None


def from_dict(obj: dict[str, Any], ctx: SourceContext) -> Parsed | None:
    keys = obj.keys()
    if any(k.startswith(_EVAL_PREFIXES) for k in keys):
        fields = {k: v for k, v in obj.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        return Parsed("log", {"event": "eval", "fields": {"format": NAME, **fields}})
    if "train_runtime" in obj:
        return Parsed("log", {"event": "hf_train_summary", "fields": {
            k: v for k, v in obj.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}})
    if not any(k in obj for k in _TRIGGERS):
        return None  # some other dict: a plain log message
    data: dict[str, Any] = {}
    extra = 0
    for k, v in obj.items():
        x = _scalar(v, k)
        if x is None:
            continue
        name = _RENAME.get(k)
        if name is None:
            if k == "step" or extra >= MAX_EXTRA:
                continue
            name = key_name(k)
            if name in data or name in ("step", "ts", "rank"):
                continue
            extra += 1
        data[name] = x
    step = obj.get("step")
    if isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step) and step == int(step):
        data["step"] = int(step)
    else:
        data["step"], data["step_counted"] = ctx.next_step(), True
    return Parsed("metrics", data)


__all__ = ["NAME", "find_dict", "parse", "from_dict"]
