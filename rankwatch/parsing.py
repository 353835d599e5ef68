"""Line -> typed record. The one parser used by the shipper, `rankwatch analyze` and the tests.

Input contract (docs/FORMATS.md): optional torchrun prefix `[rank3]:`/`[default3]:`, optional ISO 8601 timestamp,
then one of: an NCCL collective line, a JSON collective-op event, JSON training metrics, a JSON GPU sample, or
any other text (a log message). Lines that claim a structured kind but break its contract are `ParseError`s
that the caller counts and dead-letters.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import orjson

from rankwatch.records import Record

_TORCHRUN = re.compile(r"^\[(?:rank|default)(\d+)\]:\s?")
_TS = re.compile(
    r"^\[?(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:[.,](\d+))?\s?(Z|[+-]\d{2}:?\d{2})?\]?\s*"
)
_NCCL = re.compile(r"NCCL INFO (?P<op>[A-Za-z]+): opCount (?P<count>[0-9a-fA-F]+)\b(?P<rest>.*)$")
_NCCL_HOST = re.compile(r"^\s*(?P<host>[^\s:]+):(?P<pid>\d+):(?P<tid>\d+) \[(?P<dev>\d+)\]")
_NCCL_FIELD = re.compile(r"\b(sendbuff|recvbuff|count|datatype|op|root|comm|stream) (0x[0-9a-fA-F]+|-?\d+)")
_NRANKS = re.compile(r"\[nranks=(\d+)\]")
_PATH_RANK = re.compile(r"(?<![A-Za-z0-9])rank[_-]?(\d+)", re.IGNORECASE)
# "Saving checkpoint to /ckpt/run/checkpoint-100", "saved checkpoint: ...", "Checkpoint saved to ..."
_CHECKPOINT = re.compile(r"(?:sav(?:e|ed|ing) (?:model )?checkpoint|checkpoint saved)\s*(?:to|at|in|:)?\s*"
                         r"['\"]?(?P<path>[^\s'\",]+)", re.IGNORECASE)
METRIC_FIELDS = ("loss", "grad_norm", "throughput", "step_time_s", "lr")
_GPU_OPTIONAL = ("util_pct", "temp_c", "power_w", "allocated_bytes", "reserved_bytes", "active_bytes",
                 "inactive_split_bytes", "num_alloc_retries", "num_ooms", "proc_used_bytes", "rss_bytes")


class ParseError(ValueError):
    """A line that claims a structured kind but does not meet its contract."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class SourceContext:
    """Per-file parsing state: identity of the producer and the last event time seen in that file."""

    path: str
    job: str
    rank: int | None = None  # rank inferred from the path, else --rank
    fid: str = ""
    last_ts: float | None = None


class ContextResolver:
    """Maps a file to its SourceContext: job (`--job`, else the tailed folder's name) and path-inferred rank."""

    def __init__(self, roots: list[str], job: str | None = None, rank: int | None = None) -> None:
        import os

        self._os = os
        self.roots = [os.path.abspath(r) for r in roots]
        self.job, self.rank = job, rank
        self._contexts: dict[str, SourceContext] = {}

    def context(self, fid: str, path: str) -> SourceContext:
        ctx = self._contexts.get(fid)
        if ctx is None:
            os = self._os
            root = next((r for r in self.roots if path == r or path.startswith(r + os.sep)), path)
            is_file = os.path.isfile(root)
            job = self.job or (os.path.basename(os.path.dirname(root)) if is_file else os.path.basename(root))
            rank = rank_from_path(path, os.path.dirname(root) if is_file else root)
            ctx = SourceContext(path=path, job=job or "job", rank=rank if rank is not None else self.rank,
                                fid=fid)
            self._contexts[fid] = ctx
        ctx.path = path
        return ctx


def rank_from_path(path: str | Path, root: str | Path | None = None) -> int | None:
    """First `rank[_-]?N` in the folder or file names (relative to the tailed root when given)."""
    p = Path(path)
    if root is not None:
        try:
            p = p.relative_to(root)
        except ValueError:
            pass
    m = _PATH_RANK.search(str(p))
    return int(m.group(1)) if m else None


def parse_iso(text: str) -> float:
    """ISO 8601 (T or space, `.`/`,` fraction, Z/offset) -> epoch seconds. Naive times are taken as UTC."""
    m = _TS.match(text.strip())
    if not m:
        raise ValueError(f"not an ISO 8601 time: {text!r}")
    return _ts_from_match(m)


def _ts_from_match(m: re.Match[str]) -> float:
    date, clock, frac, tz = m.group(1), m.group(2), m.group(3), m.group(4)
    dt = datetime.fromisoformat(f"{date}T{clock}")
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        offset = sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    else:
        offset = 0
    base = dt.replace(tzinfo=timezone.utc).timestamp() - offset
    return base + (int(frac) / 10 ** len(frac) if frac else 0.0)


def _number(value: object, name: str) -> float:
    if isinstance(value, bool):
        raise ParseError(f"{name} is a boolean")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # accepts "nan", "inf": a training script may log them as strings
        except ValueError:
            pass
    raise ParseError(f"{name} is not a number: {value!r}")


def _load_json(text: str) -> object:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        # Python's json.dumps writes NaN/Infinity, which orjson rejects; they matter (a NaN loss is critical).
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ParseError(f"malformed JSON: {exc}") from exc


def _event_time(obj: dict, fallback: float | None) -> float | None:
    if "ts" in obj:
        ts = _number(obj["ts"], "ts")
        if not math.isfinite(ts):
            raise ParseError("ts is not finite")
        return ts
    if "timestamp" in obj:
        value = obj["timestamp"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return parse_iso(str(value))
        except ValueError as exc:
            raise ParseError(str(exc)) from exc
    return fallback


def _json_record(obj: dict, ctx: SourceContext, rank: int | None, ts: float | None, line: str
                 ) -> tuple[str, int | None, float | None, dict]:
    if "rank" in obj:
        r = obj["rank"]
        if isinstance(r, bool) or not isinstance(r, (int, str)) or not str(r).lstrip("-").isdigit():
            raise ParseError(f"rank is not an integer: {r!r}")
        rank = int(r)
    ts = _event_time(obj, ts)
    if "op" in obj and ("opCount" in obj or "op_count" in obj):
        raw_count = obj.get("opCount", obj.get("op_count"))
        if isinstance(raw_count, str):
            try:
                op_count = int(raw_count, 16) if not raw_count.isdigit() else int(raw_count)
            except ValueError as exc:
                raise ParseError(f"opCount is not a number: {raw_count!r}") from exc
        elif isinstance(raw_count, int) and not isinstance(raw_count, bool):
            op_count = raw_count
        else:
            raise ParseError(f"opCount is not a number: {raw_count!r}")
        data = {"op": str(obj["op"]), "op_count": op_count, "stream": str(obj.get("stream", "default"))}
        for name in ("save_count", "comm", "nranks", "count", "duration_s"):
            if name in obj:
                data[name] = obj[name] if name == "comm" else _number(obj[name], name)
        return "op", rank, ts, data
    metric_keys = [k for k in METRIC_FIELDS if k in obj]
    if metric_keys:
        if "step" not in obj:
            raise ParseError("training metrics without a step")
        step = obj["step"]
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step != int(step):
            raise ParseError(f"step is not an integer: {step!r}")
        data = {"step": int(step)}
        for k in metric_keys:
            if obj[k] is not None:
                data[k] = _number(obj[k], k)
        return "metrics", rank, ts, data
    if "mem_used_bytes" in obj and "host" in obj and "gpu" in obj:
        data = {
            "host": str(obj["host"]),
            "gpu": int(_number(obj["gpu"], "gpu")),
            "mem_used_bytes": _number(obj["mem_used_bytes"], "mem_used_bytes"),
            "mem_total_bytes": _number(obj.get("mem_total_bytes"), "mem_total_bytes"),
        }
        for k in _GPU_OPTIONAL:
            if obj.get(k) is not None:
                data[k] = _number(obj[k], k)
        return "gpu", rank, ts, data
    return "log", rank, ts, {"msg": line, "raw": line}


def parse_line(line: str, ctx: SourceContext, offset: int = -1, arrival: float = 0.0) -> Record:
    """Classify and parse one line (without its newline). Raises ParseError for broken structured lines."""
    raw = line
    rank = ctx.rank
    m = _TORCHRUN.match(line)
    if m:
        rank = int(m.group(1))
        line = line[m.end():]
    ts: float | None = None
    m = _TS.match(line)
    if m:
        try:
            ts = _ts_from_match(m)
            line = line[m.end():]
        except ValueError:
            ts = None  # e.g. month 13: keep the text as part of the message
    stripped = line.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        obj = _load_json(stripped)
        if not isinstance(obj, dict):
            raise ParseError("JSON line is not an object")
        try:
            kind, rank, ts, data = _json_record(obj, ctx, rank, ts, stripped)
        except (OverflowError, ValueError, TypeError) as exc:  # e.g. "step": Infinity, "gpu": 1e400
            if isinstance(exc, ParseError):
                raise
            raise ParseError(f"bad field value: {exc}") from exc
        if kind == "log":
            data = {"msg": stripped, "raw": raw}
    else:
        nm = _NCCL.search(line)
        if nm:
            kind, data = "op", _nccl_fields(nm, line)
        else:
            kind, data = "log", {"msg": stripped, "raw": raw}
            cm = _CHECKPOINT.search(stripped) if "heckpoint" in stripped else None
            if cm:
                data["checkpoint"] = cm.group("path")
    if ts is None:
        ts = ctx.last_ts if ctx.last_ts is not None else arrival
    ctx.last_ts = ts
    return Record(kind=kind, job=ctx.job, rank=rank, ts=ts, file=ctx.path, offset=offset, data=data,
                  fid=ctx.fid)


def _nccl_fields(m: re.Match[str], line: str) -> dict:
    data: dict = {"op": m.group("op"), "op_count": int(m.group("count"), 16)}
    for name, value in _NCCL_FIELD.findall(m.group("rest")):
        if name in ("sendbuff", "recvbuff", "comm", "stream"):
            data[name] = value
        else:
            data[name] = int(value, 16) if value.startswith("0x") else int(value)
    if "op" in data and not isinstance(data["op"], str):  # "op 0" is the reduction op, not the collective
        data["redop"] = data.pop("op")
    data["op"] = m.group("op")
    nr = _NRANKS.search(m.group("rest"))
    if nr:
        data["nranks"] = int(nr.group(1))
    data.setdefault("stream", "default")
    hm = _NCCL_HOST.match(line)
    if hm:
        data["host"] = hm.group("host")
        data["device"] = int(hm.group("dev"))
    return data


__all__ = ["ParseError", "SourceContext", "ContextResolver", "parse_line", "parse_iso", "rank_from_path", "METRIC_FIELDS"]
