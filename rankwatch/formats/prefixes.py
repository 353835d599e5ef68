"""What comes before the line's content: ANSI colours, launcher prefixes, logger tags and the event time.

Recognised, in this order (each optional):
- ANSI colour/style codes anywhere (torchtitan, rich, colorlog) are removed first;
- the terminal's echo of Ctrl-C, `^C`, glued to the start of the line the launcher prints next;
- a Ray worker's `(RayTrainWorker pid=615, ip=10.72.7.6) ` / `(MegatronPolicyWorker[rank=31] pid=3264030, ip=..) `,
  removed (the torchrun prefix usually follows it);
- Slurm's `srun --label` task number, `0: ` (padded to the widest: ` 3: `), kept in `ctx.task_label`: the rank
  of metrics and messages only where nothing else tells it (srun started one task per rank; where it started
  one launcher per node, the number is the node's: a torchrun prefix, the path or a rank in the line name the
  rank instead), and never of NCCL's lines (docs/FORMATS.md);
- Open MPI's `mpirun --tag-output` `[1,0]<stdout>:` (job, rank), optionally after `--timestamp-output`'s ctime
  (`Fri Aug 11 12:31:45 2023`), which gives the global rank (and the time) like torchrun's prefix;
- the torchrun prefix `[rank3]:` / `[default3]:` (`--tee`/`--log-dir` output), which gives the global rank;
- a logger tag before the time: `[titan] ` (torchtitan), `[INFO|trainer.py:2035] ` (transformers' logging),
  `[INFO 2020-06-08 05:26:19]` (early DeepSpeed);
- the time: ISO 8601 (`T` or space, `.`/`,` fraction, `Z`/offset, optionally in `[...]`) as written by Python
  logging, DeepSpeed, Megatron (`[2024-04-06 03:02:12]`), nanoGPT forks and NCCL >= 2.23's
  NCCL_DEBUG_TIMESTAMP_FORMAT default (`[%F %T] `); slashed dates, `05/25/2023 13:07:42` (transformers' example
  scripts set `datefmt="%m/%d/%Y %H:%M:%S"`; day first where the first number cannot be a month),
  `2018/06/03 15:47:15` and mmengine's `06/13 19:41:35` (no year: placed like glog's); or the glog form PyTorch's C++ side (c10) writes,
  `[E1206 18:44:12.715298746 ProcessGroupNCCL.cpp:607]` / `E0614 11:26:37.758169 12345 file.cc:123]`, which has
  no year: the year is taken from the file's previous event time (else the arrival time).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from rankwatch.formats.base import SourceContext

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
TORCHRUN = re.compile(r"^\[(?:rank|default)(\d+)\]:\s?")
SRUN_LABEL = re.compile(r"^(\d{1,5}): ")
RAY = re.compile(r"^\((?:[\w.\[\]=-]+ )?pid=\d+(?:, ip=[\w.:-]+)?\) ")
MPI_TAG = re.compile(r"^(?:[A-Z][a-z]{2} ([A-Z][a-z]{2} +\d{1,2} \d{2}:\d{2}:\d{2} \d{4}))?"
                     r"\[\d+,(\d+)\]<std(?:out|err)>:")
_TAG = re.compile(r"^(?:\[titan\]\s|\[(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)(?:\|[^\]\s]+\]\s| (?=\d{4}-)))")
TS = re.compile(r"^\[?(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:[.,](\d+))?\s?(Z|[+-]\d{2}:?\d{2})?\]?\s*")
SLASH_TS = re.compile(r"^\[?(\d{1,4})/(\d{1,2})(?:/(\d{1,4}))?[T ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d+))?\]?\s*")
# c10/glog: level letter, month (c10 does not zero-pad it: E626 is June 26) and day, time with up to 9 fraction digits, optional thread id, source file:line
GLOG = re.compile(r"^\[?([IWEF])(\d{1,2}?)(\d{2}) (\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?: +\d+)? [^\]\s]+:\d+\]\s?")


def strip_ansi(line: str) -> str:
    return ANSI.sub("", line) if "\x1b" in line else line


_last_second: tuple[tuple[str, str, str | None], float] = (("", "", None), 0.0)


def ts_from_iso_match(m: re.Match[str]) -> float:
    global _last_second
    date, clock, frac, tz = m.group(1), m.group(2), m.group(3), m.group(4)
    key = (date, clock, tz)
    if _last_second[0] == key:  # consecutive lines share their second: skip the calendar arithmetic
        base = _last_second[1]
    else:
        dt = datetime.fromisoformat(f"{date}T{clock}")
        if tz and tz != "Z":
            sign = 1 if tz[0] == "+" else -1
            digits = tz[1:].replace(":", "")
            offset = sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
        else:
            offset = 0
        base = dt.replace(tzinfo=timezone.utc).timestamp() - offset
        _last_second = (key, base)
    return base + (int(frac) / 10 ** len(frac) if frac else 0.0)


def _slash_ts(m: re.Match[str], reference: float) -> float:
    a, b = int(m.group(1)), int(m.group(2))
    if m.group(3) is None:  # 06/13 19:41:35 (mmengine): no year, placed like glog's times
        if len(m.group(1)) > 2:
            raise ValueError("not a month")
        return _yearless(reference, a, b, m.group(4), m.group(5), m.group(6), m.group(7))
    c = int(m.group(3))
    if len(m.group(1)) == 4:  # 2018/06/03
        year, month, day = a, b, c
    elif len(m.group(3)) == 4:  # 05/25/2023 (US, as transformers' examples print it); 25/05/2023 when a > 12
        year, month, day = (c, a, b) if a <= 12 else (c, b, a)
    else:
        raise ValueError("no four-digit year")
    frac = m.group(7)
    dt = datetime(year, month, day, int(m.group(4)), int(m.group(5)), int(m.group(6)), tzinfo=timezone.utc)
    return dt.timestamp() + (int(frac) / 10 ** len(frac) if frac else 0.0)


def parse_iso(text: str) -> float:
    """ISO 8601 (T or space, `.`/`,` fraction, Z/offset) -> epoch seconds. Naive times are taken as UTC."""
    m = TS.match(text.strip())
    if not m:
        raise ValueError(f"not an ISO 8601 time: {text!r}")
    return ts_from_iso_match(m)


def _glog_ts(m: re.Match[str], reference: float) -> float:
    return _yearless(reference, int(m.group(2)), int(m.group(3)), m.group(4), m.group(5), m.group(6), m.group(7))


def _yearless(reference: float, month: int, day: int, hh: str, mm: str, ss: str, frac: str | None) -> float:
    """A time without its year, in the year of `reference` (the file's previous time, else the arrival)."""
    year = datetime.fromtimestamp(reference, tz=timezone.utc).year
    for y in (year, year - 1):  # a December line read in January belongs to last year
        dt = datetime(y, month, day, int(hh), int(mm), int(ss), tzinfo=timezone.utc)
        ts = dt.timestamp() + (int(frac) / 10 ** len(frac) if frac else 0.0)
        if ts - reference < 180 * 86400:
            return ts
    return ts


# (first characters, pattern, converter(match, the year's reference)): the time forms, tried in order
_TIMES = (("0123456789[", TS, lambda m, _: ts_from_iso_match(m)), ("0123456789[", SLASH_TS, _slash_ts),
          ("IWEF[", GLOG, _glog_ts))
_TIME_STARTS = "".join({ch for starts, _, _ in _TIMES for ch in starts})


def split_prefix(line: str, ctx: SourceContext, arrival: float) -> tuple[str, int | None, float | None]:
    """line (ANSI already removed) -> (body, launcher rank (torchrun / mpirun), event time). Times that do not exist
    (month 13) stay part of the body."""
    rank: int | None = None
    ts: float | None = None
    ctx.task_label = None
    if line[:1] in " \t":  # Megatron's " [2024-04-06 03:02:12] iteration ...", indented pastes
        line = line.lstrip()
    if line[:1].isdigit():
        m = SRUN_LABEL.match(line)
        if m:
            ctx.task_label = int(m.group(1))
            line = line[m.end():]
    if line[:2] == "^C":  # the terminal's echo of Ctrl-C, glued to the launcher's next line
        line = line[2:]
    if line[:1] == "(":
        m = RAY.match(line)
        if m:
            line = line[m.end():]
    if "]<std" in line[:48]:  # cheap test first: almost no line has the tag
        m = MPI_TAG.match(line)
        if m:
            rank = int(m.group(2))
            line = line[m.end():]
            if m.group(1):
                try:  # local time without zone, taken as UTC like the other naive times
                    ts = datetime.strptime(m.group(1), "%b %d %H:%M:%S %Y").replace(tzinfo=timezone.utc).timestamp()
                except ValueError:
                    ts = None
    if line[:1] == "[":
        m = TORCHRUN.match(line)
        if m:
            rank = int(m.group(1))
            line = line[m.end():]
        if line[:1] == "[":
            m = _TAG.match(line)
            if m:
                line = line[m.end():]
    c = line[:1]
    if ts is not None or not c or c not in _TIME_STARTS:
        return line, rank, ts  # no time form starts with this character
    for starts, rx, convert in _TIMES:
        if c in starts and (m := rx.match(line)) is not None:
            try:
                ts = convert(m, ctx.last_ts if ctx.last_ts is not None else arrival)
            except ValueError:
                continue  # e.g. month 13: keep the text as part of the message
            return line[m.end():], rank, ts
    return line, rank, ts


__all__ = ["ANSI", "TORCHRUN", "SRUN_LABEL", "RAY", "MPI_TAG", "TS", "SLASH_TS", "GLOG", "strip_ansi", "ts_from_iso_match", "parse_iso",
           "split_prefix"]
