"""`rankwatch analyze`: the same parser and pipeline as the stream, over files, with no Kafka.

Files are read through the same tailer as the shipper (same line rules: complete lines only, 64 KiB cut,
invalid UTF-8 replaced) and merged by event time, so cross-rank detectors see ranks interleaved as a live job
delivers them, not one whole file after another.
"""

from __future__ import annotations

import heapq
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from rankwatch.processors.pipeline import DetectionConfig, Pipeline
from rankwatch.producers.at_rest import allow_open_files, discover_at_rest, file_lines

from rankwatch.formats.user import UserFormat
from rankwatch.parsing import ContextResolver, ParseError, parse_line
from rankwatch.records import Anomaly, Record


@dataclass
class AnalyzeStats:
    lines: int = 0
    records: Counter = field(default_factory=Counter)
    parse_errors: Counter = field(default_factory=Counter)
    truncated: int = 0
    files_skipped: Counter = field(default_factory=Counter)  # archives not read, corrupt compressed files


_UNDATED_HOLD = 10_000  # leading lines without a time held until the file's first time
_BUFFERED_LINES = 1_000_000  # lines read ahead over all files of a merge: 4,096 rank files get 256 each


def _file_records(path: str, resolver: ContextResolver, stats: AnalyzeStats, now: float,
                  batch: int = 20_000) -> Iterator[Record]:
    """A file's records in order. A line without a time takes its file's previous one. The lines before the
    file's first time (a Slurm output's `+ srun ...` and srun's messages) take that first time, and a file with
    no full time at all its modification time, which also gives the year of glog-style times (`W0420 07:28:49`):
    not the time of the analysis, which would move the job's clock to now, so that a job that ended long ago
    looked silent since (a hang), and put April's torchrun lines in this year's April."""
    try:
        arrival = min(os.path.getmtime(path), now)
    except OSError:
        arrival = now
    held: list[Record] = []  # records read before any line of the file had a time
    for lines in file_lines(path, batch, problems=stats.files_skipped):
        for line in lines:
            stats.lines += 1
            stats.truncated += line.truncated
            ctx = resolver.context(line.fid, line.path)
            try:
                rec = parse_line(line.text, ctx, line.offset, arrival)
            except ParseError as exc:
                stats.parse_errors[exc.reason.split(":")[0]] += 1
                continue
            stats.records[rec.kind] += 1
            if rec.ts == arrival and len(held) < _UNDATED_HOLD:
                held.append(rec)  # no time of its own, nor any earlier in the file (parse_line's fallback)
                continue
            for r in held:  # printed before the file's first time
                r.ts = rec.ts
            yield from held
            held = []
            yield rec
    yield from held  # a file with no time at all: its modification time


def read_records(paths: list[str], job: str | None = None, rank: int | None = None,
                 stats: AnalyzeStats | None = None, formats: tuple[UserFormat, ...] = ()) -> Iterator[Record]:
    """Every complete line under `paths`, parsed (the user's `formats` first), merged across files by event time
    (stable within a file)."""
    stats = stats if stats is not None else AnalyzeStats()
    resolver = ContextResolver(paths, job, rank, formats)
    now = time.time()
    files = discover_at_rest(paths, stats.files_skipped)
    allow_open_files(files)
    batch = max(256, min(20_000, _BUFFERED_LINES // max(1, len(files))))
    streams = [_file_records(f, resolver, stats, now, batch) for f in files]
    return heapq.merge(*streams, key=lambda r: r.ts)


def run_pipeline(pipeline: Pipeline, records: Iterable[Record], batch: int = 2000, span_s: float = 1.0,
                 wall: float | None = None) -> list[Anomaly]:
    """Micro-batches in event-time order through both stages, as the worker would see them: at most `batch`
    records and `span_s` seconds of event time each, so the job clocks that judge silence (hangs) advance as
    they would live, even where records are sparse. Then the end of input is the moment of judgement for
    whatever is still open. `wall`: when the analysis runs, if the records are all the job logged until then
    (files at rest): a job stuck mid-collective when its logs end has then been silent that long."""
    out: list[Anomaly] = []
    chunk: list[Record] = []
    start = 0.0
    for rec in records:
        if chunk and (len(chunk) >= batch or rec.ts - start > span_s):
            out.extend(pipeline.process(chunk))
            chunk = []
        if not chunk:
            start = rec.ts
        chunk.append(rec)
    out.extend(pipeline.process(chunk))
    out.extend(pipeline.finish(wall))
    return out


def analyze(paths: list[str], job: str | None = None, rank: int | None = None,
            detection: DetectionConfig | None = None, stats: AnalyzeStats | None = None,
            formats: tuple[UserFormat, ...] = ()) -> list[Anomaly]:
    return run_pipeline(Pipeline(detection), read_records(paths, job, rank, stats, formats), wall=time.time())
