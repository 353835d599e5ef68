"""Files at rest, read whole (`rankwatch analyze`, `rankwatch inspect`): rotated logs included.

The live shipper leaves compressed files alone (logrotate compresses a file it has already drained). After the
fact they are the job's history: `train.log.2.gz` holds the hours before `train.log.1` and `train.log`. gzip,
bzip2 and xz are read through Python's own decompressors, with the tailer's line rules (complete lines only,
64 KiB cut, invalid UTF-8 replaced); archives (`.zip`, `.tar*`, `.tgz`) and zstd are skipped and counted, never
read as text.
"""

from __future__ import annotations

import bz2
import errno
import fnmatch
import gzip
import logging
import lzma
import os
import resource
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator

from rankwatch.producers.tail import Line, TailedFile, Tailer, discover, file_id

log = logging.getLogger(__name__)
DECOMPRESSORS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
SKIPPED = ("*.zip", "*.tar", "*.tar.*", "*.tgz", "*.zst")
_CHUNK = 1 << 16  # read1: as much as one step decompresses, so damage costs only what follows it


def _plain_lines(path: str, batch: int, problems: Counter | None) -> Iterator[list[Line]]:
    """An uncompressed file's complete lines in batches, the file open only while a batch is read: `analyze`
    merges every rank's file at once, and 4,096 files held open exceed the usual limit of 1,024 descriptors (the
    files past it were left out, unsaid). A final line without its newline is not complete, as in the tailer."""
    splitter = Tailer([])  # its line rules only: no roots, nothing scanned
    tf: TailedFile | None = None
    pos = 0
    while True:
        out: list[Line] = []
        eof = False
        try:
            with open(path, "rb") as fh:
                if tf is None:
                    tf = TailedFile(fid=file_id(os.fstat(fh.fileno())), path=path)
                fh.seek(pos)
                while len(out) < batch:
                    chunk = fh.read(_CHUNK)
                    if not chunk:
                        eof = True
                        break
                    pos += len(chunk)
                    splitter.split_lines(tf, chunk, out)
        except OSError as exc:
            _unreadable(path, pos, exc, problems)
            eof = True
        if out:
            yield out
        if eof:
            return


def _unreadable(path: str, pos: int, exc: OSError, problems: Counter | None) -> None:
    hint = " (raise `ulimit -n`)" if exc.errno in (errno.EMFILE, errno.ENFILE) else ""
    log.warning("%s: cannot read %s byte %d: %s%s", path, "past" if pos else "from", pos, exc, hint)
    if problems is not None:
        problems[f"unreadable ({exc.strerror or type(exc).__name__})"] += 1


def allow_open_files(files: Iterable[str]) -> None:
    """Raise this process's soft limit on open files toward its hard limit where `files` are merged at once: their
    compressed parts stay open (the usual soft limit is 1,024, the hard one often far higher)."""
    n = sum(1 for f in files if os.path.splitext(f)[1].lower() in DECOMPRESSORS)
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = n + 256  # the rest of the process: sockets, the broker client, plots
        if soft == resource.RLIM_INFINITY or soft >= want:
            return
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open files limit to %d: %s", n + 256, exc)


def discover_at_rest(paths: Iterable[str], skipped: Counter | None = None) -> list[str]:
    """Every file under `paths` (hidden ones left out), in a stable order; archives and zstd files are counted
    in `skipped` by their pattern, with a warning, instead."""
    files = []
    for path in discover([os.path.abspath(p) for p in paths], exclude=(".*",)):
        name = os.path.basename(path)
        pattern = next((p for p in SKIPPED if fnmatch.fnmatch(name, p)), None)
        if pattern is None:
            files.append(os.path.abspath(path))
            continue
        log.warning("%s: not read (%s: an archive or zstd, no decompressor here)", path, pattern)
        if skipped is not None:
            skipped[f"{pattern} not read"] += 1
    return files


def file_lines(path: str, batch: int = 20_000, problems: Counter | None = None) -> Iterator[list[Line]]:
    """The file's complete lines in batches; compressed files decompressed as they are read. A compressed file
    cut short gives its lines up to the cut; one damaged inside stops where its decompressor notices (gzip may
    first yield some damaged text, then fails its checksum at the end of the member): either way one count in
    `problems` and a warning, never an exception."""
    opener = DECOMPRESSORS.get(os.path.splitext(path)[1].lower())
    if opener is None:
        yield from _plain_lines(path, batch, problems)
        return
    splitter = Tailer([])  # its line rules only: no roots, nothing scanned
    tf = TailedFile(fid=f"{os.path.splitext(path)[1][1:]}:{path}", path=path)
    try:
        fh = opener(path, "rb")  # held open while merged: its decompressor's state cannot be set aside
    except OSError as exc:
        _unreadable(path, 0, exc, problems)
        return
    try:
        with fh:
            while chunk := fh.read1(_CHUNK):
                out: list[Line] = []
                splitter.split_lines(tf, chunk, out)
                if out:
                    yield out
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        log.warning("%s: cannot decompress past byte %d of its content: %s", path, tf.offset, exc)
        if problems is not None:
            problems[f"corrupt {os.path.splitext(path)[1]}"] += 1
