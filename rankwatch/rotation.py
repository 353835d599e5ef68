"""A rotated log's live name (`train.log.2.gz` -> `train.log`): one file's history across logrotate's renames,
copies and compression. Used to keep a rank-less file's parts one series, and to give a finding the same id
whether its line was read live from `train.log` or after the fact from `train.log.1`."""

from __future__ import annotations

import functools
import re

_ROTATED = re.compile(r"(\.(?:log|txt|out|err|json|jsonl|csv))(?:\.\d{1,3}|-\d{8,10})?(?:\.gz|\.bz2|\.xz)?$")


@functools.lru_cache(maxsize=4096)
def rotation_base(path: str) -> str:
    """The live name of a rotated log (`train.log.2.gz` -> `train.log`): one file's history across rotations."""
    return _ROTATED.sub(r"\1", path)
