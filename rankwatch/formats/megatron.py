"""Megatron-LM, NeMo-Megatron and Megatron-DeepSpeed iteration lines (`training_log`), `|`-separated:

     iteration      150/  500000 | consumed samples:        38400 | elapsed time per iteration (ms): 1234.5 |
     throughput per GPU (TFLOP/s/GPU): 243.6 | learning rate: 1.500E-04 | global batch size:   256 |
     lm loss: 2.100E+00 | loss scale: 1.0 | grad norm: 1.200 | number of skipped iterations:   0 |
     number of nan iterations:   0 |

The values are averages over the log interval ending at that iteration. Megatron prints no samples/s: throughput
is derived as global batch size / step time (samples/s); Megatron-DeepSpeed's `samples per second` is taken
as printed. Extra losses (`load_balancing_loss`, `sop loss`, `mtp_1 loss`, ...) are carried under their own
names. When every iteration of the interval was skipped Megatron prints no loss: the record has none. It prints
no loss either when the interval's average is NaN/Inf: where no iteration was skipped or the loss scale is 1,
`loss_missing` says so (the detector raises it as a non-finite loss when the series had a loss before).
"""

from __future__ import annotations

import re
from typing import Any

from rankwatch.formats.base import Parsed, ParseError, SourceContext, key_name, need_int, number
from rankwatch.formats.prefixes import parse_iso

NAME = "megatron"
_ITER = re.compile(r"\biteration\s+(\d+)\s*/\s*(\d+)\s*\|")
_UNIT_TAIL = re.compile(r"^([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*[A-Za-z/]*$")
# label (lowercased, spaces collapsed) -> (field, scale, integer?)
_FIELDS: dict[str, tuple[str, float, bool]] = {
    "consumed samples": ("consumed_samples", 1.0, True),
    "consumed tokens": ("consumed_tokens", 1.0, True),
    "elapsed time per iteration (ms)": ("step_time_s", 1e-3, False),
    "elapsed time per iteration (s)": ("step_time_s", 1.0, False),
    "throughput per gpu (tflop/s/gpu)": ("tflops", 1.0, False),
    "tflops": ("tflops", 1.0, False),
    "approx flops per gpu": ("tflops", 1.0, False),
    "learning rate": ("lr", 1.0, False),
    "global batch size": ("global_batch_size", 1.0, True),
    "lm loss": ("loss", 1.0, False),
    "lm_loss": ("loss", 1.0, False),
    "loss": ("loss", 1.0, False),
    "loss scale": ("loss_scale", 1.0, False),
    "grad norm": ("grad_norm", 1.0, False),
    "num zeros": ("num_zeros", 1.0, False),
    "params norm": ("params_norm", 1.0, False),
    "number of skipped iterations": ("skipped_iterations", 1.0, True),
    "number of nan iterations": ("nan_iterations", 1.0, True),
    "samples per second": ("throughput", 1.0, False),
    "samples/sec": ("throughput", 1.0, False),
    "tokens per gpu per second (tgs)": ("tokens_per_s_per_gpu", 1.0, False),
    "actual seqlen": ("seq_len", 1.0, True),
}
MAX_EXTRA = 16


def probe(body: str) -> bool:
    return "iteration" in body and "|" in body


def parse(body: str, ctx: SourceContext) -> Parsed | None:
    m = _ITER.search(body)
    if m is None:
        return _eval(body)
    data: dict[str, Any] = {"step": int(m.group(1)), "train_iters": int(m.group(2))}
    extra = 0
    # Megatron-DeepSpeed may print fields before "iteration" too (" samples/sec: 7.799 | iteration 34/ ...")
    for part in body.split("|"):
        label, sep, value = part.partition(":")
        if not sep:
            continue
        key = " ".join(label.split()).lower()
        value = value.strip()
        spec = _FIELDS.get(key)
        if spec is None:
            if key.endswith("loss") and extra < MAX_EXTRA and value:  # load_balancing_loss, sop loss, ...
                x = _value(value, key)
                data.setdefault(key_name(key), x)
                extra += 1
            continue
        name, scale, integer = spec
        if integer:
            data[name] = need_int(value, key, NAME)
        else:
            data[name] = _value(value, key) * scale
    if "loss" not in data and (data.get("skipped_iterations") == 0 or data.get("loss_scale") == 1.0):
        # Megatron leaves a NaN/Inf average loss out of the line (it prints averages above 0). Where no
        # iteration was skipped, or none could be for an overflow (loss scale 1: bf16/fp32), that is what a
        # missing loss means; the detector judges it against the series' earlier records
        data["loss_missing"] = True
    st, gbs = data.get("step_time_s"), data.get("global_batch_size")
    if "throughput" not in data and st and gbs and st > 0:
        data["throughput"] = gbs / st  # samples/s, derived
    return Parsed("metrics", data)


_EVAL = re.compile(r"(validation|test) loss at (?:iteration (\d+))?")


def _eval(body: str) -> Parsed | None:
    """`validation loss at iteration 100 | lm loss value: 2.3E+00 | lm loss PPL: 9.9E+00 |`: never train loss."""
    m = _EVAL.search(body)
    if m is None:
        return None
    fields: dict[str, Any] = {"format": NAME, "split": m.group(1)}
    if m.group(2):
        fields["step"] = int(m.group(2))
    for part in body[m.end():].split("|"):
        label, sep, value = part.partition(":")
        x = number(value.strip()) if sep else None
        if x is not None:
            fields[key_name(label)] = x
    return Parsed("log", {"event": "eval", "fields": fields})


def _value(text: str, key: str) -> float:
    try:
        return float(text)
    except ValueError:
        m = _UNIT_TAIL.match(text)  # "112.9TFLOPS"
        if m:
            return float(m.group(1))
        raise ParseError(f"{NAME}: {key} is not a number: {text[:40]!r}") from None


__all__ = ["NAME", "probe", "parse"]


_DATETIME = re.compile(r"^\[([^\]]+)\] datetime: (\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})\s*$")


def parse_datetime(body: str, ctx: SourceContext) -> Parsed | None:
    """`[before the start of training step] datetime: 2022-10-31 08:35:51 ` (print_datetime, rank 0): the only
    time many of rank 0's lines have, so its undated checkpoint announcements that follow take it, not the file's
    modification time at the end of the run."""
    m = _DATETIME.match(body.strip())
    if m is None:
        return None
    return Parsed("log", {}, ts=parse_iso(m.group(2)))
