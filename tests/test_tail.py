from __future__ import annotations

import os

from rankwatch.producers.tail import Tailer


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def drain(t: Tailer, clock: Clock | None = None, rounds: int = 3) -> list[str]:
    out = []
    for _ in range(rounds):
        if clock is not None:
            clock.t += 10.0  # force a rescan and the close-inactive logic
        out += [ln.text for ln in t.poll()]
    return out


def make(paths, **kw):
    clock = Clock()
    return Tailer([str(p) for p in paths], clock=clock, scan_interval=0.0, **kw), clock


def test_existing_content_then_follow_and_partial_line(job_dir):
    f = job_dir / "a.log"
    f.write_text("one\ntwo\nthr")
    t, clock = make([job_dir])
    assert drain(t) == ["one", "two"]
    with open(f, "a") as fh:
        fh.write("ee\nfour")
    assert drain(t) == ["three"]  # "four" has no newline yet
    with open(f, "a") as fh:
        fh.write("\n")
    lines = t.poll()
    assert [ln.text for ln in lines] == ["four"]
    assert lines[0].offset == len("one\ntwo\nthree\n") and lines[0].end == lines[0].offset + 5


def test_new_files_in_new_subfolders_are_picked_up(job_dir):
    t, clock = make([job_dir])
    assert drain(t) == []
    (job_dir / "rank3").mkdir()
    (job_dir / "rank3" / "x.log").write_text("hello\n")
    (job_dir / "skip.gz").write_bytes(b"\x1f\x8b binary\n")
    (job_dir / ".hidden").write_text("no\n")
    assert drain(t) == ["hello"]


def test_rename_rotation_loses_nothing_and_duplicates_nothing(job_dir):
    f = job_dir / "train.log"
    f.write_text("a1\na2\n")
    t, clock = make([job_dir])
    assert drain(t) == ["a1", "a2"]
    with open(f, "a") as fh:
        fh.write("a3\n")  # written but not yet read when the rotation happens
    os.rename(f, job_dir / "train.log.1")
    f.write_text("b1\n")
    with open(job_dir / "train.log.1", "a") as fh:
        fh.write("a4\n")  # a writer still holding the old file
    got = drain(t, clock)
    assert sorted(got) == ["a3", "a4", "b1"]
    assert t.stats.rotations >= 1


def test_copytruncate_keeps_lines_written_before_truncation(job_dir):
    f = job_dir / "train.log"
    header = "x" * 100  # enough bytes to recognise the copy
    f.write_text(f"{header}\nl1\n")
    t, clock = make([job_dir])
    assert drain(t) == [header, "l1"]
    with open(f, "a") as fh:
        fh.write("l2\n")  # lands in the copy only
    (job_dir / "train.log.1").write_bytes(f.read_bytes())  # copy ...
    with open(f, "r+") as fh:  # ... then truncate, and the writer continues
        fh.truncate(0)
    with open(f, "a") as fh:
        fh.write("n1\n")
    got = drain(t, clock)
    assert sorted(got) == ["l2", "n1"]
    assert t.stats.truncations == 1 and t.stats.copies_recognised == 1


def test_truncation_without_copy_restarts_at_zero(job_dir):
    f = job_dir / "a.log"
    f.write_text("old1\nold2\n")
    t, clock = make([job_dir])
    drain(t)
    f.write_text("new\n")  # shorter than before: truncated and rewritten
    assert drain(t) == ["new"]


def test_long_lines_are_truncated_and_counted_invalid_utf8_replaced(job_dir):
    f = job_dir / "a.log"
    with open(f, "wb") as fh:
        fh.write(b"short\n" + b"y" * 5000 + b"\n" + b"bad \xff\xfe bytes\r\n" + b"z" * 3000)
    t, clock = make([job_dir], max_line=1000, read_chunk=700)
    got = drain(t)
    assert got[0] == "short" and got[1] == "y" * 1000
    assert got[2] == "bad \ufffd\ufffd bytes"
    assert got[3] == "z" * 1000  # unterminated but over the limit: emitted cut
    with open(f, "ab") as fh:
        fh.write(b"zz\nafter\n")
    assert drain(t) == ["after"]  # the rest of the long line is dropped, the next line is intact
    assert t.stats.truncated_lines == 2


def test_restore_resumes_and_skips_lines_already_shipped(job_dir):
    f = job_dir / "a.log"
    f.write_text("l0\nl1\nl2\nl3\n")
    t, _ = make([job_dir])
    lines = t.poll()
    pos = {lines[1].fid: {"path": str(f), "offset": lines[1].end}}  # checkpoint after l1
    t2, _ = make([job_dir])
    # l3 reached the broker before the crash, l2 did not (a later request can land while an earlier is lost)
    t2.restore(pos, shipped={lines[1].fid: {lines[3].offset}})
    assert [ln.text for ln in t2.poll()] == ["l2"]
    assert t2.stats.deduplicated == 1


def test_rotated_file_with_unterminated_last_line_is_flushed_when_quiet(job_dir):
    f = job_dir / "a.log"
    f.write_text("done\nlast words")
    t, clock = make([job_dir], close_inactive=5.0)
    assert drain(t) == ["done"]
    os.rename(f, job_dir / "a.log.1")
    f.write_text("")
    got = drain(t, clock, rounds=4)
    assert got == ["last words"] and t.stats.unfinished_flushed == 1
