"""`rankwatch analyze`: the same parser and pipeline as the stream, over files, with no Kafka."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from rankwatch.processors.pipeline import DetectionConfig, Pipeline
from rankwatch.producers.tail import Tailer

from rankwatch.parsing import ContextResolver, ParseError, parse_line
from rankwatch.records import Anomaly, Record


@dataclass
class AnalyzeStats:
    lines: int = 0
    records: Counter = field(default_factory=Counter)
    parse_errors: Counter = field(default_factory=Counter)
    truncated: int = 0


def read_records(paths: list[str], job: str | None = None, rank: int | None = None,
                 stats: AnalyzeStats | None = None) -> Iterator[Record]:
    """Every complete line of the files under `paths`, parsed; broken lines are counted in `stats`."""
    stats = stats if stats is not None else AnalyzeStats()
    tailer = Tailer(paths, close_inactive=0.0)
    resolver = ContextResolver(paths, job, rank)
    now = time.time()
    try:
        while True:
            lines = tailer.poll(50_000)
            if not lines:
                break
            for line in lines:
                stats.lines += 1
                stats.truncated += line.truncated
                try:
                    rec = parse_line(line.text, resolver.context(line.fid, line.path), line.offset, now)
                except ParseError as exc:
                    stats.parse_errors[exc.reason.split(":")[0]] += 1
                    continue
                stats.records[rec.kind] += 1
                yield rec
    finally:
        tailer.close()


def analyze(paths: list[str], job: str | None = None, rank: int | None = None,
            detection: DetectionConfig | None = None, stats: AnalyzeStats | None = None) -> list[Anomaly]:
    pipeline = Pipeline(detection)
    return pipeline.process(read_records(paths, job, rank, stats))
