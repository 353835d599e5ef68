"""What every line format shares: the per-file parsing state, the parse error, number and unit helpers.

A format's parser takes the line body (after the torchrun prefix and the timestamp, ANSI colours removed) and the
file's `SourceContext`, and returns `Parsed` (kind, data, the rank printed in the line) or None when the line is
not of that format after all. It raises `ParseError` only for a line that claims the format and breaks it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# The metric names every format maps onto (docs/FORMATS.md). The first five are what the detectors read and what
# makes a JSON object a metrics record; the others are carried when a format prints them.
METRIC_FIELDS = ("loss", "grad_norm", "throughput", "step_time_s", "lr")
OPTIONAL_METRIC_FIELDS = ("loss_scale", "skipped_iterations", "nan_iterations", "tokens_per_s", "mfu", "memory_gib",
                          "tflops", "epoch")


class ParseError(ValueError):
    """A line that claims a structured kind but does not meet its contract."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Parsed(NamedTuple):
    kind: str  # log | metrics | op | gpu
    data: dict[str, Any]
    line_rank: int | None = None  # a rank printed in the line itself ([Rank 3], RCCL globalrank): low precedence
    ts: float | None = None  # a time printed in the line itself (Slurm's "CANCELLED AT ..."): used without a prefix's


@dataclass
class SourceContext:
    """Per-file parsing state: who produced the file, the last event time seen in it, and what the formats learned
    from its earlier lines (NCCL communicators, a CSV header, the step counter of step-less formats)."""

    path: str
    job: str
    rank: int | None = None  # rank inferred from the path, else --rank
    fid: str = ""
    last_ts: float | None = None
    rank_from_path: bool = False  # True when `rank` came from the path (it then beats a rank printed in a line)
    user_formats: tuple = ()  # the configured formats whose glob matches this file (rankwatch.formats.user)
    last_format: str = ""  # name of the format that recognised the last line (read by `rankwatch inspect`)
    auto_step: int = 0  # next step number for formats that print none (HF Trainer dicts, ...)
    comms: dict[str, dict[str, Any]] = field(default_factory=dict)  # NCCL comm pointer -> comm_id, comm_rank, nranks
    csv_header: list[str] | None = None  # Lightning metrics.csv columns
    is_csv: bool = False
    line_dated: bool = False  # did the current line's prefix give its time? (set per line by parse_line)
    arrival: float = 0.0  # when the current line was read (the shipper), or its file last written (at rest)
    task_label: int | None = None  # the current line's `srun --label` task number (set per line by split_prefix)

    def __post_init__(self) -> None:
        self.is_csv = self.path.endswith(".csv")

    def next_step(self) -> int:
        """The per-file step counter: the n-th step-less metrics line of this file (0-based). Its records say so
        (`step_counted`): a checkpoint's name (`checkpoint-500`) counts the run's global steps, not these."""
        step = self.auto_step
        self.auto_step += 1
        return step


_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?$")


def number(text: str) -> float | None:
    """A printed number -> float: exponents, `nan`/`inf` (any case, signed), `1,234` thousands; None otherwise."""
    try:
        return float(text)
    except ValueError:
        pass
    if "," in text and _THOUSANDS.match(text):
        return float(text.replace(",", ""))
    return None


def need_number(text: str, what: str, fmt: str) -> float:
    """A number the format promises; anything else means the line breaks its format (a dead letter)."""
    x = number(text)
    if x is None:
        raise ParseError(f"{fmt}: {what} is not a number: {text[:40]!r}")
    return x


def need_int(text: str, what: str, fmt: str) -> int:
    x = need_number(text, what, fmt)
    if not math.isfinite(x) or x != int(x):
        raise ParseError(f"{fmt}: {what} is not an integer: {text[:40]!r}")
    return int(x)


# binary and decimal size units as frameworks print them ("22.00 MiB", "0 bytes", "9.46GiB", "59.65GB")
_SIZE_UNITS = {"b": 1, "byte": 1, "bytes": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10,
               "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*([A-Za-z]+)")


def size_bytes(text: str) -> int | None:
    """'22.00 MiB' -> 23068672; None when it is not a size."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        return None
    unit = _SIZE_UNITS.get(m.group(2).lower())
    if unit is None:
        return None
    try:
        return int(float(m.group(1)) * unit)
    except ValueError:
        return None


# "Saving checkpoint to /ckpt/run/checkpoint-100", "saved checkpoint: ...", "Checkpoint saved to ..."
_PATH = r"['\"]?(?P<{}>[^\s'\",(][^\s'\",]*?)['\"]?(?:\.\.\.)?(?=[\s,]|$)"
# Megatron "saving checkpoint at iteration     100 to /ckpt/run", "successfully saved checkpoint from iteration ...";
# HF "Saving model checkpoint to DIR"; DeepSpeed "Saving model checkpoint: PATH", "[Torch] Saving PATH...",
# "[Torch] Checkpoint global_step500 is about to be saved!"; mmengine "Saving checkpoint at 100 iterations";
# Lightning's ModelCheckpoint "..., saving model to 'PATH' as top 1"; Accelerate "Saving current state to DIR";
# torchtitan "Saving the checkpoint (or staging if async is enabled)." (no path)
_CHECKPOINT = re.compile(
    r"(?:sav(?:e|ed|ing) (?:model |the )?checkpoint|checkpoint saved)(?:\s+(?:at|from)\s+(?:iteration\s+)?\d+"
    r"(?:\s+(?:iterations?|epochs?))?)?(?:\s*(?:to|at|in|:)?\s*" + _PATH.format("path") + r")?"
    r"|\[Torch\] Saving " + _PATH.format("ds") + r"|\[Torch\] Checkpoint (?P<tag>\S+) is about to be saved"
    r"|saving model to " + _PATH.format("pl") + r"|Saving current state to " + _PATH.format("acc"),
    re.IGNORECASE)


def checkpoint_path(msg: str) -> str | None:
    """What a checkpoint announcement names (it becomes data["checkpoint"] on the log record): its path, its tag,
    or "(unnamed)" when it names none; None for any other line."""
    if "heckpoint" not in msg and "aving " not in msg:  # cheap before the pattern: nearly every line fails both
        return None
    m = _CHECKPOINT.search(msg)
    if m is None:
        return None
    return next((v for v in m.groupdict().values() if v), "(unnamed)")


# the step a save follows: Megatron "at iteration N" / "from iteration N", mmengine "at N iterations"; else the
# name's HF `checkpoint-N`, DeepSpeed `global_stepN`, Megatron `iter_000N`, Lightning `step=N`, `step_N`
_SAVED_ITERATION = re.compile(r"(?:at|from) iteration\s+(\d+)|\bat (\d+) iterations?\b", re.IGNORECASE)
_STEP_IN_NAME = re.compile(r"(?:checkpoint-|global_step|iter_|\bstep[=_-]?)(\d+)(?!.*(?:checkpoint-|global_step|iter_|"
                           r"\bstep[=_-]?)\d)", re.IGNORECASE)


def checkpoint_step(msg: str, name: str) -> int | None:
    """The training step after which a checkpoint announcement (`msg`, naming `name`) saves, where it says: a
    save's time is often unknown (Megatron prints it undated, on rank 0's log only), its step is not."""
    m = _SAVED_ITERATION.search(msg)
    if m is None and name != "(unnamed)":
        m = _STEP_IN_NAME.search(name)
    if m is None:
        return None
    return int(next(g for g in m.groups() if g is not None))


def key_name(text: str) -> str:
    """A printed label -> a clear field name: 'load_balancing_loss' -> same, 'sop loss' -> 'sop_loss'."""
    out = re.sub(r"[^0-9a-zA-Z]+", "_", text.strip().lower()).strip("_")
    return out or "value"


__all__ = ["METRIC_FIELDS", "OPTIONAL_METRIC_FIELDS", "ParseError", "Parsed", "SourceContext", "number",
           "need_number", "need_int", "size_bytes", "key_name", "checkpoint_path",
           "checkpoint_step"]
