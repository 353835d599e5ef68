"""Atomic, crash-safe checkpoint file: write to a temp file, fsync, rename, fsync the folder."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)


class CheckpointStore:
    VERSION = 1

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any]:
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, orjson.JSONDecodeError) as exc:
            # A corrupt checkpoint must not stop shipping; say so loudly, keep the bad file for inspection.
            bad = self.path.with_suffix(self.path.suffix + ".corrupt")
            log.error("checkpoint %s unreadable (%s); moved to %s, starting from file beginnings",
                      self.path, exc, bad)
            try:
                os.replace(self.path, bad)
            except OSError:
                pass
            return {}
        if not isinstance(data, dict) or data.get("version") != self.VERSION:
            log.error("checkpoint %s has an unknown format; ignoring it", self.path)
            return {}
        return data

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # integer keys written as strings, as Python's json module does (loaders convert them back): orjson
        # refuses them otherwise, and one such key once stopped a worker at its first save after a hang
        payload = orjson.dumps({"version": self.VERSION, **state}, option=orjson.OPT_NON_STR_KEYS)
        fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
