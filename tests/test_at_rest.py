"""Files at rest (`analyze`, `inspect`): logrotate's compressed and numbered parts are read as the job's history."""

from __future__ import annotations

import bz2
import gzip
import json
import random
import zipfile

from rankwatch.processors.offline import AnalyzeStats, analyze

from rankwatch.inspect_logs import inspect_paths


def _lines(first: int, last: int, spike: int | None, rng: random.Random) -> bytes:
    out = []
    for step in range(first, last):
        loss = 8.0 if step == spike else 2.0 + rng.gauss(0, 0.02)
        out.append(json.dumps({"ts": 1_700_000_000 + step, "step": step, "loss": round(loss, 4)}))
    return ("\n".join(out) + "\n").encode()


def _rotated(folder, rng: random.Random, spike: int) -> None:
    """train.log.2.gz (steps 0-199, the spike), train.log.1.bz2 (200-399), train.log (400-599)."""
    folder.mkdir(parents=True)
    (folder / "train.log.2.gz").write_bytes(gzip.compress(_lines(0, 200, spike, rng)))
    (folder / "train.log.1.bz2").write_bytes(bz2.compress(_lines(200, 400, None, rng)))
    (folder / "train.log").write_bytes(_lines(400, 600, None, rng))


def test_rotated_compressed_parts_are_read_in_time_order_as_one_series(tmp_path):
    rng = random.Random(3)
    _rotated(tmp_path / "job" / "rank0", rng, spike=150)  # the rank from the folder
    _rotated(tmp_path / "job" / "node", rng, spike=120)  # no rank: the series is the file, rotations included
    with zipfile.ZipFile(tmp_path / "job" / "old-logs.zip", "w") as z:
        z.writestr("train.log", _lines(0, 10, None, rng))
    stats = AnalyzeStats()
    found = analyze([str(tmp_path / "job")], stats=stats)
    assert stats.records["metrics"] == 1200  # every line of every part, none of the zip's
    assert stats.files_skipped == {"*.zip not read": 1}
    loss = sorted((a.context["step"], a.rank) for a in found if a.signal == "loss")
    # one finding each, at the spikes: the parts of a file are one series (split by part, the third part's start
    # would be judged without history, and the rank-less file's parts would be three series)
    assert loss == [(120, None), (150, 0)], loss


def test_a_corrupt_compressed_part_gives_its_lines_before_the_damage_and_is_counted(tmp_path):
    data = gzip.compress(_lines(0, 5000, None, random.Random(1)))
    (tmp_path / "rank0.log.1.gz").write_bytes(data[: len(data) // 2])  # cut short, as by a full disk
    stats = AnalyzeStats()
    analyze([str(tmp_path)], stats=stats)
    assert 1000 < stats.records["metrics"] < 5000 and stats.parse_errors == {}
    assert stats.files_skipped == {"corrupt .gz": 1}
    # named on the command line, a compressed file is decompressed too (it used to be read as bytes)
    report = inspect_paths([str(tmp_path / "rank0.log.1.gz")])
    assert report.files[0].kinds["metrics"] == stats.records["metrics"] and not report.malformed
    assert report.files_skipped == {"corrupt .gz": 1}


def test_rotated_names_map_to_their_live_file_and_nothing_else_does():
    from rankwatch.parsing import rotation_base

    for rotated in ("train.log.1", "train.log.2.gz", "train.log-20240601.gz", "train.log.3.xz"):
        assert rotation_base(f"/logs/{rotated}") == "/logs/train.log"
    for distinct in ("node.0", "node.1", "rank3.log", "train-2.log", "metrics.jsonl"):
        assert rotation_base(f"/logs/{distinct}") == f"/logs/{distinct}"


def test_a_compressed_part_damaged_inside_never_stops_the_analysis(tmp_path):
    data = bytearray(gzip.compress(_lines(0, 5000, None, random.Random(2))))
    for i, at in enumerate((len(data) // 3, len(data) // 2, 2 * len(data) // 3)):
        broken = bytearray(data)
        broken[at:at + 64] = bytes(64)  # zeroed inside the deflate stream: a checksum failure (an OSError)
        (tmp_path / f"rank{i}.log.1.gz").write_bytes(bytes(broken))
    # one byte changed so that a back-reference points before the window: zlib.error, which is no OSError
    rng = random.Random(1)
    text = "".join(json.dumps({"ts": 1_700_000_000 + s, "step": s, "loss": 2 + rng.random()}) + "\n"
                   for s in range(5000))
    data = bytearray(gzip.compress(text.encode(), mtime=0))
    data[1629] = 240
    (tmp_path / "rank3.log.1.gz").write_bytes(bytes(data))
    stats = AnalyzeStats()
    analyze([str(tmp_path)], stats=stats)
    assert stats.files_skipped == {"corrupt .gz": 4} and stats.records["metrics"] > 0


_COUNT = """
import json, sys
from rankwatch.processors.offline import AnalyzeStats, analyze
stats = AnalyzeStats()
analyze([sys.argv[1]], stats=stats)
print(json.dumps({"metrics": stats.records["metrics"], "skipped": dict(stats.files_skipped)}))
"""


def _analyze_limited(root, soft: int, hard: int) -> dict:
    """`analyze` in a process whose open-files limit is (soft, hard), as a login shell's `ulimit -n` sets it."""
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = subprocess.run([sys.executable, "-c", _COUNT, str(root)], preexec_fn=limit, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_more_rank_files_than_open_file_descriptors_are_all_read(tmp_path):
    # a 4,096-rank job's post-mortem under the usual `ulimit -n` of 1,024, scaled down: 600 plain files and 300
    # gzip parts against a limit of 256. Plain files are open only while a batch is read; compressed parts stay
    # open while merged, so the soft limit is raised toward the hard one, and what still cannot be opened is
    # counted, never dropped unsaid (the files past the limit were silently left out)
    rng = random.Random(1)
    for r in range(600):
        (tmp_path / f"rank{r}.log").write_bytes(_lines(0, 5, None, rng))
    for r in range(300):
        (tmp_path / f"rank{r}.log.1.gz").write_bytes(gzip.compress(_lines(0, 5, None, rng)))
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= 1024:
        assert _analyze_limited(tmp_path, 256, 1024) == {"metrics": 4500, "skipped": {}}
    got = _analyze_limited(tmp_path, 256, 256)  # no room to raise it: the gzip parts past it are counted
    assert got["metrics"] + 5 * got["skipped"].get("unreadable (Too many open files)", 0) == 4500, got
    assert 0 < got["skipped"]["unreadable (Too many open files)"] < 300, got



def test_a_finding_has_the_same_id_read_live_or_from_the_rotated_file(tmp_path):
    # live, the shipper read the line from train.log; after logrotate renamed (and compressed) it, analyze
    # reads it from train.log.1 or train.log.2.gz: same offset, same event time. A consumer that de-duplicates
    # by id must see one finding, not two (a blind live test found two ids for one finding)
    folder = tmp_path / "job" / "rank0"
    folder.mkdir(parents=True)
    data = _lines(0, 200, 150, random.Random(7))
    (folder / "train.log").write_bytes(data)
    live = [x for x in analyze([str(tmp_path / "job")]) if x.detector == "mad"]
    (folder / "train.log").rename(folder / "train.log.1")
    renamed = [x for x in analyze([str(tmp_path / "job")]) if x.detector == "mad"]
    (folder / "train.log.1").unlink()
    (folder / "train.log.2.gz").write_bytes(gzip.compress(data))
    compressed = [x for x in analyze([str(tmp_path / "job")]) if x.detector == "mad"]
    assert live and [x.source_file.rsplit("/", 1)[1] for x in renamed + compressed] == ["train.log.1"] * len(
        renamed) + ["train.log.2.gz"] * len(compressed)
    assert [x.id for x in live] == [x.id for x in renamed] == [x.id for x in compressed]
