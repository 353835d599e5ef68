"""Record types that travel between the shipper, the broker, the pipeline and the sinks, and their codecs.

Everything on the wire is orjson-encoded JSON. Typed records share one envelope (`Record`) so a single codec,
a single dead-letter path and a single source reference (file + byte offset) serve every record family.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson

from rankwatch.rotation import rotation_base

RECORD_KINDS = ("log", "metrics", "op", "gpu")
ANOMALY_SCHEMA = "rankwatch.anomaly/v1"
DETECTORS = (
    "mad",
    "fixed",
    "relative_change",
    "nonfinite",
    "throughput",
    "step_time",
    "op_timing",
    "hang",
    "straggler",
    "deeplog",
    "oom",
    "leak",
    "fragmentation",
    "imbalance",
)
SEVERITIES = ("info", "warning", "critical")
_ANOMALY_NS = uuid.UUID("6f1c3a52-7d1e-4f0b-9a57-0c1b3f0f2a11")


class DecodeError(ValueError):
    """A message on a typed topic is not a valid record."""


@dataclass(slots=True)
class Record:
    """One parsed input line (or hook sample): what it is, who produced it, when, and where it came from."""

    kind: str  # one of RECORD_KINDS
    job: str
    rank: int | None
    ts: float  # event time, epoch seconds (UTC)
    file: str  # source file ("" for records that did not come from a file)
    offset: int  # byte offset of the line in that file (-1 when not from a file)
    data: dict[str, Any]  # kind-specific parsed fields (see docs/FORMATS.md)
    fid: str = ""  # identity of the source file (dev:inode), lets the shipper reconcile after a crash

    def family(self) -> str:
        """The topic family it travels on. A checkpoint announcement and an evaluation's results ride with the
        rank's metrics, so the worker sees them in order with that rank's steps (topics are consumed
        independently): they explain the pause of the steps after them."""
        if self.kind == "log" and ("checkpoint" in self.data or self.data.get("event") == "eval"):
            return "metrics"
        return self.kind

    def key(self) -> str:
        """Kafka record key: job/rank, job/rank/stream for collective ops, job/host/gpu for GPU samples."""
        if self.kind == "op":
            return f"{self.job}/{self.rank}/{self.data.get('stream', 'default')}"
        if self.kind == "gpu":
            return f"{self.job}/{self.data.get('host')}/{self.data.get('gpu')}"
        return f"{self.job}/{self.rank}"


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _nonfinite_text(x: float) -> str:
    return "NaN" if x != x else ("Infinity" if x > 0 else "-Infinity")


def encode_record(rec: Record) -> bytes:
    # JSON has no NaN/Infinity (orjson would write null), yet a NaN loss is the most important value to carry:
    # non-finite floats travel as the strings "NaN"/"Infinity"/"-Infinity" and come back as floats.
    data = rec.data
    if any(type(v) is float and not math.isfinite(v) for v in data.values()):
        data = {k: _nonfinite_text(v) if type(v) is float and not math.isfinite(v) else v for k, v in data.items()}
        rec = Record(rec.kind, rec.job, rec.rank, rec.ts, rec.file, rec.offset, data, rec.fid)
    # OPT_SERIALIZE_NUMPY lets the hook hand numpy scalars through unchanged.
    return orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY)


def _record_from(d: object) -> Record:
    if type(d) is dict:  # the usual op or log record, typed as encode_record wrote it: no conversion to make
        kind, job, rank, ts, data = d.get("kind"), d.get("job"), d.get("rank"), d.get("ts"), d.get("data")
        if ((kind == "op" or kind == "log") and type(job) is str and (rank is None or type(rank) is int)
                and type(ts) is float and type(data) is dict):
            file, offset, fid = d.get("file", ""), d.get("offset", -1), d.get("fid", "")
            if type(file) is str and type(offset) is int and type(fid) is str:
                return Record(kind, job, rank, ts, file, offset, data, fid)
    return _checked_record_from(d)


def _checked_record_from(d: object) -> Record:
    """Any other record: each field converted to its type, or a DecodeError saying which is wrong."""
    if not isinstance(d, dict):
        raise DecodeError("record is not a JSON object")
    try:
        kind = d["kind"]
        if kind not in RECORD_KINDS:
            raise DecodeError(f"unknown record kind {kind!r}")
        rank = d.get("rank")
        raw_data = d.get("data") or {}
        return Record(
            kind=kind,
            job=str(d["job"]),
            rank=None if rank is None else int(rank),
            ts=float(d["ts"]),
            file=str(d.get("file", "")),
            offset=int(d.get("offset", -1)),
            data={k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in raw_data.items()}
            if kind in ("metrics", "gpu") else raw_data if type(raw_data) is dict else dict(raw_data),
            fid=str(d.get("fid", "")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(f"bad record field: {exc!r}") from exc


def decode_record(raw: bytes | str) -> Record:
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}") from exc
    return _record_from(d)


def encode_pack(encoded: list[bytes]) -> bytes:
    """Several encoded records of one key as one message: a JSON array. The shipper packs the lines of a key
    that it read together, which divides the producer's per-message cost by the pack size."""
    return b"[" + b",".join(encoded) + b"]"


def decode_records(raw: bytes | str) -> tuple[list[Record], list[str]]:
    """A message of a typed topic (one record, or a pack) -> (valid records, errors for the invalid ones)."""
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return [], [f"not JSON: {exc}"]
    items = d if isinstance(d, list) else [d]
    records, errors = [], []
    for item in items:
        try:
            records.append(_record_from(item))
        except DecodeError as exc:
            errors.append(str(exc))
    return records, errors


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(slots=True)
class Anomaly:
    """One detected anomaly, schema rankwatch.anomaly/v1 (rankwatch/schema/anomaly.v1.json)."""

    detector: str
    signal: str
    job: str
    rank: int | None
    event_time: float
    value: float | None
    expected: float | None
    score: float | None
    threshold: float | None
    severity: str
    message: str
    context: dict[str, Any] = field(default_factory=dict)
    source_file: str = ""
    source_offset: int = -1
    stream: str | None = None
    host: str | None = None
    gpu: int | None = None
    detected_at: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        # Deterministic: the same line judged by the same detector gives the same id, offline or streaming,
        # so consumers can de-duplicate after a worker restart replays a partition. The file by its live name:
        # read live from train.log, at rest from train.log.1 after a rotation (renames and copies keep offsets)
        parts = (self.detector, self.signal, self.job, self.rank, self.stream, self.host, self.gpu,
                 rotation_base(self.source_file), self.source_offset, repr(self.event_time))
        return str(uuid.uuid5(_ANOMALY_NS, "|".join(map(str, parts))))

    def to_dict(self) -> dict[str, Any]:
        d = {
            "schema": ANOMALY_SCHEMA,
            "id": self.id,
            "detected_at": iso(self.detected_at),
            "event_time": iso(self.event_time),
            "job": self.job,
            "rank": self.rank,
            "detector": self.detector,
            "signal": self.signal,
            "value": _finite_or_none(self.value),
            "expected": _finite_or_none(self.expected),
            "score": _finite_or_none(self.score),
            "threshold": _finite_or_none(self.threshold),
            "severity": self.severity,
            "message": self.message,
            "context": self.context,
            "source": {"file": self.source_file, "offset": self.source_offset},
        }
        if self.stream is not None:
            d["stream"] = self.stream
        if self.host is not None:
            d["host"] = self.host
        if self.gpu is not None:
            d["gpu"] = self.gpu
        return d

    def key(self) -> str:
        return f"{self.job}/{self.rank}"

    def encode(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_SERIALIZE_NUMPY)


def dead_letter(reason: str, raw: str | bytes, *, file: str = "", offset: int = -1, job: str = "",
                stage: str = "parse", fid: str = "") -> bytes:
    """Dead-letter message: why, where from, and the raw input (truncated), so nothing is lost silently."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return orjson.dumps({
        "schema": "rankwatch.deadletter/v1", "stage": stage, "reason": reason, "job": job,
        "file": file, "offset": offset, "fid": fid, "raw": text[:65536], "at": iso(time.time()),
    })


__all__ = ["Record", "Anomaly", "DecodeError", "encode_record", "decode_record", "encode_pack", "decode_records", "dead_letter", "iso",
           "RECORD_KINDS", "DETECTORS", "SEVERITIES", "ANOMALY_SCHEMA"]
