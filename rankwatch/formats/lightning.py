"""PyTorch Lightning's CSVLogger `metrics.csv` (any `*.csv` file whose header names a `step` or `epoch` column).

    epoch,step,train_loss_step,train_loss_epoch,val_loss,lr-AdamW
    0,49,8.62,,,0.001
    0,286,,,6.83,

Header-driven: the file's first line (and any later header, Lightning rewrites the file when a new metric
appears) names the columns. A row with training values is a metrics record: loss from `train_loss_step` >
`train_loss` > `loss` > `train/loss` (never the `*_epoch` aggregates), grad_norm from `grad_norm` /
`train/grad_norm` / `grad_2.0_norm_total`, lr from `lr` or the LearningRateMonitor's `lr-<Optimizer>`,
throughput from `*samples_per_sec` (ThroughputMonitor), mfu from `*mfu`, epoch, step (else the file's step
counter). A row with only validation/test values is a log record with event `eval`. Empty cells are absent.
"""

from __future__ import annotations

import csv
import math
from typing import Any

from rankwatch.formats.base import Parsed, SourceContext, key_name, need_int, need_number, number

NAME = "lightning_csv"
_LOSS = ("train_loss_step", "train_loss", "loss", "train/loss", "loss_step", "train/loss_step")
_GRAD = ("grad_norm", "train/grad_norm", "grad_norm_step", "grad_2.0_norm_total", "grad_2.0_norm_total_step")
_EVAL_PREFIXES = ("val", "valid", "test", "eval")


def _is_header(cells: list[str]) -> bool:
    return ("step" in cells or "epoch" in cells) and all(number(c) is None for c in cells if c)


def _split(line: str) -> list[str]:
    if '"' in line:
        try:
            return next(csv.reader([line]), [])
        except csv.Error:  # e.g. a bare carriage return in a field: not a row we can read, a plain log line
            return []
    return line.split(",")


def parse(body: str, ctx: SourceContext) -> Parsed | None:
    """The raw line (CSV rows carry no prefix or time)."""
    line = body.strip()
    if not line:
        return None
    cells = [c.strip() for c in _split(line)]
    if _is_header(cells):
        ctx.csv_header = cells
        return Parsed("log", {"event": "csv_header", "fields": {"format": NAME, "columns": cells}})
    header = ctx.csv_header
    if header is None or len(cells) != len(header):
        return None
    row = {h: c for h, c in zip(header, cells, strict=True) if c != ""}
    data: dict[str, Any] = {}
    for names, field in ((_LOSS, "loss"), (_GRAD, "grad_norm")):
        for n in names:
            if n in row:
                data[field] = need_number(row[n], n, NAME)
                break
    for col, value in row.items():
        low = col.lower()
        if low == "lr" or low.startswith("lr-") or low.startswith("lr/"):
            data.setdefault("lr", need_number(value, col, NAME))
        elif low.endswith("samples_per_sec"):
            data.setdefault("throughput", need_number(value, col, NAME))
        elif low.endswith("mfu"):
            data.setdefault("mfu", need_number(value, col, NAME))
    if not data:
        evals = {key_name(k): number(v) for k, v in row.items() if k.lower().startswith(_EVAL_PREFIXES)}
        if not evals:
            return Parsed("log", {"event": "csv_row", "fields": {"format": NAME, **{key_name(k): number(v)
                                                                                     for k, v in row.items()}}})
        fields = {"format": NAME, **evals}
        step = number(row["step"]) if "step" in row else None
        if step is not None and math.isfinite(step) and step == int(step):
            fields["step"] = int(step)
        return Parsed("log", {"event": "eval", "fields": fields})
    if "step" in row:
        data["step"] = need_int(row["step"], "step", NAME)
    else:
        data["step"], data["step_counted"] = ctx.next_step(), True
    if "epoch" in row:
        data["epoch"] = need_number(row["epoch"], "epoch", NAME)
    return Parsed("metrics", data)


__all__ = ["NAME", "parse"]
