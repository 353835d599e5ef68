"""nanoGPT's `train.py` and llm.c's `train_gpt2` step lines.

    iter 2920: loss 3.9883, time 1099.34ms, mfu 15.34%          (nanoGPT; older versions print no mfu)
    step 3000: train loss 4.0390, val loss 4.0427                 (nanoGPT evaluation: event `eval`, not loss)
    step   10/74 | loss     nan (+nanz)| norm    nan (+nanz)| lr 3.00e-04 | 36.58 ms | 9.2% bf16 MFU | 112241 tok/s

nanoGPT: step, loss, step_time_s (from ms), mfu (percent; its first iterations print the placeholder -100%,
dropped). llm.c: step, loss, grad_norm, lr, step_time_s, mfu, tokens_per_s and throughput (tokens/s).
"""

from __future__ import annotations

import re
from typing import Any

from rankwatch.formats.base import Parsed, SourceContext, need_number, number

NAME = "nanogpt"
LLMC = "llm.c"
_ITER = re.compile(r"\biter (\d+): loss (\S+?), time ([-+\w.]+?) ?ms(?:, mfu (\S+?)%)?(?:,|\s|$)")
_EVAL = re.compile(r"\bstep (\d+): train loss (\S+?), val loss (\S+)")
_LLMC = re.compile(r"\bstep\s+(\d+)/(\d+) \|")
_LLMC_PART = re.compile(r"^(loss|norm|lr)\s+(\S+)|^([-+\w.]+) ms$|^([-+\w.]+)%.*MFU$|^([-+\w.]+) tok/s$")


def parse_iter(body: str, ctx: SourceContext) -> Parsed | None:
    m = _ITER.search(body)
    if m is None:
        return None
    data: dict[str, Any] = {"step": int(m.group(1)), "loss": need_number(m.group(2), "loss", NAME),
                            "step_time_s": need_number(m.group(3), "time", NAME) / 1000.0}
    if m.group(4) is not None:
        mfu = need_number(m.group(4), "mfu", NAME)
        if mfu >= 0:
            data["mfu"] = mfu
    return Parsed("metrics", data)


def parse_eval(body: str, ctx: SourceContext) -> Parsed | None:
    m = _EVAL.search(body)
    if m is None:
        return None
    fields = {"format": NAME, "step": int(m.group(1)), "train_loss": number(m.group(2)),
              "val_loss": number(m.group(3).rstrip(","))}
    return Parsed("log", {"event": "eval", "fields": fields})


def parse_llmc(body: str, ctx: SourceContext) -> Parsed | None:
    m = _LLMC.search(body)
    if m is None:
        return None
    data: dict[str, Any] = {"step": int(m.group(1)), "train_iters": int(m.group(2))}
    for part in body[m.end():].split("|"):
        p = _LLMC_PART.match(part.strip())
        if p is None:
            continue
        if p.group(1):
            name = {"loss": "loss", "norm": "grad_norm", "lr": "lr"}[p.group(1)]
            data[name] = need_number(p.group(2), p.group(1), LLMC)
        elif p.group(3):
            data["step_time_s"] = need_number(p.group(3), "ms", LLMC) / 1000.0
        elif p.group(4):
            data["mfu"] = need_number(p.group(4), "MFU", LLMC)
        elif p.group(5):
            data["tokens_per_s"] = data["throughput"] = need_number(p.group(5), "tok/s", LLMC)
    return Parsed("metrics", data)


__all__ = ["NAME", "LLMC", "parse_iter", "parse_eval", "parse_llmc"]
