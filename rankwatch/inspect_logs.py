"""`rankwatch inspect PATH...`: how rankwatch reads a file or folder, before it is shipped.

Per file: the job and rank inferred (and where the rank came from), the line kinds and formats recognised, the
fields each format yielded, and the malformed lines (what would be dead-lettered) with their reasons and examples.
Reads through the same tailer and parser as the shipper and `analyze`, so what it shows is what they do.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from rankwatch.formats.user import UserFormat
from rankwatch.parsing import ContextResolver, ParseError, parse_line
from rankwatch.producers.at_rest import discover_at_rest, file_lines

PLAIN = "plain text"
EXAMPLES = 3


@dataclass
class FileReport:
    path: str
    job: str
    rank: int | None
    rank_source: str  # path | --rank | none
    lines: int = 0
    kinds: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    line_ranks: Counter = field(default_factory=Counter)  # record ranks that differ from the file's
    malformed: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "job": self.job, "rank": self.rank, "rank_source": self.rank_source,
                "lines": self.lines, "kinds": dict(self.kinds), "formats": dict(self.formats),
                "ranks_in_lines": {str(k): v for k, v in sorted(self.line_ranks.items(), key=lambda x: str(x[0]))},
                "malformed": dict(self.malformed)}


@dataclass
class Inspection:
    files: list[FileReport] = field(default_factory=list)
    format_lines: Counter = field(default_factory=Counter)
    format_kinds: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    format_fields: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    format_example: dict[str, str] = field(default_factory=dict)
    malformed: Counter = field(default_factory=Counter)
    malformed_examples: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    files_skipped: Counter = field(default_factory=Counter)  # archives not read, corrupt compressed files

    @property
    def lines(self) -> int:
        return sum(f.lines for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": [f.to_dict() for f in self.files],
            "lines": self.lines,
            "formats": {name: {"lines": n, "kinds": dict(self.format_kinds[name]),
                               "fields": _grouped(self.format_fields[name]),
                               "example": self.format_example.get(name, "")}
                        for name, n in self.format_lines.most_common()},
            "malformed": [{"reason": r, "count": n, "examples": self.malformed_examples[r]}
                          for r, n in self.malformed.most_common()],
            "files_skipped": dict(self.files_skipped),
        }


def _grouped(names: Counter) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for name in sorted(names):
        group, _, fname = name.partition(":")
        if fname:
            out[group].append(fname)
    return dict(out)


def _reason_class(reason: str) -> str:
    """The reason without the offending value: 'loss is not a number: 'high'' -> 'loss is not a number'."""
    return re.sub(r":\s*['\"(\[{].*$", "", reason)[:80]


def _field_names(kind: str, data: dict[str, Any]) -> list[str]:
    """`group:field` names, the group being the record kind or, for log records, their event."""
    if "event" in data:
        return [f"{data['event']}:{k}" for k in (data.get("fields") or {})] or [f"{data['event']}:"]
    return [f"{kind}:{k}" for k in data if k not in ("msg", "raw", "checkpoint")]


def _group_fields(names: Counter, groups: Counter, per_group: int = 12) -> str:
    """One line per record kind or log event: 'metrics 9: step loss ...', 'cuda_error 4: error gpu ...'."""
    fields: dict[str, list[str]] = defaultdict(list)
    for name in sorted(names):
        group, _, fname = name.partition(":")
        if fname:
            fields[group].append(fname)
    lines = []
    for group, n in groups.most_common():
        fs = fields.get(group, [])
        shown = " ".join(fs[:per_group]) + (f" +{len(fs) - per_group}" if len(fs) > per_group else "")
        lines.append(f"{group} {n:,}: {shown}" if shown else f"{group} {n:,}")
    return "\n".join(lines)


def inspect_paths(paths: list[str], job: str | None = None, rank: int | None = None,
                  formats: tuple[UserFormat, ...] = (), max_lines: int = 0, progress: bool = False) -> Inspection:
    resolver = ContextResolver(paths, job, rank, formats)
    out = Inspection()
    files = discover_at_rest(paths, out.files_skipped)
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True, console=_console(sys.stderr))
        bar.start()
        task = bar.add_task("reading", total=len(files))
    try:
        for path in files:
            out.files.append(_inspect_file(path, resolver, out, max_lines))
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    return out


def _inspect_file(path: str, resolver: ContextResolver, out: Inspection, max_lines: int) -> FileReport:
    report: FileReport | None = None
    lines = file_lines(path, problems=out.files_skipped)
    try:
        for batch in lines:
            for line in batch:
                ctx = resolver.context(line.fid, line.path)
                if report is None:
                    source = "path" if ctx.rank_from_path else ("--rank" if ctx.rank is not None else "none")
                    report = FileReport(path=path, job=ctx.job, rank=ctx.rank, rank_source=source)
                report.lines += 1
                try:
                    rec = parse_line(line.text, ctx, line.offset, 0.0)
                except ParseError as exc:
                    cls = _reason_class(exc.reason)
                    report.malformed[cls] += 1
                    out.malformed[cls] += 1
                    if len(out.malformed_examples[cls]) < EXAMPLES:
                        out.malformed_examples[cls].append({"file": path, "offset": line.offset,
                                                            "reason": exc.reason, "line": line.text[:300]})
                    continue
                name = ctx.last_format or PLAIN
                report.kinds[rec.kind] += 1
                report.formats[name] += 1
                if rec.rank != ctx.rank:
                    report.line_ranks[rec.rank] += 1
                out.format_lines[name] += 1
                out.format_kinds[name][rec.data["event"] if rec.kind == "log" and "event" in rec.data
                                       else rec.kind] += 1
                if name != PLAIN:
                    out.format_fields[name].update(_field_names(rec.kind, rec.data))
                out.format_example.setdefault(name, line.text[:300])
                if max_lines and report.lines >= max_lines:
                    return report
    finally:
        lines.close()  # stopped early at max_lines: close the file now
    if report is None:
        ctx = resolver.context("empty:" + path, path)
        report = FileReport(path=path, job=ctx.job, rank=ctx.rank,
                            rank_source="path" if ctx.rank_from_path else ("--rank" if ctx.rank is not None else "none"))
    return report


def _console(stream=None):
    from rich.console import Console

    return Console(file=stream or sys.stdout, width=None if (stream or sys.stdout).isatty() else 80)


def render(result: Inspection, stream=None) -> None:
    """Tables that read at 80 columns and when piped."""
    from rich import box
    from rich.table import Table

    con = _console(stream)
    n_files = len(result.files)
    metrics = sum(f.kinds.get("metrics", 0) for f in result.files)
    jobs = sorted({f.job for f in result.files})
    con.print(f"[bold]rankwatch inspect[/]: {n_files} file{'s' * (n_files != 1)}, {result.lines:,} lines, "
              f"{metrics:,} training-metric records, {sum(result.malformed.values()):,} malformed; "
              f"job{'s' * (len(jobs) != 1)} {', '.join(jobs) or '-'}")
    if result.files_skipped:
        con.print(f"files skipped or cut short: {dict(result.files_skipped)}")

    t = Table(title="Files", box=box.SIMPLE, title_justify="left")
    t.add_column("file", overflow="fold", ratio=3)
    if len(jobs) > 1:
        t.add_column("job", overflow="fold")
    t.add_column("rank", overflow="fold")
    t.add_column("lines", justify="right")
    t.add_column("recognised", overflow="fold", ratio=2)
    common = os.path.commonpath([f.path for f in result.files]) if len(result.files) > 1 else ""
    for f in result.files:
        if f.rank is not None:
            rank = f"{f.rank} ({f.rank_source})"
        elif f.line_ranks:
            rank = "in lines: " + ",".join(str(r) for r in sorted(f.line_ranks, key=str)[:6])
        else:
            rank = "unknown"
        known = [(n, c) for n, c in f.formats.most_common() if n != PLAIN]
        rec = ", ".join(f"{n} {c:,}" for n, c in known[:3]) or "plain text only"
        if f.malformed:
            rec += f"; [red]malformed {sum(f.malformed.values()):,}[/]"
        row = [os.path.relpath(f.path, common) if common else f.path]
        if len(jobs) > 1:
            row.append(f.job)
        t.add_row(*row, rank, f"{f.lines:,}", rec)
    con.print(t)

    t = Table(title="Formats recognised", box=box.SIMPLE, title_justify="left")
    t.add_column("format", no_wrap=True)
    t.add_column("lines", justify="right")
    t.add_column("records (kind or event), count: fields found", overflow="fold", ratio=1)
    for name, n in result.format_lines.most_common():
        t.add_row(name, f"{n:,}", _group_fields(result.format_fields[name], result.format_kinds[name])
                  if name != PLAIN else "log: msg")
    con.print(t)

    if result.malformed:
        t = Table(title="Malformed lines (would be dead-lettered)", box=box.SIMPLE, title_justify="left")
        t.add_column("reason", overflow="fold", ratio=1)
        t.add_column("count", justify="right")
        t.add_column("first example", overflow="fold", ratio=2)
        for reason, n in result.malformed.most_common():
            ex = result.malformed_examples[reason][0]
            t.add_row(reason, f"{n:,}", f"{os.path.basename(ex['file'])}:{ex['offset']}: {ex['reason']}\n"
                                         f"{ex['line'][:160]}")
        con.print(t)
    if not metrics and result.lines:
        con.print("[yellow]no training metrics recognised[/]: if your framework prints them, add a [[formats]] "
                  "regex to the config file (docs/FORMATS.md) and pass --config")


__all__ = ["Inspection", "FileReport", "inspect_paths", "render"]
