"""torchtitan's metrics line (`torchtitan/components/metrics.py`), coloured with ANSI codes on a terminal:

    [rank0]:[titan] 2025-06-16 22:30:50,322 - root - INFO - step: 200  loss:  6.1384  memory: 49.66GiB(52.28%)
        tps: 5,856  tflops: 339.16  mfu: 34.29%
    ... step:  4  loss:  7.62585  grad_norm: 26.6250  memory: 66.91GiB(37.51%)  tps: 10,050  tflops: 314.71 ...

Older releases print `wps` (words/s) instead of `tps`. Fields: loss, grad_norm, memory_gib, memory_pct,
tokens_per_s and throughput (both the printed tokens/s: torchtitan prints no samples/s), tflops, mfu (percent,
as printed). With pipeline parallelism the ranks without the last stage print loss -1: that placeholder is
dropped, not read as a loss.
"""

from __future__ import annotations

import re
from typing import Any

from rankwatch.formats.base import Parsed, SourceContext, need_number

NAME = "torchtitan"
_HEAD = re.compile(r"\bstep:\s*(\d+)\s+loss:\s*(\S+)")
_EVAL = re.compile(r"\b(?:validate|validation|val|eval(?:uation)?)\s+$", re.IGNORECASE)
_KV = re.compile(r"\b(grad_norm|memory|tps|wps|tflops|mfu):\s*([-+\w.,]+?)(?:GiB\(([\d.]+)%\)|%)?(?=\s|$)")


def probe(body: str) -> bool:
    return "step:" in body and "loss:" in body


def parse(body: str, ctx: SourceContext) -> Parsed | None:
    m = _HEAD.search(body)
    if m is None or _EVAL.search(body[:m.start()]):
        return None  # a validation loss ("validate step: 16500  loss:  2.4192") is not the training loss
    data: dict[str, Any] = {"step": int(m.group(1))}
    loss = need_number(m.group(2), "loss", NAME)
    if loss != -1.0:
        data["loss"] = loss
    for key, value, pct in _KV.findall(body, m.end()):
        x = need_number(value, key, NAME)
        if key == "memory":
            data["memory_gib"] = x
            if pct:
                data["memory_pct"] = float(pct)
        elif key in ("tps", "wps"):
            data["tokens_per_s"] = x
            data["throughput"] = x
        else:
            data[key] = x
    return Parsed("metrics", data)


__all__ = ["NAME", "probe", "parse"]
