"""OpenMMLab's mmengine runner (MMDetection, MMSegmentation, MMPretrain, MMOCR, XTuner, ...) training log lines.

    06/13 19:41:43 - mmengine - INFO - Iter(train) [110/768]  lr: 1.9350e-04  eta: 0:08:04  time: 4.8321
        data_time: 4.5121  memory: 5661  loss: 0.0584                                   (by iteration: step 110)
    2022/12/13 19:00:12 - mmengine - INFO - Epoch(train) [1][  50/3104]  lr: 1.0000e-02  eta: 0:26:28
        time: 0.1285  data_time: 0.0040  memory: 2581  grad_norm: 8.5647  loss: 0.7176  loss_cls: 0.3771
    2023/06/08 21:40:47 - mmengine - INFO - Epoch(val) [86][28/28]  accuracy/top1: 70.7207  data_time: 0.0004

`Iter(train)` / `Epoch(train)`: `metrics` with step (the iteration; by epoch, (epoch - 1) x batches per epoch +
batch), epoch, loss, grad_norm, lr, step_time_s (`time`, seconds per iteration, averaged over the logging
interval like every value here), data_time_s, memory_gib (`memory` is MiB), and other numeric fields (loss_cls,
acc, ...) under their names. `(val)` / `(test)`: a `log` with event `eval`. The time prefix has no year in
mmengine's default format (`%m/%d %H:%M:%S`): docs/FORMATS.md.
"""

from __future__ import annotations

import re
from typing import Any

from rankwatch.formats.base import Parsed, SourceContext, key_name, need_number, number

NAME = "mmengine"
_HEAD = re.compile(r"\b(Iter|Epoch)\((train|val|test)\)\s*\[\s*(\d+)\s*\](?:\[\s*(\d+)\s*/\s*(\d+)\s*\])?|"
                   r"\bIter\((train|val|test)\)\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]")
_FIELD = re.compile(r"([A-Za-z_][\w/.-]*):\s+(\S+)")
_NAMES = {"lr": "lr", "time": "step_time_s", "data_time": "data_time_s", "loss": "loss", "grad_norm": "grad_norm"}
_SKIP = {"eta", "base_lr"}
MAX_EXTRA = 16


def parse(body: str, ctx: SourceContext) -> Parsed | None:
    m = _HEAD.search(body)
    if m is None:
        return None
    if m.group(6):  # Iter(train) [110/768]
        phase, step, total, epoch = m.group(6), int(m.group(7)), int(m.group(8)), None
    elif m.group(1) == "Iter":  # Iter(train) [110] without a total
        phase, step, total, epoch = m.group(2), int(m.group(3)), None, None
    else:  # Epoch(train) [1][ 50/3104]
        phase, epoch = m.group(2), int(m.group(3))
        batch, per_epoch = int(m.group(4) or 0), int(m.group(5) or 0)
        step, total = (epoch - 1) * per_epoch + batch if per_epoch else epoch, None
    fields: dict[str, Any] = {}
    extra = 0
    for name, value in _FIELD.findall(body[m.end():]):
        if name in _SKIP:
            continue
        if name in _NAMES:
            fields[_NAMES[name]] = need_number(value, name, NAME)
        elif name == "memory":
            fields["memory_gib"] = need_number(value, name, NAME) / 1024.0
        elif extra < MAX_EXTRA and (x := number(value)) is not None:
            fields.setdefault(key_name(name), x)
            extra += 1
    if phase != "train":  # an evaluation's batches: the epoch (or the training iteration) it evaluates
        at = {"epoch": epoch} if epoch is not None else {"step": step}
        return Parsed("log", {"event": "eval", "fields": {"format": NAME, "split": phase, **at, **fields}})
    data: dict[str, Any] = {"step": step, **fields}
    if epoch is not None:
        data["epoch"] = epoch
    if total is not None:
        data["train_iters"] = total
    return Parsed("metrics", data)


__all__ = ["NAME", "parse"]
