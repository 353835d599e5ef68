"""JSON lines with rankwatch's field names (the hook's output, `json.dumps` from a training script).

A JSON object is a collective op (`op` + `opCount`), training metrics (any of METRIC_FIELDS, with an integer
`step`), a GPU sample (`host`, `gpu`, `mem_used_bytes`) or a log message. Objects that claim one of the first
three and break its contract raise ParseError.
"""

from __future__ import annotations

import json
import math

import orjson

from rankwatch.formats.base import METRIC_FIELDS, OPTIONAL_METRIC_FIELDS, ParseError
from rankwatch.formats.prefixes import parse_iso

_GPU_OPTIONAL = ("util_pct", "temp_c", "power_w", "allocated_bytes", "reserved_bytes", "active_bytes",
                 "inactive_split_bytes", "num_alloc_retries", "num_ooms", "proc_used_bytes", "rss_bytes",
                 "peak_allocated_bytes")
_NOT_JSON = object()


def load_json(text: str) -> object:
    """The decoded value, or _NOT_JSON when the text is not JSON (then it may be a Python repr or a message)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        # Python's json.dumps writes NaN/Infinity, which orjson rejects; they matter (a NaN loss is critical).
        try:
            return json.loads(text)
        except ValueError:
            return _NOT_JSON


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


def _event_time(obj: dict, fallback: float | None) -> float | None:
    # epoch seconds or ISO 8601 under either name (scripts write both kinds under both)
    name = "ts" if "ts" in obj else "timestamp" if "timestamp" in obj else None
    if name is None:
        return fallback
    value = obj[name]
    if isinstance(value, str) and value[:4].isdigit() and value[4:5] == "-":
        try:
            return parse_iso(value)
        except ValueError as exc:
            raise ParseError(f"{name}: {exc}") from exc
    ts = _number(value, name)
    if not math.isfinite(ts):
        raise ParseError(f"{name} is not finite")
    return ts


def json_record(obj: dict, rank: int | None, ts: float | None) -> tuple[str, int | None, float | None, dict | None]:
    """(kind, rank, ts, data); data None for a log message (the caller fills msg/raw)."""
    try:
        return _json_record(obj, rank, ts)
    except (OverflowError, ValueError, TypeError) as exc:  # e.g. "step": Infinity, "gpu": 1e400
        if isinstance(exc, ParseError):
            raise
        raise ParseError(f"bad field value: {exc}") from exc


def _json_record(obj: dict, rank: int | None, ts: float | None) -> tuple[str, int | None, float | None, dict | None]:
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
        for name in ("save_count", "comm", "nranks", "count", "duration_s", "comm_id", "comm_rank"):
            if name in obj:
                data[name] = obj[name] if name in ("comm", "comm_id") else _number(obj[name], name)
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
        for k in OPTIONAL_METRIC_FIELDS:
            if obj.get(k) is not None:
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
    return "log", rank, ts, None


NOT_JSON = _NOT_JSON

__all__ = ["load_json", "json_record", "NOT_JSON"]
