from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwatch.parsing import (
    ContextResolver,
    ParseError,
    SourceContext,
    parse_iso,
    parse_line,
    rank_from_path,
)

NCCL = ("host:615:18953 [2] NCCL INFO AllReduce: opCount 139d sendbuff 0x78d056200000 recvbuff 0x78d056200000 "
        "count 7382228 datatype 7 op 0 root 0 comm 0x78cfda045840 [nranks=128] stream 0x78d07125e5e0")


def ctx(rank=None):
    return SourceContext(path="/logs/j/x.log", job="j", rank=rank)


def test_nccl_line_is_a_collective_op_with_hex_opcount():
    rec = parse_line(NCCL, ctx(rank=4), 10, 99.0)
    assert rec.kind == "op"
    assert rec.data["op"] == "AllReduce" and rec.data["op_count"] == 0x139D
    assert rec.data["nranks"] == 128 and rec.data["stream"] == "0x78d07125e5e0"
    assert rec.data["comm"] == "0x78cfda045840" and rec.data["count"] == 7382228 and rec.data["redop"] == 0
    assert rec.data["host"] == "host" and rec.data["device"] == 2
    assert rec.key() == "j/4/0x78d07125e5e0"
    assert rec.offset == 10 and rec.ts == 99.0


def test_send_recv_and_torchrun_prefix():
    line = "[rank7]: h:1:2 [0] NCCL INFO Send: opCount a sendbuff 0x1 recvbuff 0x0 count 5 datatype 0 op 0 root 3 comm 0x9 [nranks=8] stream 0x5"
    rec = parse_line(line, ctx(rank=1))
    assert rec.kind == "op" and rec.rank == 7 and rec.data["op"] == "Send" and rec.data["op_count"] == 10


@pytest.mark.parametrize(("text", "expected"), [
    ("2024-01-02T03:04:05Z", 1704164645.0),
    ("2024-01-02 03:04:05", 1704164645.0),
    ("2024-01-02T03:04:05.250Z", 1704164645.25),
    ("2024-01-02 03:04:05,5", 1704164645.5),
    ("2024-01-02T04:04:05+01:00", 1704164645.0),
    ("2024-01-02T01:04:05-0200", 1704164645.0),
    ("[2024-01-02T03:04:05.000001Z]", 1704164645.000001),
])
def test_iso_timestamps(text, expected):
    assert parse_iso(text) == pytest.approx(expected, abs=1e-6)
    rec = parse_line(f"{text} hello", ctx(), 0, 1.0)
    assert rec.ts == pytest.approx(expected, abs=1e-6) and rec.data["msg"] == "hello"


@pytest.mark.parametrize(("text", "expected"), [
    ("05/25/2023 13:07:43", 1685020063.0),  # transformers' examples: month first
    ("25/05/2023 13:07:43", 1685020063.0),  # day first where the first number cannot be a month
    ("2023/05/25 13:07:43", 1685020063.0),
    ("2023/05/25 13:07:43,250", 1685020063.25),
])
def test_slashed_dates(text, expected):
    rec = parse_line(f"{text} - INFO - __main__ - hello", ctx(), 0, 1.0)
    assert rec.ts == pytest.approx(expected) and rec.data["msg"] == "- INFO - __main__ - hello"


def test_mmengine_time_without_a_year_takes_the_files_year():
    c = ctx()
    parse_line("2024-06-13T19:00:00Z start", c, 0, 1.0)
    rec = parse_line("06/13 19:41:35 - mmengine - INFO - Saving checkpoint at 100 iterations", c, 0, 1.0)
    assert rec.ts == 1718307695.0 and rec.data["msg"].startswith("- mmengine - INFO")  # 2024-06-13 19:41:35


def test_impossible_slashed_date_stays_in_the_message():
    rec = parse_line("13/13/2023 13:07:43 hello", ctx(), 0, 7.0)
    assert rec.ts == 7.0 and rec.data["msg"].startswith("13/13/2023")


def test_line_without_time_takes_previous_time_of_file_else_arrival():
    c = ctx()
    assert parse_line("no time here", c, 0, 50.0).ts == 50.0
    parse_line("2024-01-02T03:04:05Z first", c, 0, 60.0)
    assert parse_line("later line", c, 0, 70.0).ts == 1704164645.0


def test_json_metrics_rank_precedence_and_ts_forms():
    c = ctx(rank=2)
    rec = parse_line('[rank3]: {"rank": 5, "step": 10, "loss": 1.5, "ts": 100.5}', c)
    assert rec.kind == "metrics" and rec.rank == 5 and rec.ts == 100.5
    assert rec.data == {"step": 10, "loss": 1.5}
    rec = parse_line('[default3]: {"step": 11, "grad_norm": 2, "timestamp": "2024-01-02T03:04:05Z"}', c)
    assert rec.rank == 3 and rec.ts == 1704164645.0 and rec.key() == "j/3"
    assert parse_line('{"step": 12, "throughput": 3}', c).rank == 2


def test_nan_and_infinity_from_python_json_dumps_are_kept():
    rec = parse_line('{"step": 3, "loss": NaN, "grad_norm": Infinity}', ctx())
    assert math.isnan(rec.data["loss"]) and math.isinf(rec.data["grad_norm"])
    rec = parse_line('{"step": 3, "loss": "nan"}', ctx())
    assert math.isnan(rec.data["loss"])


def test_gpu_sample_and_collective_json():
    rec = parse_line('{"ts": 5, "host": "n1", "gpu": 3, "mem_used_bytes": 10, "mem_total_bytes": 80, "util_pct": 90}',
                     ctx(rank=1))
    assert rec.kind == "gpu" and rec.key() == "j/n1/3" and rec.data["util_pct"] == 90.0
    rec = parse_line('{"ts": 5, "rank": 2, "stream": "s1", "op": "AllGather", "opCount": 7, "duration_s": 0.01}', ctx())
    assert rec.kind == "op" and rec.data["op_count"] == 7 and rec.key() == "j/2/s1"
    assert parse_line('{"ts": 5, "rank": 2, "op": "X", "opCount": "1f"}', ctx()).data["op_count"] == 31


@pytest.mark.parametrize("line", [
    '{"loss": 1.0}',  # metrics without step
    '{"step": "x", "loss": 1.0}',
    '{"step": 1, "loss": "high"}',
    '{"step": 1, "loss": true}',
    '{"rank": "zero", "step": 1, "loss": 1}',
    '{"ts": 1, "op": "AllReduce", "opCount": "zz"}',
    '{"ts": 1, "host": "h", "gpu": 0, "mem_used_bytes": "lots", "mem_total_bytes": 1}',
    '{"unterminated": ',
    '{not json at all}',
    "{'a dict': 'repr with no metrics'}",
    '[1, 2]',
])
def test_broken_structured_lines_raise_parse_error(line):
    if not line.startswith('{"') or not line.endswith("}"):
        # not JSON and no recognised repr: a plain log message, not a dead letter (issue 6)
        assert parse_line(line, ctx()).kind == "log"
    else:
        with pytest.raises(ParseError):
            parse_line(line, ctx())


def test_other_json_and_text_are_log_messages():
    rec = parse_line('{"event": "started", "pid": 5}', ctx(rank=0))
    assert rec.kind == "log" and rec.data["raw"] == '{"event": "started", "pid": 5}'
    rec = parse_line("[rank1]: 2024-01-01 00:00:00 INFO something happened", ctx())
    assert rec.kind == "log" and rec.rank == 1 and rec.data["msg"] == "INFO something happened"
    assert rec.data["raw"].startswith("[rank1]:")


def test_srun_label_gives_the_rank_only_where_nothing_else_does():
    # srun --label pads task numbers to the widest; torchrun's prefix after it, the path or a rank in the line
    # name the rank (one launcher per node: the label is then the node's task), and NCCL lines never take it
    line = "0: [titan] 2025-09-27 15:13:09,187 - root - INFO - step: 10  loss:  7.20467  grad_norm:  1.2"
    rec = parse_line(line, ctx())
    assert rec.kind == "metrics" and rec.rank == 0 and rec.data["loss"] == 7.20467
    assert parse_line(" 3: [rank5]: 2024-01-01 00:00:00 INFO hello", ctx()).rank == 5
    rec = parse_line("12:31:45 training resumed", ctx())  # a time, not a label
    assert rec.rank is None and rec.data["msg"] == "12:31:45 training resumed"
    rec = parse_line("10: W0409 07:28:49.530000 1359 torch/distributed/elastic/agent/server/api.py:719] "
                     "Received 15 death signal, shutting down workers", ctx())
    assert rec.rank == 10 and rec.data["event"] == "job_stop"
    ds = "2: [2024-01-01 00:00:00,000] [INFO] [logging.py:96:log_dist] [Rank 5] step=7, skipped=0, lr=[1e-4]"
    assert parse_line(ds, ctx()).rank == 5
    path_ctx = SourceContext(path="/logs/j/rank3/x.log", job="j", rank=3, rank_from_path=True)
    assert parse_line(ds, path_ctx).rank == 3
    assert parse_line("2: plain message", path_ctx).rank == 3
    assert parse_line("2: plain message", ctx()).rank == 2
    coll = ("1: node-3:278:278 [0] NCCL INFO Broadcast: opCount 1608 sendbuff 0x3 recvbuff 0x3 count 1 datatype 4 "
            "op 0 root 0 comm 0x555e2c6387e0 [nranks=4] stream 0x555e2b3a4370")
    rec = parse_line(coll, ctx())
    assert rec.kind == "op" and rec.rank is None


def test_rank_from_path_and_job_resolution(tmp_path):
    assert rank_from_path("/logs/job/rank_12/stdout.log") == 12
    assert rank_from_path("/logs/job/worker-rank3.log") == 3
    assert rank_from_path("/home/frank2/logs/out.log") is None  # "frank2" is not a rank
    assert rank_from_path("/data/rank9/job/rank-4.log", "/data/rank9") == 4
    # torchrun --log-dir: <dir>/<run id>_<random>/attempt_<restart>/<local rank>/stdout.log
    assert rank_from_path("/logs/job/node1/llama_x7q1/attempt_0/3/stdout.log", "/logs/job") == 3
    assert rank_from_path("/logs/job/attempt_2/0/stderr.log", "/logs/job") == 0
    assert rank_from_path("/logs/job/3/stdout.log", "/logs/job") is None  # a bare number is not a rank
    (tmp_path / "myjob" / "rank5").mkdir(parents=True)
    f = tmp_path / "myjob" / "rank5" / "a.log"
    f.write_text("x\n")
    r = ContextResolver([str(tmp_path / "myjob")], rank=1)
    c = r.context("fid", str(f))
    assert c.job == "myjob" and c.rank == 5
    r2 = ContextResolver([str(f)], job="explicit")
    assert r2.context("fid2", str(f)).job == "explicit"


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_any_text_parses_or_raises_parse_error_only(text):
    line = text.replace("\n", " ")
    try:
        rec = parse_line(line, ctx(), 0, 1.0)
    except ParseError:
        return
    assert rec.kind in ("log", "metrics", "op", "gpu")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["ts", "step", "loss", "grad_norm", "rank", "op", "opCount", "host", "gpu",
                                        "mem_used_bytes", "mem_total_bytes", "timestamp", "stream"]),
                       st.one_of(st.integers(-5, 10**12), st.floats(allow_nan=True), st.text(max_size=8),
                                 st.booleans(), st.none()), max_size=8))
def test_json_fuzz_never_crashes(obj):
    import json

    try:
        rec = parse_line(json.dumps(obj), ctx(), 0, 1.0)
    except ParseError:
        return
    assert rec.kind in ("log", "metrics", "op", "gpu")


@pytest.mark.parametrize("line", ['{"step": Infinity, "loss": 1}', '{"step": NaN, "loss": 1}',
                                  '{"ts": 1, "host": "h", "gpu": Infinity, "mem_used_bytes": 1, "mem_total_bytes": 2}'])
def test_nonfinite_integers_are_parse_errors_not_crashes(line):
    # found by the fuzz test above
    with pytest.raises(ParseError):
        parse_line(line, ctx())


@pytest.mark.parametrize(("line", "path"), [
    ("[rank2]: 2026-01-01T00:00:00Z INFO Saving checkpoint to /ckpt/run/checkpoint-100", "/ckpt/run/checkpoint-100"),
    ("Saved checkpoint: 's3://b/run/step_2000'", "s3://b/run/step_2000"),
    ("checkpoint saved to /data/ckpt-7.pt, took 3s", "/data/ckpt-7.pt"),
])
def test_checkpoint_announcements_travel_with_the_metrics(line, path):
    rec = parse_line(line, ctx(rank=2))
    assert rec.kind == "log" and rec.data["checkpoint"] == path and rec.family() == "metrics"
    assert parse_line("loading checkpoint shards", ctx()).family() == "log"


def _loss_lines(level: float, seed: int, titan: bool) -> str:
    rng = random.Random(seed)
    out = []
    for step in range(1, 201):
        loss = level * (1 + 0.01 * rng.gauss(0, 1))
        t = f"2025-05-01 08:{step // 60:02d}:{step % 60:02d},000"
        out.append(f"[titan] {t} - root - INFO - step: {step}  loss: {loss:.5f}  grad_norm:  1.0000" if titan
                   else f'{{"ts": "2025-05-01T08:{step // 60:02d}:{step % 60:02d}Z", "step": {step}, '
                        f'"loss": {loss:.5f}}}')
    return "\n".join(out) + "\n"


def test_ranks_the_path_cannot_tell_apart_stay_separate_series(tmp_path):
    """Two nodes' torchrun --log-dir folders (local ranks 0 and 1 each) and two files without any rank: each
    file is its own smooth series at its own level. Merged into one series per rank (as before), every step
    would alternate between levels and look like a jump."""
    from rankwatch.processors.offline import analyze

    job = tmp_path / "job"
    for node, level in (("node0/run_a1", 2.0), ("node1/run_b2", 6.0)):
        for local in (0, 1):
            d = job / node / "attempt_0" / str(local)
            d.mkdir(parents=True)
            (d / "stdout.log").write_text(_loss_lines(level + local, local, titan=True))
    other = tmp_path / "norank"
    other.mkdir()
    (other / "a.log").write_text(_loss_lines(2.0, 7, titan=False))
    (other / "b.log").write_text(_loss_lines(9.0, 8, titan=False))
    found = analyze([str(job), str(other)])
    assert [a for a in found if a.signal in ("loss", "grad_norm")] == []
    # the series are judged: a spike in one of them is found, on its rank
    spiked = _loss_lines(2.0, 7, titan=False).replace('"step": 150, "loss": ', '"step": 150, "loss": 1')
    (other / "a.log").write_text(spiked)
    found = [a for a in analyze([str(other)]) if a.signal == "loss"]
    assert [a.context.get("step") for a in found] == [150] and found[0].rank is None
