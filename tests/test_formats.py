"""Built-in line formats: behaviours the real-line corpus cannot show alone, and property-based tests that throw
random numbers (exponents, nan/inf), spacing and ANSI colour codes at every format: no crash, no wrong field."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rankwatch.formats.pyrepr import ReprError, parse_dict
from rankwatch.parsing import ContextResolver, ParseError, SourceContext, parse_line


def ctx(path="/logs/j/train.log", rank=None, from_path=False):
    return SourceContext(path=path, job="j", rank=rank, rank_from_path=from_path)


def fields(rec):
    return {k: v for k, v in rec.data.items() if k not in ("msg", "raw")}


# ---- behaviours -----------------------------------------------------------------------------------------------
INIT = ("node1:4100:4200 [3] NCCL INFO ncclCommInitRank comm 0x55d3aa000000 rank 3 nranks 8 cudaDev 3 nvmlDev 3 "
        "busId 4f000 commId 0x9ad9b5e4ab2566da - Init COMPLETE")
COLL = ("node1:4100:4200 [3] NCCL INFO AllReduce: opCount 1f sendbuff 0x7f0 recvbuff 0x7f0 count 1024 datatype 7 "
        "op 0 root 0 comm 0x55d3aa000000 [nranks=8] stream 0x7f3a1c000000")


def test_coll_lines_of_an_initialised_comm_get_its_comm_id_and_rank():
    c = ctx()
    before = parse_line(COLL, c)
    assert before.kind == "op" and "comm_id" not in before.data
    init = parse_line(INIT, c)
    assert init.kind == "log" and init.data["event"] == "nccl_comm_init"
    rec = parse_line(COLL, c)
    assert rec.kind == "op" and rec.data["op_count"] == 0x1F
    assert (rec.data["comm_id"], rec.data["comm_rank"], rec.data["nranks"]) == ("0x9ad9b5e4ab2566da", 3, 8)
    other = parse_line(COLL.replace("0x55d3aa000000", "0x55d3bb000000"), c)
    assert "comm_id" not in other.data  # another comm of the file: not confused with the first
    assert "comm_id" not in parse_line(COLL, ctx()).data  # the table is per file


def test_a_split_comm_topology_line_keeps_the_comm_id_learnt_before():
    c = ctx()
    parse_line(INIT, c)
    parse_line("node1:4100:4200 [3] NCCL INFO comm 0x55d3aa000000 rank 3 nRanks 8 nNodes 1 localRanks 8 "
               "localRank 3 MNNVL 0", c)
    assert parse_line(COLL, c).data["comm_id"] == "0x9ad9b5e4ab2566da"


def test_rank_precedence_torchrun_then_path_then_the_line_then_default():
    line = "[2024-01-01 00:00:00,000] [INFO] [logging.py:96:log_dist] [Rank 5] step=7, skipped=0, lr=[1e-4]"
    assert parse_line("[rank2]:" + line, ctx(rank=3, from_path=True)).rank == 2
    assert parse_line(line, ctx(rank=3, from_path=True)).rank == 3
    assert parse_line(line, ctx(rank=1, from_path=False)).rank == 5  # --rank 1 is the fallback only
    assert parse_line(line, ctx(rank=None)).rank == 5


def test_plain_messages_take_a_leading_rank_tag_when_nothing_better_is_known():
    mem = "[Rank 3] (after 10 iterations) memory (MB) | allocated: 20123.5 | max allocated: 31234.9"
    assert parse_line(mem, ctx()).rank == 3
    assert parse_line(mem, ctx(rank=1, from_path=True)).rank == 1
    ds = "[2023-07-25 21:03:17,269] [INFO] [logging.py:96:log_dist] [Rank 0] rank=0 time (ms) | forward: 652.41"
    assert parse_line(ds, ctx()).rank == 0
    assert parse_line("loss went up for [Rank 5] again", ctx()).rank is None  # not a tag at the start


def test_resolver_tells_path_ranks_from_the_default_rank(tmp_path):
    (tmp_path / "job" / "rank4").mkdir(parents=True)
    (tmp_path / "job" / "all.log").write_text("")
    r = ContextResolver([str(tmp_path / "job")], rank=9)
    assert r.context("a", str(tmp_path / "job" / "rank4" / "x.log")).rank_from_path
    c = r.context("b", str(tmp_path / "job" / "all.log"))
    assert c.rank == 9 and not c.rank_from_path


def test_watchdog_of_a_non_default_group_does_not_set_the_record_rank():
    line = ("[PG 3 Rank 5] Process group watchdog thread terminated with exception: [Rank 5] Watchdog caught "
            "collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, "
            "Timeout(ms)=600000) ran for 600020 milliseconds before timing out.")
    rec = parse_line(line, ctx())
    assert rec.rank is None and rec.data["fields"]["rank"] == 5 and rec.data["fields"]["pg"] == 3
    assert parse_line(line.replace("[PG 3 ", "[PG 0 "), ctx()).rank == 5


def test_torchtitan_validation_loss_is_not_the_training_loss():
    head = "[rank0]:[titan] 2025-06-16 22:30:50,322 - root - INFO - "
    rec = parse_line(head + "validate step: 16500  loss:  2.4192  memory: 49.66GiB(52.28%)", ctx())
    assert rec.kind == "log" and "loss" not in rec.data
    rec = parse_line(head + "step: 16500  loss:  2.4192  memory: 49.66GiB(52.28%)", ctx())
    assert rec.kind == "metrics" and rec.data["loss"] == 2.4192


def test_hf_dicts_get_the_file_step_counter_and_eval_dicts_are_never_loss():
    c = ctx()
    steps = [parse_line("{'loss': " + v + ", 'learning_rate': 1e-05, 'epoch': 0.1}", c).data["step"]
             for v in ("1.5", "1.4", "nan")]
    assert steps == [0, 1, 2]
    ev = parse_line("{'eval_loss': 9.5, 'eval_runtime': 1.0, 'epoch': 0.1}", c)
    assert ev.kind == "log" and ev.data["event"] == "eval" and "loss" not in ev.data
    assert parse_line("{'loss': 1.3, 'epoch': 0.2}", c).data["step"] == 3  # eval lines take no step


def test_hf_repr_variants_and_broken_values():
    rec = parse_line("{'loss': np.float64(2.5), 'grad_norm': tensor(0.75, device='cuda:0'), "
                     "'learning_rate': [1e-05, 2e-05], 'epoch': 1}", ctx())
    assert rec.data["loss"] == 2.5 and rec.data["grad_norm"] == 0.75 and "lr" not in rec.data
    assert math.isinf(parse_line("{'loss': -inf, 'epoch': 1.0}", ctx()).data["loss"])
    with pytest.raises(ParseError):
        parse_line("{'loss': 'high', 'epoch': 1.0}", ctx())  # claims the format, breaks it: dead letter
    for text in ("{'loss': __import__('os').system('true')}", "{'loss': 1.0", "{'loss' 1.0}"):
        assert parse_line(text, ctx()).kind == "log"  # not a literal: a message, and nothing is evaluated


def test_pyrepr_rejects_code_and_accepts_literals():
    assert parse_dict("{'a': (1, 2.5, 'x'), 'b': {'c': None}, 'd': True, 'e': 1_000}") == {
        "a": [1, 2.5, "x"], "b": {"c": None}, "d": True, "e": 1000}
    for bad in ("{'a': os.system('x')}", "{'a': lambda: 1}", "{'a': [1, 2}", "{" * 20 + "}" * 20):
        with pytest.raises(ReprError):
            parse_dict(bad)


def test_placeholders_are_not_values():
    assert "loss" not in parse_line("step: 10  loss: -1.0000  memory: 1.00GiB(1.00%)  tps: 100", ctx()).data
    assert "mfu" not in parse_line("iter 0: loss 4.26, time 9371.81ms, mfu -100.00%", ctx()).data


def test_json_keeps_its_contract_and_other_braces_are_messages():
    assert parse_line('{"step": 3, "loss": 1.5, "epoch": 2, "tokens_per_s": 1e5}', ctx()).data == {
        "step": 3, "loss": 1.5, "epoch": 2.0, "tokens_per_s": 1e5}
    with pytest.raises(ParseError):
        parse_line('{"loss": 1.0}', ctx())  # our field names without a step: claims the format
    assert parse_line("{this is a template}", ctx()).kind == "log"


def test_lightning_rows_need_their_header():
    c = ctx(path="/logs/j/version_0/metrics.csv")
    assert parse_line("0,49,0.5", c).kind == "log"  # before any header
    parse_line("epoch,step,train_loss_step,lr-AdamW,train|samples_per_sec", c)
    rec = parse_line("0,50,0.25,0.001,512.5", c)
    assert rec.kind == "metrics" and rec.data == {"loss": 0.25, "lr": 0.001, "throughput": 512.5, "step": 50,
                                                  "epoch": 0.0}
    with pytest.raises(ParseError):
        parse_line("0,51,abc,0.001,1", c)
    assert parse_line("0,49,0.5", ctx(path="/logs/j/other.txt")).kind == "log"  # only *.csv files


def test_glog_time_takes_the_year_of_the_file_and_rolls_back_over_new_year():
    c = ctx()
    c.last_ts = 1_735_776_000.0  # 2025-01-02
    rec = parse_line("[rank0]:[E1231 23:59:59.500000000 ProcessGroupNCCL.cpp:607] [Rank 0] x", c, 0, 0.0)
    assert rec.ts == pytest.approx(1_735_689_599.5)  # 2024-12-31, not 2025-12-31
    assert rec.data["msg"] == "[Rank 0] x"


@pytest.mark.parametrize(("line", "path"), [
    ("saving checkpoint at iteration     100 to /ckpt/run", "/ckpt/run"),
    ("  successfully saved checkpoint from iteration     200 to /ckpt/run [ t 1/1, p 1/1 ]", "/ckpt/run"),
    ("[2024-01-01 00:00:00,000] [INFO] [logging.py:96:log_dist] [Rank 0] Saving model checkpoint: "
     "/ck/global_step10/mp_rank_00_model_states.pt", "/ck/global_step10/mp_rank_00_model_states.pt"),
    ("Saving model checkpoint to /ckpt/run/checkpoint-500", "/ckpt/run/checkpoint-500"),
    # Lightning's ModelCheckpoint, Accelerate's save_state, torchtitan (no path), mmengine (no path)
    ("Epoch 0, global step 450: 'val_loss' reached 0.12345 (best 0.12345), saving model to "
     "'/out/epoch=0-step=450.ckpt' as top 1", "/out/epoch=0-step=450.ckpt"),
    ("Saving current state to /out/step_500", "/out/step_500"),
    ("[titan] 2025-06-16 22:30:50,758 - root - INFO - Saving the checkpoint (or staging if async is enabled).",
     "(unnamed)"),
    ("06/13 19:41:35 - mmengine - INFO - Saving checkpoint at 100 iterations", "(unnamed)"),
])
def test_framework_checkpoint_lines(line, path):
    assert parse_line(line, ctx()).data["checkpoint"] == path


def test_checkpoint_announcements_still_ride_with_the_metrics():
    rec = parse_line("[rank0]:[titan] 2025-06-16 22:30:50,758 - root - INFO - Saving checkpoint to /ck/step-200",
                     ctx())
    assert rec.data["checkpoint"] == "/ck/step-200" and rec.family() == "metrics"


# ---- property-based: random numbers, spacing, colours ------------------------------------------------------
ANSI_CODES = ["\x1b[31m", "\x1b[32m", "\x1b[1;33m", "\x1b[0m", "\x1b[39m", "\x1b[38;5;208m"]
finite = st.floats(min_value=1e-12, max_value=1e12, allow_nan=False, allow_infinity=False)
special = st.sampled_from([math.nan, math.inf])


def _fmt(x: float, style: str) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    return {"repr": repr(x), "f4": f"{x:.4f}", "e6": f"{x:.6E}", "e3": f"{x:.3e}", "g": f"{x:g}"}[style]


def _same(text: str, got: float) -> bool:
    want = float(text)
    return (math.isnan(want) and math.isnan(got)) or want == got


styles = st.sampled_from(["repr", "f4", "e6", "e3", "g"])
spaces = st.integers(1, 6)


@st.composite
def coloured(draw, tokens: list[str]) -> str:
    """Join tokens, with an ANSI code drawn between each pair (torchtitan colours every field)."""
    out = []
    for t in tokens:
        if draw(st.booleans()):
            out.append(draw(st.sampled_from(ANSI_CODES)))
        out.append(t)
    return "".join(out) + (draw(st.sampled_from(ANSI_CODES)) if draw(st.booleans()) else "")


@settings(max_examples=150, deadline=None)
@given(st.data(), st.integers(0, 10**7), st.one_of(finite, special), st.one_of(finite, special), finite, finite,
       styles, spaces)
def test_property_megatron(data, it, loss, gnorm, ms, lr, style, pad):
    texts = {"loss": _fmt(loss, style), "grad": _fmt(gnorm, style), "ms": f"{ms:.1f}", "lr": _fmt(lr, "e3")}
    sep = " " * pad
    line = (f"{sep}iteration{sep}{it}/{sep}{it + 10} | consumed samples:{sep}{it * 4} | elapsed time per iteration "
            f"(ms): {texts['ms']} | learning rate: {texts['lr']} | global batch size:{sep}256 | lm loss: "
            f"{texts['loss']} | loss scale: 1.0 | grad norm: {texts['grad']} | number of skipped iterations:{sep}0 |"
            f" number of nan iterations:{sep}0 |")
    parts = line.split("|")
    line = data.draw(coloured([p + "|" for p in parts[:-1]] + parts[-1:]))
    rec = parse_line(line, ctx())
    assert rec.kind == "metrics" and rec.data["step"] == it
    assert _same(texts["loss"], rec.data["loss"]) and _same(texts["grad"], rec.data["grad_norm"])
    assert rec.data["step_time_s"] == pytest.approx(float(texts["ms"]) / 1000) and _same(texts["lr"], rec.data["lr"])


@settings(max_examples=150, deadline=None)
@given(st.one_of(finite, special), st.one_of(finite, special), finite, st.floats(0, 100), styles,
       st.booleans(), st.text(alphabet="abcdefghij_", min_size=1, max_size=8))
def test_property_hf_trainer(loss, gnorm, lr, epoch, style, with_extra, extra_key):
    items = [("loss", _fmt(loss, style)), ("grad_norm", _fmt(gnorm, style)), ("learning_rate", repr(lr)),
             ("epoch", repr(round(epoch, 2)))]
    if with_extra:
        items.insert(2, (extra_key, "0.5"))
    line = "{" + ", ".join(f"'{k}': {v}" for k, v in items) + "}" + " " * len(extra_key)
    rec = parse_line(line, ctx())
    assert rec.kind == "metrics" and rec.data["step"] == 0
    assert _same(items[0][1], rec.data["loss"]) and _same(_fmt(gnorm, style), rec.data["grad_norm"])
    assert rec.data["lr"] == lr and rec.data["epoch"] == round(epoch, 2)


@settings(max_examples=150, deadline=None)
@given(st.data(), st.integers(0, 10**6), st.one_of(finite, special), finite, finite, finite,
       st.floats(0, 100), st.integers(0, 10**7), spaces)
def test_property_torchtitan_with_colours(data, step, loss, gnorm, mem, tflops, mfu, tps, pad):
    sep = " " * pad
    lt = _fmt(loss, "f4") if math.isfinite(loss) else _fmt(loss, "repr")
    tokens = [f"step: {step}{sep}", f"loss: {sep}{lt}{sep}", f"grad_norm: {gnorm:7.4f}{sep}",
              f"memory: {mem:5.2f}GiB({mfu:.2f}%){sep}", f"tps: {tps:,}{sep}", f"tflops: {tflops:,.2f}{sep}",
              f"mfu: {mfu:.2f}%"]
    line = "[rank1]:[titan] 2025-06-16 22:30:50,322 - root - INFO - " + data.draw(coloured(tokens))
    rec = parse_line(line, ctx())
    assert rec.kind == "metrics" and rec.rank == 1 and rec.data["step"] == step
    if lt not in ("-1.0000",):
        assert _same(lt, rec.data["loss"])
    assert rec.data["grad_norm"] == float(f"{gnorm:7.4f}") and rec.data["tokens_per_s"] == tps
    assert rec.data["tflops"] == float(f"{tflops:.2f}") and rec.data["mfu"] == float(f"{mfu:.2f}")
    assert rec.data["memory_gib"] == float(f"{mem:5.2f}")


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10**7), st.one_of(finite, special), finite, st.floats(0, 100), st.booleans())
def test_property_nanogpt_and_llmc(it, loss, ms, mfu, with_mfu):
    lt = _fmt(loss, "f4")
    line = f"iter {it}: loss {lt}, time {ms:.2f}ms" + (f", mfu {mfu:.2f}%" if with_mfu else "")
    rec = parse_line(line, ctx())
    assert rec.data["step"] == it and _same(lt, rec.data["loss"])
    assert rec.data["step_time_s"] == pytest.approx(float(f"{ms:.2f}") / 1000)
    assert ("mfu" in rec.data) == with_mfu
    line = (f"step {it:4d}/{it + 5} | loss {lt} (+nanz)| norm {lt} (+nanz)| lr 3.00e-04 | {ms:.2f} ms | "
            f"{mfu:.1f}% bf16 MFU | {int(ms)} tok/s")
    rec = parse_line(line, ctx())
    assert rec.data["step"] == it and _same(lt, rec.data["grad_norm"]) and rec.data["tokens_per_s"] == int(ms)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 100), finite, finite, finite, st.integers(0, 7))
def test_property_deepspeed(step, skipped, lr, tput, mem, rank):
    rec = parse_line(f"[2024-01-01 00:00:00,000] [INFO] [logging.py:96:log_dist] [Rank {rank}] step={step}, "
                     f"skipped={skipped}, lr=[{lr!r}, {lr!r}], mom=[(0.9, 0.95)]", ctx())
    assert rec.rank == rank and rec.data == {"step": step, "skipped_iterations": skipped, "lr": lr}
    rec = parse_line(f"epoch=0/micro_step={step * 4}/global_step={step}, RunningAvgSamplesPerSec={tput!r}, "
                     f"CurrSamplesPerSec={tput!r}, MemAllocated={mem:.2f}GB, MaxMemAllocated={mem:.2f}GB", ctx())
    assert rec.data["step"] == step and rec.data["throughput"] == tput and rec.data["memory_gib"] == float(
        f"{mem:.2f}")
    rec = parse_line(f"[deepspeed] OVERFLOW! Rank {rank} Skipping step. Attempted loss scale: {2 ** skipped}, "
                     f"reducing to {2 ** skipped / 2}", ctx())
    assert rec.data["fields"] == {"rank": rank, "attempted_loss_scale": 2.0 ** skipped,
                                  "new_loss_scale": 2.0 ** skipped / 2}


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**40), st.integers(1, 4096), st.integers(0, 4095), st.integers(1, 2**31),
       st.sampled_from(["AllReduce", "AllGather", "ReduceScatter", "Broadcast", "Send", "Recv"]), spaces)
def test_property_nccl_coll(op_count, nranks, rank, count, op, pad):
    c = ctx()
    comm = f"0x7f{count:010x}"
    parse_line(f"h:1:2 [0] NCCL INFO comm {comm} rank {rank % nranks} nranks {nranks} cudaDev 0 busId 1000 "
               f"commId 0x{op_count:016x} - Init COMPLETE", c)
    rec = parse_line(f"h:1:2 [0] NCCL INFO {op}: opCount {op_count:x} sendbuff 0x1 recvbuff (nil) count {count} "
                     f"datatype 7 op 0 root 0 comm {comm} [nranks={nranks}]{' ' * pad}stream 0x9", c)
    assert rec.kind == "op" and rec.data["op"] == op and rec.data["op_count"] == op_count
    assert rec.data["count"] == count and rec.data["comm_rank"] == rank % nranks
    assert rec.data["comm_id"] == f"0x{op_count:016x}" and rec.data["nranks"] == nranks


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 1023), st.integers(1, 10**9), st.integers(1, 10**9),
       st.sampled_from(["ALLREDUCE", "_ALLGATHER_BASE", "BROADCAST", "_REDUCE_SCATTER_BASE"]),
       st.sampled_from(["[Rank {r}]", "[PG 0 Rank {r}]", "[PG ID 0 PG GUID 0(default_pg) Rank {r}]"]))
def test_property_watchdog(seq, rank, numel, timeout, op, prefix):
    line = (f"[E1206 18:44:12.715298746 ProcessGroupNCCL.cpp:607] {prefix.format(r=rank)} Watchdog caught "
            f"collective operation timeout: WorkNCCL(SeqNum={seq}, OpType={op}, NumelIn={numel}, "
            f"NumelOut={numel}, Timeout(ms)={timeout}) ran for {timeout + 12} milliseconds before timing out.")
    f = parse_line(line, ctx()).data["fields"]
    assert (f["seq_num"], f["op_type"], f["numel_in"], f["numel_out"], f["timeout_ms"], f["ran_for_ms"], f["rank"]) \
        == (seq, op, numel, numel, timeout, timeout + 12, rank)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(finite, special, st.none()), min_size=3, max_size=3), st.integers(0, 10**6), styles)
def test_property_lightning_csv(values, step, style):
    c = ctx(path="/l/metrics.csv")
    parse_line("epoch,step,train_loss_step,grad_norm,val_loss", c)
    cells = ["" if v is None else _fmt(v, style) for v in values]
    rec = parse_line(f"0,{step}," + ",".join(cells), c)
    if cells[0] == "" and cells[1] == "":
        assert rec.kind == "log"
        return
    assert rec.kind == "metrics" and rec.data["step"] == step
    for cell, name in ((cells[0], "loss"), (cells[1], "grad_norm")):
        assert (cell == "" and name not in rec.data) or _same(cell, rec.data[name])


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200), st.sampled_from(["", "[rank3]:", "\x1b[31m", "[titan] ", "{'", "iteration 1/ 2 |",
                                                "NCCL INFO ", "step: 1  loss: ", "WorkNCCL(", "CUDA "]))
@example(text='"\r0', trigger="{'")  # found by this test: a bare CR inside quotes broke the CSV reader
def test_any_text_behind_any_trigger_never_crashes(text, trigger):
    line = (trigger + text).replace("\n", " ")
    for c in (ctx(), ctx(path="/l/metrics.csv")):
        try:
            rec = parse_line(line, c, 0, 1.0)
        except ParseError:
            continue
        assert rec.kind in ("log", "metrics", "op", "gpu")
        if rec.kind == "metrics":
            assert isinstance(rec.data["step"], int)


def test_an_mmengine_job_is_judged_like_any_other(tmp_path):
    """mmengine's by-epoch lines (tests/data/real_lines/mmengine.txt) become one rank's series: a loss spike and a
    step-time stall in them are found at the right global step."""
    import random
    from datetime import datetime, timedelta

    from rankwatch.processors.offline import analyze

    rng, t = random.Random(3), datetime(2023, 6, 8, 18, 0, 0)
    lines = []
    for epoch in (1, 2, 3):
        for batch in range(10, 1001, 10):
            step = (epoch - 1) * 1000 + batch
            t += timedelta(seconds=6)
            loss = 0.9 + rng.gauss(0, 0.01) + (3.0 if step == 1500 else 0.0)
            time_s = 0.6 * (1 + rng.gauss(0, 0.01)) * (4.0 if step == 2500 else 1.0)
            lines.append(f"{t:%Y/%m/%d %H:%M:%S} - mmengine - INFO - Epoch(train)  [{epoch}][{batch:4d}/1000]  lr: "
                         f"1.0000e-04  eta: 0:00:14  time: {time_s:.4f}  data_time: 0.0007  memory: 878  loss: {loss:.4f}")
    (tmp_path / "rank0").mkdir()
    (tmp_path / "rank0" / "train.log").write_text("\n".join(lines) + "\n")
    found = {(a.detector, a.signal, a.context["step"]) for a in analyze([str(tmp_path)])}
    assert ("mad", "loss", 1500) in found and ("step_time", "step_time_s", 2500) in found, found
    assert all(a[2] in (1500, 1510, 2500, 2510) for a in found), found
