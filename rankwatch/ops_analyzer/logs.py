"""`DistributedLogAnalyzer`: a folder of rank logs -> `rank_entries`, the input of `LSTMTimeSeriesAnalyzer`.

Kept from the users' offline tool (docs/OPS.md). There is no parser here: files are found and read by the
project's own reader (`processors/offline.read_records`: the shipper's line rules, `parsing.parse_line`), so an
NCCL COLL line or a JSON op event means here exactly what it means to `rankwatch analyze` and to the stream.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from datetime import datetime
from typing import Any

from rankwatch.parsing import parse_iso, rank_from_path
from rankwatch.processors.offline import AnalyzeStats, read_records
from rankwatch.producers.at_rest import discover_at_rest
from rankwatch.records import Record

log = logging.getLogger("rankwatch.ops")

# Every entry has these keys (None when the line did not carry the field); the parser's other op fields
# (count, nranks, datatype, host, comm_id, duration_s, ...) are kept as they are.
ENTRY_KEYS = ("timestamp", "op", "op_count", "stream", "save_count", "comm", "job", "file", "offset")


def entry_from_record(rec: Record) -> dict[str, Any]:
    """One parsed `op` record -> the seed tool's entry dict (timestamp in epoch seconds)."""
    d = rec.data
    entry = {k: v for k, v in d.items() if k not in ("sendbuff", "recvbuff")}
    entry.update({"timestamp": rec.ts, "op": str(d.get("op", "")), "op_count": int(d["op_count"]),
                  "stream": str(d.get("stream", "default")), "save_count": _plain(d.get("save_count")),
                  "comm": d.get("comm") or d.get("comm_id"), "job": rec.job, "rank": rec.rank,
                  "file": rec.file, "offset": rec.offset})
    return entry


def _plain(value: Any) -> Any:
    """JSON numbers arrive as floats (`save_count: 3` -> 3.0); show integral ones as ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def entry_time(entry: dict[str, Any]) -> float:
    """`timestamp` as epoch seconds: a number, a datetime (naive = UTC) or an ISO 8601 string."""
    ts = entry["timestamp"]
    if isinstance(ts, bool):
        raise TypeError("timestamp is a boolean")
    if isinstance(ts, (int, float)):
        return float(ts)
    if isinstance(ts, datetime):
        return ts.timestamp() if ts.tzinfo else parse_iso(ts.isoformat())
    return parse_iso(str(ts))


def entry_op_count(entry: dict[str, Any]) -> int:
    """`op_count` as an int; strings are hex as NCCL prints them (`opCount 1f`) unless all digits."""
    n = entry["op_count"]
    if isinstance(n, bool):
        raise TypeError("op_count is a boolean")
    if isinstance(n, str):
        return int(n) if n.isdigit() else int(n, 16)
    return int(n)


def save_order(save_count: Any) -> tuple[int, float, str]:
    """Sort key of a save_count: absent first, then numbers in order, then anything else by its text."""
    if save_count is None:
        return (0, 0.0, "")
    try:
        return (1, float(save_count), "")
    except (TypeError, ValueError):
        return (2, 0.0, str(save_count))


def entry_order(entry: dict[str, Any]) -> tuple:
    """Order of the ops of one rank/stream (seed semantics, made safe for the model).

    The seed sorts by save_count, then opCount. The model needs time order inside a run, so within one
    save_count the order is by timestamp, with opCount breaking ties (logs print ms or us, so consecutive
    ops can share a timestamp), then the order the entries were given in (the sort is stable). For one
    communicator per stream, opCount grows with time and this is exactly the seed's order; it differs only
    where the seed's would be wrong: a restart without a new save_count (opCount starts again from 0, and
    sorting by opCount would interleave the two lives of the job), or two communicators on one stream.
    """
    return (save_order(entry.get("save_count")), entry_time(entry), entry_op_count(entry))


class DistributedLogAnalyzer:
    """Finds a job's log files and turns their collective-op lines into `{rank: [entry, ...]}`."""

    def __init__(self, log_path: str | os.PathLike[str], job: str | None = None, verbose: bool = False) -> None:
        self.log_path = os.fspath(log_path)
        self.job = job
        self.verbose = verbose
        self.log_files: list[str] = []
        self.file_ranks: dict[str, int | None] = {}  # file -> rank inferred from its path (None: not there)
        self.stats = AnalyzeStats()  # lines read, records by kind, malformed lines by reason
        self.unranked = 0  # op entries whose rank neither the path nor the line names (kept under None)

    def discover_log_files(self) -> list[str]:
        """Every file under `log_path` (hidden ones and archives skipped; rotated parts compressed with
        gzip/bzip2/xz are read, as `rankwatch analyze` reads them), with the rank its path names (`rank3/`, `rank_3.log`, `node0-rank-3.txt`) in `file_ranks`.
        A file without a rank in its path may still name ranks per line (`[rank3]:` prefix, JSON `rank`)."""
        if not os.path.exists(self.log_path):
            raise FileNotFoundError(f"no such file or folder: {self.log_path}")
        root = os.path.abspath(self.log_path)
        base = os.path.dirname(root) if os.path.isfile(root) else root
        self.log_files = discover_at_rest([root])
        self.file_ranks = {f: rank_from_path(f, base) for f in self.log_files}
        if self.verbose:
            for f, r in self.file_ranks.items():
                log.info("log file %s: rank %s", f, "?" if r is None else r)
        return list(self.log_files)

    def parse_log_files(self) -> dict[int | None, list[dict[str, Any]]]:
        """`{rank: [entry, ...]}` of every collective op in the files; each entry has `ENTRY_KEYS`, sorted per
        rank/stream by `entry_order` (streams of a rank follow one another, each in its own order)."""
        if not self.log_files:
            self.discover_log_files()
        self.stats = AnalyzeStats()
        by_key: dict[tuple[int | None, str], list[dict[str, Any]]] = defaultdict(list)
        for rec in read_records([self.log_path], self.job, None, self.stats):
            if rec.kind != "op":
                continue
            entry = entry_from_record(rec)
            by_key[(rec.rank, entry["stream"])].append(entry)
        rank_entries: dict[int | None, list[dict[str, Any]]] = defaultdict(list)
        for (rank, _), entries in sorted(by_key.items(), key=lambda kv: (_rank_order(kv[0][0]), kv[0][1])):
            entries.sort(key=entry_order)
            rank_entries[rank].extend(entries)
        self.unranked = len(rank_entries.get(None, []))
        if self.unranked:
            log.warning("%d collective ops under %s name no rank (path or line): kept under rank None",
                        self.unranked, self.log_path)
        errors = sum(self.stats.parse_errors.values())
        if errors:
            log.warning("%d malformed lines skipped: %s", errors, dict(self.stats.parse_errors))
        return dict(rank_entries)


def _rank_order(rank: int | None) -> tuple[int, int]:
    return (1, 0) if rank is None else (0, rank)
