"""NCCL's own debug output (NCCL_DEBUG=INFO / WARN): collectives, communicator init, warnings.

Lines start with `host:pid:tid [cudaDev]` (after any launcher prefix, e.g. Ray's `(RayTrainWorker pid=...)` or
pdsh's `host: `), optionally with a source location, then `NCCL INFO` / `NCCL WARN`.

- COLL (NCCL_DEBUG_SUBSYS=COLL), an `op` record:
  `AllReduce: opCount 139d sendbuff 0x.. recvbuff 0x.. count 7382228 datatype 7 op 0 root 0 comm 0x..
  [nranks=128] stream 0x..` (NCCL 2.x; RCCL adds `task N globalrank N`; Send/Recv print `(nil)` buffers; some
  builds print `NCCL INFO [2] AllReduce: ...`).
- communicator init, a log record with event `nccl_comm_init`: `comm 0x.. rank R nranks N cudaDev D busId B -
  Init COMPLETE` (old, no commId), `... nvmlDev D busId B commId 0x.. - Init COMPLETE`, `ncclCommInitRank` /
  `ncclCommInitRankConfig` / `ncclCommSplit ... parent 0x.. color C key K commId 0x..` forms (START and
  COMPLETE), and the `comm 0x.. rank 0 nRanks 8 nNodes 1 localRanks 8 localRank 0 MNNVL 0` topology line.
  `Init timings: rank R nranks N total T (...)` is event `nccl_init_timings`.
- `NCCL WARN ...`: event `nccl_warn` with the message and what NCCL prints in it (status, vendor error, peer).

The file's context remembers each comm pointer's (comm_id, comm_rank, nranks) from its init lines, and op
records of that comm get them attached: the pointer differs per process, the commId is what ranks share.
"""

from __future__ import annotations

import re
from typing import Any

from rankwatch.formats.base import Parsed, SourceContext

NAME = "nccl"
_COLL = re.compile(r"NCCL INFO (?:\[\d+\] )?(?P<op>[A-Za-z]+): opCount (?P<count>[0-9a-fA-F]+)\b(?P<rest>.*)$")
# (the look-behind starts a host only at a token's start: a long token without ':' is then one failed try, not one
# per character, each scanning the rest of it)
_HOST = re.compile(r"(?<![^\s:()])(?P<host>[^\s:()]+):(?P<pid>\d+):(?P<tid>\d+) \[(?P<dev>\d+)\]"
                   r"(?: (?P<src>[\w./-]+:\d+))? NCCL")
_COLL_FIELD = re.compile(r"\b(sendbuff|recvbuff|count|datatype|op|root|comm|stream|task|globalrank)[ =]"
                         r"(0x[0-9a-fA-F]+|-?\d+)")
_NRANKS = re.compile(r"\[nranks=(\d+)")
_INIT_HEAD = re.compile(r"NCCL INFO (?:(?P<api>ncclCommInitRankConfig|ncclCommInitRankScalable|ncclCommInitRank|"
                        r"ncclCommInitAll|ncclCommSplit|ncclCommShrink|bootstrapSplit:) )?comm (?P<comm>0x[0-9a-fA-F]+) ")
_INIT_FIELD = re.compile(r"\b(rank|nranks|nRanks|cudaDev|nvmlDev|busId|parent|color|key|commId|nNodes|localRanks|"
                         r"localRank|MNNVL) (0x[0-9a-fA-F]+|-?[0-9a-fA-F]+)\b")
_INIT_STATE = re.compile(r"- Init (\w+)")
_TIMINGS = re.compile(r"Init timings(?: - (\w+))?: rank (\d+) nranks (\d+) total ([\d.]+)")
_WARN = re.compile(r"NCCL WARN (?P<msg>.*)$")
_WARN_DETAILS = (
    ("status", re.compile(r"(?:status=|with error )(\d+)"), int),
    ("opcode", re.compile(r"opcode[= ](\d+)"), int),
    ("len", re.compile(r"\blen[= ](\d+)"), int),
    ("vendor_err", re.compile(r"vendor err (\d+)"), int),
    ("net", re.compile(r"\bNET/(\w+)"), str),
    # "Got completion from peer 10.2.3.4<54862>", "Connection closed by remote peer node1<57557>", and the socket
    # calls' "Call to recv from 11.127.49.2<36048> failed", "Connect to 10.0.0.2<45763> failed"
    ("peer", re.compile(r"(?:peer|from|to) (\S+?)<\d+>"), str),
    # NCCL's CUDA runtime checks print "Cuda failure 'invalid argument'", its driver-API checks (CUCHECK, 2.19+)
    # the error number too: "Cuda failure 700 'an illegal memory access was encountered'"
    ("cuda_error", re.compile(r"Cuda failure (?:\d+ )?'([^']*)'"), str),
    ("cuda_error_code", re.compile(r"Cuda failure (\d+) '"), int),
    ("call", re.compile(r"Call to (\w+)(?: (?:from|to) \S+)? failed"), str),
)
_INT_FIELDS = {"rank": "comm_rank", "nranks": "nranks", "nRanks": "nranks", "cudaDev": "cuda_dev",
               "nvmlDev": "nvml_dev", "color": "color", "key": "key", "nNodes": "nnodes",
               "localRanks": "local_ranks", "localRank": "local_rank", "MNNVL": "mnnvl"}
_TEXT_FIELDS = {"busId": "bus_id", "parent": "parent", "commId": "comm_id"}


def _prefix(body: str, at: int) -> re.Match[str] | None:
    """The `host:pid:tid [dev]` prefix of the message that starts at `at`: the last one before it. Processes that
    share one stdout interleave their writes: in `h:1:1 [2] NCCL INFO h:9:9 [7] NCCL INFO Broadcast: ...` the
    collective is device 7's (NCCL issue 147)."""
    end = at + 4  # the prefix's own "NCCL" when the message starts at "NCCL INFO"
    hm = _HOST.match(body, 0, end) or _HOST.search(body, 0, end)
    while hm is not None and hm.end() < at:
        nxt = _HOST.search(body, hm.end(), end)
        if nxt is None:
            break
        hm = nxt
    return hm


def _host(body: str, data: dict[str, Any], with_pid: bool, at: int) -> None:
    hm = _prefix(body, at)
    if hm:
        data["host"] = hm.group("host")
        if with_pid:
            data["pid"] = int(hm.group("pid"))
            if hm.group("src"):
                data["source"] = hm.group("src")
        data["device"] = int(hm.group("dev"))


# NCCL 2.x's own order, the line a job prints thousands of times a second: one match, no field scan
_COLL_STD = re.compile(r"NCCL INFO (?:\[\d+\] )?([A-Za-z]+): opCount ([0-9a-fA-F]+) sendbuff (\S+) recvbuff (\S+) "
                       r"count (\d+) datatype (\d+) op (\d+) root (-?\d+) comm (0x[0-9a-fA-F]+) \[nranks=(\d+)\] "
                       r"stream (0x[0-9a-fA-F]+)\s*$")


def _coll_std(body: str, ctx: SourceContext) -> Parsed | None:
    m = _COLL_STD.search(body)
    if m is None:
        return None
    op, count, send, recv, n, dtype, redop, root, comm, nranks, stream = m.groups()
    data: dict[str, Any] = {"op": op, "op_count": int(count, 16)}
    if send != "(nil)":
        data["sendbuff"] = send
    if recv != "(nil)":
        data["recvbuff"] = recv
    data.update(count=int(n), datatype=int(dtype), redop=int(redop), root=int(root), comm=comm, stream=stream,
                nranks=int(nranks))
    hm = _prefix(body, m.start())
    if hm:
        data["host"] = hm.group("host")
        data["device"] = int(hm.group("dev"))
    if ctx.comms:
        known = ctx.comms.get(comm)
        if known:
            for k in ("comm_id", "comm_rank"):
                if k in known:
                    data[k] = known[k]
    return Parsed("op", data)


def parse_coll(body: str, ctx: SourceContext) -> Parsed | None:
    fast = _coll_std(body, ctx)
    if fast is not None:
        return fast
    m = _COLL.search(body)
    if m is None:
        return None
    rest = m.group("rest")
    data: dict[str, Any] = {"op": m.group("op"), "op_count": int(m.group("count"), 16)}
    line_rank = None
    for name, value in _COLL_FIELD.findall(rest):
        if name in ("sendbuff", "recvbuff", "comm", "stream"):
            data[name] = value
        elif name == "globalrank":  # RCCL: the process's global rank
            line_rank = int(value, 16) if value.startswith("0x") else int(value)
        elif name == "op":  # "op 0" is the reduction op, not the collective
            data["redop"] = int(value, 16) if value.startswith("0x") else int(value)
        else:
            data[name] = int(value, 16) if value.startswith("0x") else int(value)
    data["op"] = m.group("op")
    nr = _NRANKS.search(rest)
    if nr:
        data["nranks"] = int(nr.group(1))
    data.setdefault("stream", "default")
    _host(body, data, False, m.start())
    comm = data.get("comm")
    if comm is not None and ctx.comms:
        known = ctx.comms.get(comm)
        if known:
            for k in ("comm_id", "comm_rank", "nranks"):
                if k in known:
                    data.setdefault(k, known[k])
    return Parsed("op", data, line_rank)


def parse_init(body: str, ctx: SourceContext) -> Parsed | None:
    m = _INIT_HEAD.search(body)
    if m is None:
        return None
    fields: dict[str, Any] = {"comm": m.group("comm")}
    if m.group("api"):
        fields["api"] = m.group("api").rstrip(":")
    for name, value in _INIT_FIELD.findall(body, m.end()):
        if name in _TEXT_FIELDS:
            fields.setdefault(_TEXT_FIELDS[name], value)
        else:
            try:
                fields.setdefault(_INT_FIELDS[name], int(value))
            except ValueError:
                return None  # "rank 0x..": not an init line after all
    if "comm_rank" not in fields or "nranks" not in fields:
        return None  # "NVLS comm 0x.. headRank ..", channel lines: plain messages
    sm = _INIT_STATE.search(body, m.end())
    if sm:
        fields["state"] = sm.group(1)
    _host(body, fields, True, m.start())
    known = ctx.comms.setdefault(fields["comm"], {})
    known["comm_rank"], known["nranks"] = fields["comm_rank"], fields["nranks"]
    if "comm_id" in fields:
        known["comm_id"] = fields["comm_id"]
    return Parsed("log", {"event": "nccl_comm_init", "fields": fields})


def parse_timings(body: str, ctx: SourceContext) -> Parsed | None:
    m = _TIMINGS.search(body)
    if m is None:
        return None
    fields: dict[str, Any] = {"comm_rank": int(m.group(2)), "nranks": int(m.group(3)), "total_s": float(m.group(4))}
    if m.group(1):
        fields["api"] = m.group(1)
    _host(body, fields, True, m.start())
    return Parsed("log", {"event": "nccl_init_timings", "fields": fields})


def parse_warn(body: str, ctx: SourceContext) -> Parsed | None:
    m = _WARN.search(body)
    if m is None:
        return None
    msg = m.group("msg").strip()
    fields: dict[str, Any] = {"message": msg}
    _host(body, fields, True, m.start())
    for name, rx, conv in _WARN_DETAILS:
        d = rx.search(msg)
        if d:
            fields[name] = conv(d.group(1))
    return Parsed("log", {"event": "nccl_warn", "fields": fields})


def parse(body: str, ctx: SourceContext) -> Parsed | None:
    """Any NCCL line: COLL op, init, timings, WARN; None for the other INFO lines (plain messages)."""
    if ": opCount " in body:
        return parse_coll(body, ctx)
    if "NCCL WARN" in body:
        return parse_warn(body, ctx)
    if "comm 0x" in body:
        return parse_init(body, ctx)
    if "Init timings" in body:
        return parse_timings(body, ctx)
    return None


__all__ = ["NAME", "parse", "parse_coll", "parse_init", "parse_timings", "parse_warn"]
