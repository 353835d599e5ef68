"""Replay of recorded GPU samples for `producer --gpu --replay` and `rankwatch memory ... --replay`: GPU sample
JSON lines (docs/FORMATS.md) or the CSV of `nvidia-smi --query-gpu=... --format=csv [-l 1]`, paced in real time or
faster."""

from __future__ import annotations

import csv
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from rankwatch.parsing import ParseError, SourceContext, parse_iso, parse_line
from rankwatch.records import Record

log = logging.getLogger("rankwatch.sampler")
MIB = 2**20


_CSV_FIELDS = {"index": "gpu", "memory.used": "mem_used_bytes", "memory.total": "mem_total_bytes",
               "utilization.gpu": "util_pct", "temperature.gpu": "temp_c", "power.draw": "power_w"}


def _csv_value(text: str, unit: str) -> float | None:
    text = text.strip()
    if not text or text.startswith("["):  # [N/A], [Not Supported]
        return None
    number = float(text.split()[0])
    if unit in ("MiB",) or text.endswith("MiB"):
        return number * MIB
    return number


def _csv_records(lines: Iterable[str], path: str, job: str, host: str, ranks: dict[int, int]
                 ) -> Iterator[Record]:
    header: list[tuple[str, str]] | None = None
    for offset, line in enumerate(lines):
        if not line.strip():
            continue
        cells = next(csv.reader(io.StringIO(line), skipinitialspace=True))
        if cells and cells[0].strip().startswith("timestamp") or any("memory.used" in c for c in cells):
            header = []
            for c in cells:
                name, _, unit = c.strip().partition(" [")
                header.append((name.strip(), unit.rstrip("]")))
            continue
        if header is None:
            raise ParseError("nvidia-smi CSV without its header line: record it with --format=csv "
                             "(noheader output has no column names)")
        row = dict(zip((h for h, _ in header), zip(cells, (u for _, u in header), strict=False), strict=False))
        try:
            ts = parse_iso(row["timestamp"][0].replace("/", "-")) if "timestamp" in row else float(offset)
            data: dict[str, Any] = {"host": host}
            for col, (text, unit) in row.items():
                field = _CSV_FIELDS.get(col)
                if field is not None:
                    v = _csv_value(text, unit)
                    if v is not None:
                        data[field] = int(v) if field == "gpu" or field.endswith("_bytes") else v
        except (ValueError, KeyError) as exc:
            log.warning("%s:%d: skipping a line that is not a GPU sample (%s)", path, offset + 1, exc)
            continue
        if "gpu" in data and "mem_used_bytes" in data and "mem_total_bytes" in data:
            yield Record("gpu", job, ranks.get(data["gpu"]), ts, path, offset, data)


def read_samples(path: str, job: str, host: str | None = None, ranks: dict[int, int] | None = None
                 ) -> Iterator[Record]:
    """GPU sample records from a recording: JSON lines (other record kinds and bad lines are skipped and
    counted in the log) or nvidia-smi CSV. `host`: for CSV, which has no host column (default: this machine)."""
    ranks = ranks or {}
    host = host or socket.gethostname()
    with open(path, encoding="utf-8", errors="replace") as fh:
        first = fh.readline()
        fh.seek(0)
        if first.lstrip().startswith("{") or first.lstrip().startswith("["):
            ctx = SourceContext(path=os.path.abspath(path), job=job)
            skipped = 0
            offset = 0
            for line in fh:
                try:
                    rec = parse_line(line.rstrip("\n"), ctx, offset)
                except ParseError:
                    rec = None
                offset += len(line.encode("utf-8"))
                if rec is None or rec.kind != "gpu":
                    skipped += 1
                    continue
                if rec.rank is None and rec.data["gpu"] in ranks:
                    rec.rank = ranks[rec.data["gpu"]]
                yield rec
            if skipped:
                log.warning("%s: %d lines were not GPU samples and were skipped", path, skipped)
        else:
            yield from _csv_records(fh, os.path.abspath(path), job, host, ranks)


def paced(records: Iterable[Record], speed: float, sleep: Callable[[float], None] = time.sleep,
          clock: Callable[[], float] = time.monotonic, stop: threading.Event | None = None) -> Iterator[Record]:
    """Records at their recorded pace, `speed` times faster (0: no pacing)."""
    t0_event = t0_wall = None
    for rec in records:
        if stop is not None and stop.is_set():
            return
        if speed > 0:
            if t0_event is None:
                t0_event, t0_wall = rec.ts, clock()
            due = (rec.ts - t0_event) / speed - (clock() - t0_wall)
            if due > 0:
                sleep(due)
        yield rec
