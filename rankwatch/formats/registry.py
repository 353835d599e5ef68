"""Line -> typed record: prefixes, then the formats tried in order.

Order: the file's user-defined formats (config), JSON objects, Lightning CSV rows (in `*.csv` files), then the
built-in text formats, each behind a substring that a line of that format always contains, so a line pays one
fast `in` test per format it is not, and a regex only for the format it is. NCCL lines, the most frequent in
a job that logs collectives, are tried first.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from rankwatch.formats import (
    deepspeed,
    hf,
    launcher,
    lightning,
    megatron,
    mmengine,
    nanogpt,
    nccl,
    torch_dist,
    torchtitan,
)
from rankwatch.formats.base import Parsed, ParseError, SourceContext, checkpoint_path, checkpoint_step
from rankwatch.formats.jsonl import NOT_JSON, json_record, load_json
from rankwatch.formats.prefixes import split_prefix, strip_ansi
from rankwatch.records import Record

Parser = Callable[[str, SourceContext], "Parsed | None"]
# "[Rank 3] ..." at the start of a message, possibly after bracketed logger tags ("[INFO] [logging.py:96:log_dist]")
_LINE_RANK = re.compile(r"\s*(?:\[[^\]]*\]\s*){0,3}\[Rank (\d+)\]")


def _hf(body: str, ctx: SourceContext) -> Parsed | None:
    start = hf.find_dict(body)
    return hf.parse(body, ctx, start) if start >= 0 else None


def _torchtitan(body: str, ctx: SourceContext) -> Parsed | None:
    return torchtitan.parse(body, ctx) if "loss:" in body else None


def _megatron(body: str, ctx: SourceContext) -> Parsed | None:
    return megatron.parse(body, ctx) if "|" in body else None


def _nccl_error(body: str, ctx: SourceContext) -> Parsed | None:
    return torch_dist.parse_nccl_error(body, ctx) if torch_dist.probe_nccl_error(body) else None


# (substring every line of the format contains, format name, parser): tried in this order
BUILTINS: tuple[tuple[str, str, Parser], ...] = (
    ("NCCL", nccl.NAME, nccl.parse),
    ("WorkNCCL", torch_dist.NAME, torch_dist.parse_watchdog),
    ("last enqueued", torch_dist.NAME, torch_dist.parse_watchdog),
    ("NCCL operations", torch_dist.NAME, torch_dist.parse_watchdog),
    ("entire process down", torch_dist.NAME, torch_dist.parse_watchdog),
    ("dump signal", torch_dist.NAME, torch_dist.parse_watchdog),  # "Last enqueued": capitalised, so not the key above
    ("Heartbeat monitor timed out", torch_dist.NAME, torch_dist.parse_watchdog),
    ("watchdog got stuck", torch_dist.NAME, torch_dist.parse_watchdog),
    *((key, launcher.NAME, launcher.parse) for key in launcher.KEYS),
    ("rror", torch_dist.NAME, _nccl_error),
    ("CUDA", torch_dist.NAME, torch_dist.parse_cuda),
    ("iteration", megatron.NAME, _megatron),
    ("] datetime: ", megatron.NAME, megatron.parse_datetime),
    ("{'", hf.NAME, _hf),
    ("step:", torchtitan.NAME, _torchtitan),
    ("iter ", nanogpt.NAME, nanogpt.parse_iter),
    ("train loss", nanogpt.NAME, nanogpt.parse_eval),
    ("| loss", nanogpt.LLMC, nanogpt.parse_llmc),
    *((key, mmengine.NAME, mmengine.parse) for key in ("(train)", "(val)", "(test)")),
    ("OVERFLOW!", deepspeed.NAME, deepspeed.parse_overflow),
    ("skipped=", deepspeed.NAME, deepspeed.parse_step),
    ("SamplesPerSec=", deepspeed.NAME, deepspeed.parse_timer),
    ("iter time (s)", deepspeed.NAME, deepspeed.parse_pipe),
)


def parse_body(body: str, ctx: SourceContext) -> tuple[Parsed, str] | None:
    """The first format that recognises the body, and its name; None for a plain message."""
    for uf in ctx.user_formats:
        p = uf.parse(body, ctx)
        if p is not None:
            return p, uf.name
    if ctx.is_csv:
        p = lightning.parse(body, ctx)
        if p is not None:
            return p, lightning.NAME
    for key, name, parser in BUILTINS:
        if key in body:
            p = parser(body, ctx)
            if p is not None:
                return p, name
    return None


def parse_line(line: str, ctx: SourceContext, offset: int = -1, arrival: float = 0.0) -> Record:
    """Classify and parse one line (without its newline). Raises ParseError for lines that claim a format and
    break it; everything else is a record (a plain message at worst)."""
    raw = line
    if "\x1b" in line:
        line = strip_ansi(line)
    body, rank, ts = split_prefix(line, ctx, arrival)
    ctx.line_dated, ctx.arrival = ts is not None, arrival
    rec = _parse_body_line(body, raw, ctx, rank, ts, offset, arrival)
    # srun's task number, the last resort (prefixes.py). Not for NCCL's lines: srun starting one torchrun per
    # node gives a node's processes one number, and stage 2 would take their ops for one rank's
    if rec.rank is None and ctx.task_label is not None and ctx.last_format != nccl.NAME:
        rec.rank = ctx.task_label
    return rec


def _parse_body_line(body: str, raw: str, ctx: SourceContext, rank: int | None, ts: float | None, offset: int,
                     arrival: float) -> Record:
    stripped = body.strip()
    is_object = stripped[:1] == "{" and stripped[-1:] == "}"
    if is_object and not ctx.user_formats:
        rec = _json(stripped, raw, ctx, rank, ts, offset, arrival)
        if rec is not None:
            return rec
    found = parse_body(body, ctx)
    if found is None:
        if is_object and ctx.user_formats:  # JSON, after the user's formats had their chance
            rec = _json(stripped, raw, ctx, rank, ts, offset, arrival)
            if rec is not None:
                return rec
        ctx.last_format = ""
        data = {"msg": stripped, "raw": raw}
        path = checkpoint_path(stripped)
        if path:
            data["checkpoint"] = path
            step = checkpoint_step(stripped, path)
            if step is not None:
                data["checkpoint_step"] = step
        kind, line_rank = "log", None
        if "[Rank " in body:  # Megatron's "[Rank 3] (after 10 iterations) memory ...", DeepSpeed's log_dist
            m = _LINE_RANK.match(body)
            if m:
                line_rank = int(m.group(1))
    else:
        parsed, ctx.last_format = found
        kind, line_rank = parsed.kind, parsed.line_rank
        if ts is None:
            ts = parsed.ts
        data = {"msg": stripped, "raw": raw, **parsed.data} if kind == "log" else parsed.data
    # rank: torchrun prefix > the path > a rank printed in the line ([Rank 3], RCCL globalrank) > --rank
    if rank is None:
        rank = ctx.rank if line_rank is None or ctx.rank_from_path else line_rank
    if ts is None:
        ts = ctx.last_ts if ctx.last_ts is not None else arrival
    ctx.last_ts = ts
    return Record(kind, ctx.job, rank, ts, ctx.path, offset, data, ctx.fid)


def _json(text: str, raw: str, ctx: SourceContext, rank: int | None, ts: float | None, offset: int,
          arrival: float) -> Record | None:
    """A JSON object line as a record; None when the text is not JSON (a Python repr dict, or a message)."""
    obj = load_json(text)
    if obj is NOT_JSON:
        return None
    if not isinstance(obj, dict):
        raise ParseError("JSON line is not an object")
    kind, rank, ts, data = json_record(obj, rank if rank is not None else ctx.rank, ts)
    ctx.last_format = "json" if data is not None else ""
    return _record(ctx, kind, rank, ts, data if data is not None else {"msg": text, "raw": raw}, offset, arrival)


def _record(ctx: SourceContext, kind: str, rank: int | None, ts: float | None, data: dict, offset: int,
            arrival: float) -> Record:
    if ts is None:
        ts = ctx.last_ts if ctx.last_ts is not None else arrival
    ctx.last_ts = ts
    return Record(kind=kind, job=ctx.job, rank=rank, ts=ts, file=ctx.path, offset=offset, data=data, fid=ctx.fid)


__all__ = ["BUILTINS", "parse_body", "parse_line"]
