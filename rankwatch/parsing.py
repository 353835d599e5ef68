"""Line -> typed record. The one parser used by the shipper, `rankwatch analyze`, `rankwatch inspect` and the tests.

Each line may carry a torchrun prefix (`[rank3]:`), a logger tag and a time (ISO 8601 or c10's glog form), then
one of the formats in `rankwatch/formats/` (docs/FORMATS.md): the user's own regexes from the config file first,
then JSON objects with rankwatch's field names, Lightning metrics.csv rows, NCCL collectives / communicator
init / warnings, PyTorch distributed and CUDA errors, Megatron-LM, Hugging Face Trainer dicts, torchtitan,
nanoGPT / llm.c and DeepSpeed lines; anything else is a log message. Lines that claim a format but break it
are `ParseError`s that the caller counts and dead-letters.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from pathlib import Path

from rankwatch.formats.base import METRIC_FIELDS, OPTIONAL_METRIC_FIELDS, ParseError, SourceContext
from rankwatch.formats.prefixes import parse_iso
from rankwatch.formats.registry import parse_line
from rankwatch.formats.user import UserFormat
from rankwatch.rotation import rotation_base

_PATH_RANK = re.compile(r"(?<![A-Za-z0-9])rank[_-]?(\d+)", re.IGNORECASE)
# torchrun --log-dir: <dir>/<run id>_<random>/attempt_<restart>/<local rank>/{stdout,stderr}.log; groups: the
# run folder (one per node's launcher), the local rank
_TORCHRUN_LOG_DIR = re.compile(r"(?:^|(.*)/)attempt_\d+/(\d+)/[^/]+$")


class ContextResolver:
    """Maps a file to its SourceContext: job (`--job`, else the tailed folder's name), path-inferred rank, and
    the user formats that apply to it (their glob matched against the path below the tailed root)."""

    def __init__(self, roots: list[str], job: str | None = None, rank: int | None = None,
                 formats: Iterable[UserFormat] = ()) -> None:
        self.roots = [os.path.abspath(r) for r in roots]
        self.job, self.rank = job, rank
        self.formats = tuple(formats)
        self._contexts: dict[str, SourceContext] = {}

    def context(self, fid: str, path: str) -> SourceContext:
        ctx = self._contexts.get(fid)
        if ctx is None:
            root = next((r for r in self.roots if path == r or path.startswith(r + os.sep)), path)
            is_file = os.path.isfile(root)
            base = os.path.dirname(root) if is_file else root
            job = self.job or os.path.basename(base)
            rank = rank_from_path(path, base)
            ctx = SourceContext(path=path, job=job or "job", rank=rank if rank is not None else self.rank,
                                fid=fid, rank_from_path=rank is not None,
                                user_formats=tuple(f for f in self.formats if f.matches_path(path, base)))
            self._contexts[fid] = ctx
        ctx.path = path
        return ctx


def rank_from_path(path: str | Path, root: str | Path | None = None) -> int | None:
    """First `rank[_-]?N` in the folder or file names (relative to the tailed root when given), else the local
    rank of torchrun's `--log-dir` layout (`attempt_0/3/stdout.log`: the global rank on one node; a node's
    folder of a multi-node job gives its local ranks, docs/FORMATS.md)."""
    p = Path(path)
    if root is not None:
        try:
            p = p.relative_to(root)
        except ValueError:
            pass
    m = _PATH_RANK.search(str(p))
    if m:
        return int(m.group(1))
    m = _TORCHRUN_LOG_DIR.search(p.as_posix())
    return int(m.group(2)) if m else None


@functools.lru_cache(maxsize=4096)
def torchrun_run_folder(path: str) -> str | None:
    """The run folder of a file in torchrun's `--log-dir` layout (one per node's launcher), else None."""
    m = _TORCHRUN_LOG_DIR.search(path.replace(os.sep, "/")) if "attempt_" in path else None
    return m.group(1) if m else None


# logrotate's names for a log's older parts: train.log.1, train.log.2.gz, train.log-20240601(.gz). Only after a
# log-like extension: node.0 and node.1 are two files, not one file and its rotation
__all__ = ["ParseError", "SourceContext", "ContextResolver", "parse_line", "parse_iso", "rank_from_path", "torchrun_run_folder",
           "rotation_base",
           "METRIC_FIELDS", "OPTIONAL_METRIC_FIELDS"]
