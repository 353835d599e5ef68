"""PyTorch distributed and CUDA failures, as log records that carry parsed fields for the detectors that use them.

ProcessGroupNCCL prefixes its lines with the process group and the rank in it, in forms that changed across
releases: `[Rank 3]`, `[PG 1 Rank 0]`, `[PG 0 (default_pg) Rank 7]`, `[PG ID 0 PG GUID 0(default_pg) Rank 1]`.
`rank` is that printed rank: the rank within the group named by `pg` (the global rank for the default group);
it sets the record's rank only for the default group and only when neither the torchrun prefix nor the path
gave one.

Events (`data["event"]`, fields in `data["fields"]`):
- `nccl_watchdog_timeout`: `Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1234, OpType=ALLREDUCE,
  NumelIn=.., NumelOut=.., Timeout(ms)=600000) ran for 600012 milliseconds before timing out.` -> rank, pg,
  seq_num, op_type, numel_in, numel_out, timeout_ms, ran_for_ms; also the `Work WorkNCCL(...) timed out in
  blocking wait.` form (`detected_by: "blocking_wait"`) and the same text inside "watchdog thread terminated
  with exception: ..." lines.
- `nccl_watchdog_failure`: `Exception (either an error or timeout) detected by watchdog at work: 1580, last
  enqueued NCCL work: 1582, last completed NCCL work: 1579.`, `Timeout at NCCL work: ...` and `failure detected by
  watchdog at work sequence id: 120049 PG status: last enqueued work: 120051, last completed work: 120048` ->
  rank, pg, seq_num, last_enqueued, last_completed (which collectives the rank got through: the hang's position).
  Ranks told to dump debug info (2.6+ in the real-line corpus) print `Received a dump signal due to a collective
  timeout from this local rank | from  rank 6 and ... Last enqueued NCCL work: 22, last completed NCCL work: 21.`
  (kind `dump_signal`, no seq_num; `signal_from_rank` when another rank signalled; -1 before any collective).
- `nccl_watchdog_stuck`: the heartbeat monitor's `Heartbeat monitor timed out! Process will be terminated after
  dumping debug info. workMetaList_.size()=103` and `ProcessGroupNCCL's watchdog got stuck for 480 seconds
  without making progress ...` -> rank, pg, stuck_s, pending_work (as printed): the watchdog itself hung.
- `nccl_ops_failed`: `Some NCCL operations have failed or timed out ...` and `To avoid data inconsistency, we are
  taking the entire process down.` (`action: "abort"`) -> rank.
- `nccl_error`: `NCCL error in: ...ProcessGroupNCCL.cpp:1275, unhandled system error ..., NCCL version 2.14.3`,
  `ncclRemoteError: ...`, `ncclUnhandledCudaError: ...` -> error, nccl_version, last_error.
- `cuda_error`: `CUDA error: an illegal memory access was encountered` -> error; `CUDA out of memory. Tried to
  allocate 22.00 MiB. GPU 0 has a total capacity of 23.65 GiB of which 11.06 MiB is free. ...` (and the older
  `(GPU 0; 6.00 GiB total capacity; 781.59 MiB already allocated; 3.03 GiB free; 1.24 GiB reserved in total by
  PyTorch)`) -> error "out of memory", gpu, tried_bytes, total_bytes, free_bytes, process_bytes,
  allocated_bytes, reserved_unallocated_bytes, already_allocated_bytes, reserved_bytes, as printed.
"""

from __future__ import annotations

import re
from typing import Any

from rankwatch.formats.base import Parsed, SourceContext, size_bytes

NAME = "torch_distributed"
_PG = re.compile(r"\[(?:PG (?:ID )?(?P<pg>\d+)(?: PG GUID (?P<guid>[^\s\]()]+)(?:\((?P<gname>[^)]*)\))?)?"
                 r"(?: \((?P<pname>[^)]*)\))? )?Rank (?P<rank>\d+)\]")
_WORK = re.compile(r"WorkNCCL\((?P<args>(?:[^()]|\([^()]*\))*)\)\s*(?:ran for (?P<ran>\d+) milliseconds|"
                   r"timed out in (?P<bw>blocking wait))?")
_WORK_FIELDS = (("seq_num", re.compile(r"SeqNum=(\d+)"), int), ("op_type", re.compile(r"OpType=(\w+)"), str),
                ("numel_in", re.compile(r"NumelIn=(\d+)"), int), ("numel_out", re.compile(r"NumelOut=(\d+)"), int),
                ("timeout_ms", re.compile(r"Timeout\(ms\)=(\d+)"), int))
_FAILURE = re.compile(r"(?:at work|at NCCL work|at work sequence id):\s*(\d+)[,.]?\s*(?:PG status: )?last enqueued "
                      r"(?:NCCL )?work: (\d+), last completed (?:NCCL )?work: (\d+)")
# "Received a dump signal ... from this local rank | from  rank 6 ... Last enqueued NCCL work: 22, last completed NCCL
# work: 21." (PyTorch 2.6+ in the corpus; -1 when the group ran no collective yet)
_DUMP_SIGNAL = re.compile(r"dump signal due to a collective timeout from (?:this local rank|\s*rank (?P<src>\d+))\b.*?"
                          r"Last enqueued NCCL work: (?P<enq>-?\d+), last completed NCCL work: (?P<done>-?\d+)")
_STUCK_FOR = re.compile(r"watchdog got stuck for (\d+) seconds")
_PENDING_WORK = re.compile(r"workMetaList_\.size\(\) ?= ?(\d+)")
_NCCL_ERROR = re.compile(r"NCCL error(?: in: (?P<where>\S+?),?|:) (?P<what>[^,]*?)(?: \(run with[^)]*\))?, "
                         r"NCCL version (?P<ver>[\w.+]+)")
_NCCL_REASON = re.compile(r"\b(nccl[A-Z]\w*Error|ncclInvalidUsage|ncclInvalidArgument|ncclInternalError)\b:?"
                          r"(?P<rest>.*)$")
_LAST_ERROR = re.compile(r"Last error:\s*(.*)$")
_CUDA_ERROR = re.compile(r"CUDA (?:driver )?error: (?P<err>[^.\n]*[^.\s])")
_OOM_TRIED = re.compile(r"Tried to allocate (?P<v>[\d.]+ ?[KMGTP]?i?B|\d+ bytes)")
_OOM_PARTS = (
    ("gpu", re.compile(r"GPU (\d+)"), int),
    ("total_bytes", re.compile(r"total capac(?:i)?ty of ([\d.]+ ?[KMGTP]?i?B|\d+ bytes)"), size_bytes),
    ("free_bytes", re.compile(r"of which ([\d.]+ ?[KMGTP]?i?B|\d+ bytes) is free"), size_bytes),
    ("process_bytes", re.compile(r"this process has ([\d.]+ ?[KMGTP]?i?B|\d+ bytes) memory in use"), size_bytes),
    ("allocated_bytes", re.compile(r"Of the allocated memory ([\d.]+ ?[KMGTP]?i?B|\d+ bytes) is allocated"),
     size_bytes),
    ("reserved_unallocated_bytes", re.compile(r"([\d.]+ ?[KMGTP]?i?B|\d+ bytes) is reserved by PyTorch but "
                                              r"unallocated"), size_bytes),
    # the pre-2.1 "(GPU 0; 4.00 GiB total capacity; 3.08 GiB already allocated; 0 bytes free; ...)" form: zero is
    # printed as "0 bytes" there too
    ("total_bytes", re.compile(r"([\d.]+ ?[KMGTP]?i?B|\d+ bytes) total capacity"), size_bytes),
    ("already_allocated_bytes", re.compile(r"([\d.]+ ?[KMGTP]?i?B|\d+ bytes) already allocated"), size_bytes),
    ("free_bytes", re.compile(r"([\d.]+ ?[KMGTP]?i?B|\d+ bytes) free\b"), size_bytes),
    ("reserved_bytes", re.compile(r"([\d.]+ ?[KMGTP]?i?B|\d+ bytes) reserved in total by PyTorch"), size_bytes),
    ("cached_bytes", re.compile(r"([\d.]+ ?[KMGTP]?i?B|\d+ bytes) cached"), size_bytes),
)


def _pg_fields(body: str) -> tuple[dict[str, Any], int | None]:
    """The printed group and rank, and the rank usable for the record (default group only)."""
    m = _PG.search(body)
    if m is None:
        return {}, None
    fields: dict[str, Any] = {"rank": int(m.group("rank"))}
    if m.group("pg") is not None:
        fields["pg"] = int(m.group("pg"))
    name = m.group("gname") or m.group("pname")
    if m.group("guid"):
        fields["pg_guid"] = m.group("guid")
    if name:
        fields["pg_name"] = name
    default = fields.get("pg", 0) == 0 or name == "default_pg"
    return fields, fields["rank"] if default else None


def parse_watchdog(body: str, ctx: SourceContext) -> Parsed | None:
    """Anything ProcessGroupNCCL's watchdog or a blocking wait reports; None when the line is none of them."""
    if "WorkNCCL(" in body:
        return _timeout(body)
    if "last enqueued" in body:
        m = _FAILURE.search(body)
        if m:
            fields, rank = _pg_fields(body)
            fields.update(seq_num=int(m.group(1)), last_enqueued=int(m.group(2)), last_completed=int(m.group(3)))
            fields["kind"] = "timeout" if "Timeout at" in body else "failure"
            return Parsed("log", {"event": "nccl_watchdog_failure", "fields": fields}, rank)
    if "dump signal" in body:
        d = _DUMP_SIGNAL.search(body)
        if d:
            fields, rank = _pg_fields(body)
            fields.update(last_enqueued=int(d.group("enq")), last_completed=int(d.group("done")), kind="dump_signal")
            if d.group("src") is not None:
                fields["signal_from_rank"] = int(d.group("src"))
            return Parsed("log", {"event": "nccl_watchdog_failure", "fields": fields}, rank)
    if "Heartbeat monitor timed out" in body or "watchdog got stuck" in body:
        return _stuck(body)
    if "Some NCCL operations have failed" in body or "taking the entire process down" in body:
        fields, rank = _pg_fields(body)
        fields["action"] = "abort" if "taking the entire process down" in body else "report"
        return Parsed("log", {"event": "nccl_ops_failed", "fields": fields}, rank)
    return None


def _stuck(body: str) -> Parsed:
    """The heartbeat monitor's verdict that the watchdog thread itself stopped making progress (PyTorch 2.2+)."""
    fields, rank = _pg_fields(body)
    s = _STUCK_FOR.search(body)
    if s:
        fields["stuck_s"] = int(s.group(1))
    w = _PENDING_WORK.search(body)
    if w:
        fields["pending_work"] = int(w.group(1))
    return Parsed("log", {"event": "nccl_watchdog_stuck", "fields": fields}, rank)


def _timeout(body: str) -> Parsed | None:
    m = _WORK.search(body)
    if m is None:
        return None
    # "[PG 3 Rank 5] Process group watchdog thread terminated with exception: [Rank 5] Watchdog caught ...":
    # the group comes from the first prefix, the rank from either.
    fields, rank = _pg_fields(body)
    for name, rx, conv in _WORK_FIELDS:
        f = rx.search(m.group("args"))
        if f:
            fields[name] = conv(f.group(1))
    if "seq_num" not in fields:
        return None
    if m.group("ran"):
        fields["ran_for_ms"] = int(m.group("ran"))
    fields["detected_by"] = "blocking_wait" if m.group("bw") else "watchdog"
    return Parsed("log", {"event": "nccl_watchdog_timeout", "fields": fields}, rank)


def probe_nccl_error(body: str) -> bool:
    return "NCCL error" in body or ("Error" in body and "nccl" in body)


def parse_nccl_error(body: str, ctx: SourceContext) -> Parsed | None:
    fields: dict[str, Any] = {}
    m = _NCCL_ERROR.search(body)
    if m:
        fields.update(error=m.group("what").strip(), nccl_version=m.group("ver"))
        if m.group("where"):
            fields["where"] = m.group("where")
    r = _NCCL_REASON.search(body)
    if r:
        fields["reason"] = r.group(1)
        fields.setdefault("error", r.group("rest").strip()[:300])
    if not fields:
        return None
    le = _LAST_ERROR.search(body)
    if le:
        fields["last_error"] = le.group(1).strip()[:300]
    pg, rank = _pg_fields(body)
    fields.update(pg)
    return Parsed("log", {"event": "nccl_error", "fields": fields}, rank)


def parse_cuda(body: str, ctx: SourceContext) -> Parsed | None:
    if "out of memory" in body:
        t = _OOM_TRIED.search(body)
        if t:
            fields: dict[str, Any] = {"error": "out of memory", "tried_bytes": size_bytes(t.group("v"))}
            for name, rx, conv in _OOM_PARTS:
                if name in fields:
                    continue
                f = rx.search(body)
                if f:
                    value = conv(f.group(1))
                    if value is not None:
                        fields[name] = value
            pg, rank = _pg_fields(body)
            fields.update(pg)
            return Parsed("log", {"event": "cuda_error", "fields": fields}, rank)
    m = _CUDA_ERROR.search(body)
    if m is None:
        return None
    fields = {"error": m.group("err").strip()}
    pg, rank = _pg_fields(body)
    fields.update(pg)
    return Parsed("log", {"event": "cuda_error", "fields": fields}, rank)


__all__ = ["NAME", "parse_watchdog", "probe_nccl_error", "parse_nccl_error", "parse_cuda"]
