"""Real lines from public issues and repositories (tests/data/real_lines/, sources noted per line) parse to
exactly the fields written under each line (`#>`). One parsing context per file, as in a real log.

    python tests/test_real_lines.py --update   # rewrite the expectations from the parser (review the diff!)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from rankwatch.parsing import ParseError, SourceContext, parse_line

DATA = Path(__file__).parent / "data" / "real_lines"
FILES = sorted(p for p in DATA.iterdir() if p.suffix in (".txt", ".csv"))


def read_corpus(path: Path) -> list[tuple[str, str, dict | None]]:
    """(source comment, line, expectation) for every real line of the file."""
    out: list[tuple[str, str, dict | None]] = []
    source = ""
    for raw in path.read_text(encoding="utf-8").split("\n")[:-1]:
        if raw.startswith("#>"):
            assert out and out[-1][2] is None, f"{path.name}: expectation without a line: {raw[:60]}"
            out[-1] = (out[-1][0], out[-1][1], json.loads(raw[2:]))
        elif raw.startswith("# source:"):
            source = raw
        elif raw.startswith("# "):
            continue
        else:
            assert source, f"{path.name}: line without a preceding '# source:' comment: {raw[:60]}"
            out.append((source, raw, None))
    return out


def observed(rec, ctx: SourceContext) -> dict:
    data = {k: v for k, v in rec.data.items() if k not in ("msg", "raw")}
    return {"kind": rec.kind, "format": ctx.last_format, "rank": rec.rank, "ts": rec.ts, "data": data}


def _ctx(path: Path) -> SourceContext:
    return SourceContext(path=str(path), job="real", rank=None)


ARRIVAL = 1_700_000_000.0


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == b or math.isclose(a, b, rel_tol=1e-12)
    return a == b


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_real_lines_parse_to_the_expected_fields(path):
    corpus = read_corpus(path)
    assert len(corpus) >= 5, "a format's corpus needs several real lines"
    ctx = _ctx(path)
    for i, (source, line, want) in enumerate(corpus):
        assert want is not None, f"{path.name}: line {i} has no #> expectation: {line[:80]}"
        try:
            got = observed(parse_line(line, ctx, i, ARRIVAL), ctx)
        except ParseError as exc:
            got = {"parse_error": exc.reason}
        assert _same(got, want), f"{path.name} line {i} ({source}):\n{line}\n got  {got}\n want {want}"


def test_every_format_has_real_lines():
    formats = set()
    for path in FILES:
        ctx = _ctx(path)
        for i, (_, line, _) in enumerate(read_corpus(path)):
            parse_line(line, ctx, i, ARRIVAL)
            formats.add(ctx.last_format)
    assert {"megatron", "hf_trainer", "deepspeed", "torchtitan", "nanogpt", "llm.c", "lightning_csv", "nccl",
            "torch_distributed", "launcher", "mmengine"} <= formats


def _update() -> None:
    for path in FILES:
        ctx = _ctx(path)
        out, i = [], 0
        for raw in path.read_text(encoding="utf-8").split("\n")[:-1]:
            if raw.startswith("#>"):
                continue
            out.append(raw)
            if not raw.startswith("# "):
                try:
                    got = observed(parse_line(raw, ctx, i, ARRIVAL), ctx)
                except ParseError as exc:
                    got = {"parse_error": exc.reason}
                out.append("#> " + json.dumps(got))
                i += 1
        path.write_text("\n".join(out) + "\n", encoding="utf-8")


if __name__ == "__main__" and "--update" in sys.argv:
    _update()
