"""Follow files and folders like `tail -F`, by file identity, so that rotation and truncation lose nothing.

A file is tracked by identity (device:inode), not by name. Its `offset` is the byte just past the last
complete line handed out; a partial last line stays unread until its newline arrives. Rotation by rename keeps
the identity, so the renamed file is drained to its end and the new file at the old name starts at 0.
`copytruncate` is recognised twice over: the tracked file shrinking below its offset (read again from 0), and
the copy appearing as a new file whose first bytes match what was tracked there (it resumes at the old offset,
so lines written between our last read and the truncation are still shipped, once).
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
HEAD_BYTES = 1024  # bytes fingerprinted to recognise a file after a copy or inode reuse
MIN_HEAD_MATCH = 64  # fewer bytes than this are too little evidence that two files are one
DEFAULT_EXCLUDE = ("*.gz", "*.bz2", "*.xz", "*.zst", "*.zip", "*.tar", ".*")


@dataclass(slots=True)
class Line:
    fid: str
    path: str
    offset: int  # byte offset of the line's first byte
    end: int  # byte offset just past its newline
    text: str
    truncated: bool = False  # longer than max_line: cut, the rest of the line dropped (and counted)


@dataclass
class TailedFile:
    fid: str
    path: str
    offset: int = 0
    head: str = ""  # sha1 of the first min(size, HEAD_BYTES) bytes, with its length
    head_len: int = 0
    skip: set[int] = field(default_factory=set)  # start offsets of lines already shipped (crash recovery)
    fh: object | None = None
    pending: bytes = b""
    dropping: bool = False  # inside an over-long line, discarding bytes until its newline
    last_activity: float = 0.0
    present: bool = True  # seen at some path in the last scan
    first_path: str = ""  # where it was first seen; a file no longer there has been rotated away

    @property
    def rotated(self) -> bool:
        return not self.present or (bool(self.first_path) and self.path != self.first_path)


HOST = socket.gethostname()


def file_id(st: os.stat_result) -> str:
    # The host name makes identities unique across shippers that share topics (inode numbers are not).
    return f"{HOST}:{st.st_dev}:{st.st_ino}"


def _head(path: str, fh=None, length: int = HEAD_BYTES) -> tuple[str, int]:
    try:
        if fh is not None:
            data = os.pread(fh.fileno(), length, 0)
        else:
            with open(path, "rb") as f:
                data = f.read(length)
    except OSError:
        return "", 0
    return hashlib.sha1(data).hexdigest(), len(data)


def discover(roots: Iterable[str], exclude: Iterable[str] = DEFAULT_EXCLUDE) -> Iterable[str]:
    """Files named by `roots`, and the files below the folders among them (hidden folders and excluded names
    skipped), in a stable order."""
    exclude = tuple(exclude)
    for root in roots:
        if os.path.isfile(root):
            yield root
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not any(fnmatch.fnmatch(name, pat) for pat in exclude):
                    yield os.path.join(dirpath, name)


@dataclass
class TailStats:
    truncated_lines: int = 0
    rotations: int = 0
    truncations: int = 0
    copies_recognised: int = 0
    deduplicated: int = 0
    read_errors: int = 0
    unfinished_flushed: int = 0


class Tailer:
    """Discovers files under `paths` (recursively, new files included) and yields their complete lines."""

    def __init__(self, paths: Iterable[str], *, max_line: int = 65536, read_chunk: int = 1 << 20,
                 exclude: Iterable[str] = DEFAULT_EXCLUDE, close_inactive: float = 5.0,
                 scan_interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.roots = [os.path.abspath(p) for p in paths]
        self.max_line = max_line
        self.read_chunk = read_chunk
        self.exclude = tuple(exclude)
        self.close_inactive = close_inactive
        self.scan_interval = scan_interval
        self.clock = clock
        self.files: dict[str, TailedFile] = {}
        self.stats = TailStats()
        self._last_scan = -1e18
        # (folder, head hash, head length) -> offset reached before a truncation, to recognise the copy
        self._truncated_heads: dict[tuple[str, str, int], int] = {}

    # ---- checkpoint interface -------------------------------------------------------------------------
    def positions(self) -> dict[str, dict]:
        """Resume points of every known file: what a checkpoint stores."""
        return {f.fid: {"path": f.path, "offset": f.offset, "head": f.head, "head_len": f.head_len}
                for f in self.files.values()}

    def restore(self, positions: dict[str, dict], shipped: dict[str, set[int]] | None = None) -> None:
        """Resume from a checkpoint; `shipped` maps fid -> start offsets of lines found on the broker past it.

        A set, not a high-water mark: after a crash the broker may hold a later request of the last batch
        and not an earlier one, so only the lines really there are skipped and the gap is shipped again."""
        shipped = shipped or {}
        for fid, pos in positions.items():
            tf = TailedFile(fid=fid, path=pos["path"], offset=int(pos["offset"]), head=pos.get("head", ""),
                            head_len=int(pos.get("head_len", 0)), present=False,
                            first_path=pos.get("first_path", pos["path"]))
            self.files[fid] = tf
        for fid, offsets in shipped.items():
            if fid not in self.files:  # first shipped in the batch that crashed: read it from the start
                self.files[fid] = TailedFile(fid=fid, path="", present=False)
            tf = self.files[fid]
            tf.skip = {o for o in offsets if o >= tf.offset}

    # ---- discovery --------------------------------------------------------------------------------------
    def _walk(self) -> Iterable[str]:
        return discover(self.roots, self.exclude)

    def scan(self) -> None:
        now = self.clock()
        self._last_scan = now
        for tf in self.files.values():
            tf.present = False
        for path in self._walk():
            try:
                st = os.stat(path)
            except OSError:
                continue
            fid = file_id(st)
            tf = self.files.get(fid)
            if tf is None:
                self._discover(fid, path, st)
                continue
            if tf.path and tf.path != path:
                self.stats.rotations += 1
                log.info("%s was renamed to %s (rotation): draining it", tf.path, path)
            if tf.head_len and tf.fh is None and st.st_size >= tf.head_len:
                head, n = _head(path, length=tf.head_len)
                if n == tf.head_len and head != tf.head:
                    log.info("%s reuses the inode of a file seen before: reading it from the start", path)
                    # same inode number, different content: the inode was reused by a new file
                    tf = self.files[fid] = TailedFile(fid=fid, path=path, first_path=path)
            tf.path, tf.present = path, True
            if not tf.first_path:
                tf.first_path = path
            if tf.fh is None and st.st_size != tf.offset:
                tf.last_activity = now  # has new data (or shrank): worth opening
        for tf in list(self.files.values()):
            if not tf.present and tf.fh is None:
                del self.files[tf.fid]  # gone and closed: nothing left to read

    def _discover(self, fid: str, path: str, st: os.stat_result) -> None:
        tf = TailedFile(fid=fid, path=path, last_activity=self.clock(), first_path=path)
        start = self._copy_origin(path, st.st_size)
        if start is not None:
            tf.offset = start
            self.stats.copies_recognised += 1
            log.info("%s is a copy of a file seen before (copytruncate): resuming at byte %d", path, start)
        else:
            log.debug("following new file %s", path)
        self.files[fid] = tf

    def _copy_origin(self, path: str, size: int) -> int | None:
        """If a file in this folder began with the same bytes, this new file is its copy (copytruncate):
        resume where that file was, so its lines are not shipped twice."""
        directory = os.path.dirname(path)
        candidates = [(h, n, off) for (d, h, n), off in self._truncated_heads.items() if d == directory]
        candidates += [(o.head, o.head_len, o.offset) for o in self.files.values()
                       if o.offset > 0 and o.path and os.path.dirname(o.path) == directory]
        for head, n, off in candidates:
            if n >= MIN_HEAD_MATCH and size >= n and _head(path, length=n) == (head, n):
                self._truncated_heads = {k: v for k, v in self._truncated_heads.items() if k[1] != head}
                return min(off, size)
        return None

    # ---- reading ----------------------------------------------------------------------------------------
    def poll(self, max_lines: int = 10000) -> list[Line]:
        now = self.clock()
        if now - self._last_scan >= self.scan_interval:
            self.scan()
        out: list[Line] = []
        files = list(self.files.values())
        # Round-robin in slices: on a backlog, every file advances together (cross-rank detectors see the
        # ranks of a job side by side, as they would live) instead of one file shipping whole before the next.
        share = max(256, max_lines // max(1, len(files)))
        while len(out) < max_lines:
            before = len(out)
            for tf in files:
                if len(out) >= max_lines:
                    break
                self._read(tf, out, min(max_lines, len(out) + share), now)
            if len(out) == before:
                break
        return out

    def _open(self, tf: TailedFile) -> bool:
        if tf.fh is not None:
            return True
        if not tf.present:
            return False
        try:
            fh = open(tf.path, "rb")
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):  # retried at the next poll, but say why it lags
                self.stats.read_errors += 1
                log.warning("%s: cannot open it now (%s): raise `ulimit -n` or lower close_inactive", tf.path, exc)
            return False
        if file_id(os.fstat(fh.fileno())) != tf.fid:
            fh.close()  # the name now points at another file; the scan will sort it out
            return False
        tf.fh = fh
        return True

    def _read(self, tf: TailedFile, out: list[Line], max_lines: int, now: float) -> None:
        if tf.fh is None and now - tf.last_activity > self.close_inactive:
            return  # idle and closed; the scan re-arms it when its size changes
        if not self._open(tf):
            return
        fd = tf.fh.fileno()
        try:
            size = os.fstat(fd).st_size
        except OSError:
            self.stats.read_errors += 1
            return
        read_pos = tf.offset + len(tf.pending)
        if size < tf.offset:
            self._truncated(tf, size)
            read_pos = 0
        if not tf.head_len or (tf.head_len < HEAD_BYTES and size > tf.head_len):
            tf.head, tf.head_len = _head(tf.path, tf.fh)
        got_any = False
        while len(out) < max_lines and read_pos < size:
            try:
                chunk = os.pread(fd, min(self.read_chunk, size - read_pos), read_pos)
            except OSError:
                self.stats.read_errors += 1
                break
            if not chunk:
                break
            got_any = True
            read_pos += len(chunk)
            self.split_lines(tf, chunk, out)
        if got_any:
            tf.last_activity = now
        elif now - tf.last_activity > self.close_inactive:
            if tf.pending and tf.rotated:
                self._flush_unfinished(tf, out)  # rotated away and quiet: its last line will never end
            tf.fh.close()
            tf.fh = None

    def _truncated(self, tf: TailedFile, size: int) -> None:
        self.stats.truncations += 1
        log.info("%s shrank from %d to %d bytes (truncated): reading it again from the start", tf.path,
                 tf.offset, size)
        if tf.head_len >= MIN_HEAD_MATCH:
            self._truncated_heads[(os.path.dirname(tf.path), tf.head, tf.head_len)] = tf.offset
        # Bytes written after our last read and before the truncation are lost unless a copy shows up.
        tf.offset, tf.pending, tf.dropping = 0, b"", False
        tf.skip = set()
        tf.head, tf.head_len = "", 0

    def split_lines(self, tf: TailedFile, chunk: bytes, out: list[Line]) -> None:
        """The complete lines of `chunk` (read at `tf.offset`) appended to `out` by the tailer's line rules: the
        partial tail held in `tf.pending`, over-long lines cut, invalid UTF-8 replaced. Also for bytes that do not
        come from a tailed file (a compressed part read at rest, producers/at_rest.py)."""
        data = tf.pending + chunk if tf.pending else chunk
        start = 0
        base = tf.offset  # file offset of data[0]
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            line_start = base + start
            if tf.dropping:
                tf.dropping = False  # the end of an over-long line we already emitted
            else:
                self._emit(tf, data[start:nl], line_start, base + nl + 1, out, truncated=False)
            start = nl + 1
        tf.offset = base + start
        rest = data[start:]
        if tf.dropping:
            tf.offset += len(rest)  # still discarding an over-long line: nothing to keep
            rest = b""
        elif len(rest) > self.max_line:
            self._emit(tf, rest[: self.max_line], tf.offset, tf.offset + len(rest), out, truncated=True)
            tf.offset += len(rest)
            tf.dropping = True
            rest = b""
        tf.pending = rest

    def _emit(self, tf: TailedFile, raw: bytes, start: int, end: int, out: list[Line], truncated: bool) -> None:
        if tf.skip and start in tf.skip:
            tf.skip.discard(start)
            self.stats.deduplicated += 1
            return
        if len(raw) > self.max_line:
            raw, truncated = raw[: self.max_line], True
        if truncated:
            self.stats.truncated_lines += 1
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        out.append(Line(tf.fid, tf.path, start, end, raw.decode("utf-8", "replace"), truncated))

    def _flush_unfinished(self, tf: TailedFile, out: list[Line]) -> None:
        self.stats.unfinished_flushed += 1
        self._emit(tf, tf.pending, tf.offset, tf.offset + len(tf.pending), out, truncated=False)
        tf.offset += len(tf.pending)
        tf.pending = b""

    def lag_bytes(self) -> int:
        total = 0
        for tf in self.files.values():
            try:
                total += max(0, os.stat(tf.path).st_size - tf.offset) if tf.path else 0
            except OSError:
                pass
        return total

    def close(self) -> None:
        for tf in self.files.values():
            if tf.fh is not None:
                tf.fh.close()
                tf.fh = None
