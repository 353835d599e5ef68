from __future__ import annotations

import math
import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rankwatch.models.mad import RollingMAD
from rankwatch.models.training import THRESHOLD_INFO_FIELDS, RankMetricsDetector, TrainingDetectorConfig

DETECTOR_FACTORIES = [lambda: RollingMAD(window=20, k=4.0, min_points=10)]


def _drive_miner(det, i):
    return det.add(f"worker {i % 3} opened shard /data/train-{i:05d}.parquet" if i % 4 else f"step {i} loss 0.{i}")


def _drive_logkeys(det, i):
    from rankwatch.models.logkeys import Line

    msg = "RuntimeError: CUDA error" if i % 17 == 16 else (f"step {i} loss 0.5" if i % 5 else "opened shard 7")
    tid, change = det.mine(msg)
    f = det.collect(Line(i % 3, float(i), tid, None))
    return tid, change, None if f is None else (f.reason, f.severity, f.escalation)


def _logkey_detector():
    from rankwatch.models.logkeys import LogKeyConfig, LogKeyDetector

    return LogKeyDetector(LogKeyConfig(deeplog_window=3, logkey_burst_gap_s=5.0))


def _miner():
    from rankwatch.models.templates import LogTemplateMiner

    return LogTemplateMiner()


# log-key detectors take messages, not numbers: (factory, one step of input -> output)
LOG_DETECTORS = [(_miner, _drive_miner), (_logkey_detector, _drive_logkeys)]


@pytest.mark.parametrize(("make", "drive"), LOG_DETECTORS)
def test_log_detector_contract_pickle_and_state_roundtrip(make, drive):
    import json

    a = make()
    for i in range(40):
        drive(a, i)
    b = pickle.loads(pickle.dumps(a))
    c = make()
    c.load_state(json.loads(json.dumps(a.save_state())))  # JSON, no pickle
    for i in range(40, 80):
        assert drive(a, i) == drive(b, i) == drive(c, i)
    assert a.save_state() == c.save_state()


@pytest.mark.parametrize("make", DETECTOR_FACTORIES)
def test_detector_contract_pickle_and_state_roundtrip(make):
    rng = random.Random(1)
    a = make()
    for _ in range(40):
        a.update(1.0 + rng.gauss(0, 0.05))
    b = pickle.loads(pickle.dumps(a))
    c = make()
    c.load_state(a.save_state())
    for x in (1.02, 5.0, 0.9):
        sa, sb, sc = a.update(x), b.update(x), c.update(x)
        assert sa == sb == sc


def test_warm_up_gives_no_verdict():
    d = RollingMAD(window=50, k=3, min_points=20)
    for i in range(19):
        s = d.update(1.0 + 0.01 * (i % 3))
        assert not s.ready and not s.is_anomaly
    assert not d.update(1000.0).is_anomaly  # 20th point still in warm-up when judged
    assert d.update(1000.0).is_anomaly


def test_threshold_is_median_plus_k_mad():
    d = RollingMAD(window=5, k=2.0, min_points=5)
    for x in (1, 2, 3, 4, 5):
        d.update(x)
    s = d.score_one(10)
    # median 3, MAD = median(|x-3|) = 1
    assert s.expected == 3 and s.scale == pytest.approx(1.4826)
    assert s.threshold == pytest.approx(3 + 2 * 1.4826) and s.is_anomaly
    assert not d.score_one(5.9).is_anomaly and d.score_one(6.0).is_anomaly


def test_flagged_points_do_not_contaminate_until_regime_change():
    d = RollingMAD(window=20, k=4, min_points=10, readmit_after=5)
    rng = random.Random(0)
    for _ in range(30):
        d.update(1 + rng.gauss(0, 0.01))
    med_before = d.stats()[0]
    for _ in range(4):
        assert d.update(3.0).is_anomaly
    assert d.stats()[0] == med_before  # spikes not learned
    d.update(3.0)  # fifth in a row: taken as the new level
    for _ in range(15):
        d.update(3.0)
    assert not d.update(3.0).is_anomaly


def test_admit_outliers_and_direction():
    d = RollingMAD(window=10, k=2, min_points=5, admit_outliers=True)
    for x in (1, 1.1, 0.9, 1, 1.05):
        d.update(x)
    d.update(50)
    assert max(d._window) == 50
    down = RollingMAD(window=10, k=3, min_points=5, direction="down")
    for x in (10, 10.5, 9.5, 10, 10.2):
        down.update(x)
    assert down.update(1.0).is_anomaly and not down.update(100.0).is_anomaly


def test_constant_signal_does_not_alarm_on_rounding():
    d = RollingMAD(window=20, k=8, min_points=10)
    for _ in range(30):
        d.update(2.0)
    assert not d.update(2.0000001).is_anomaly
    assert d.update(2.5).is_anomaly


def test_rank_detector_nonfinite_is_critical_and_mad_carries_context():
    det = RankMetricsDetector(TrainingDetectorConfig(threshold_factor=6.0))
    rng = random.Random(2)
    for step in range(60):
        assert det.update(step, {"loss": 2 + rng.gauss(0, 0.02), "grad_norm": 1 + rng.gauss(0, 0.05)}) == []
    out = det.update(60, {"loss": float("nan"), "grad_norm": 10.0})
    kinds = {(f.detector, f.signal, f.severity) for f in out}
    assert ("nonfinite", "loss", "critical") in kinds
    g = next(f for f in out if f.signal == "grad_norm")
    assert g.detector == "mad" and g.context["step"] == 60
    info = g.context["threshold_info"]
    assert info["grad_norm_threshold"] == pytest.approx(g.threshold)
    assert info["grad_norm_median"] == pytest.approx(1.0, abs=0.05)
    assert set(info) <= set(THRESHOLD_INFO_FIELDS)
    assert {"loss_median", "loss_mad", "loss_threshold", "loss_mean", "loss_std", "relative_grad_change"} <= set(info)
    assert math.isfinite(g.score) and g.score > 6
    # a diverged run logs NaN at every step: one critical for the run of them, another once it recurs
    later = [(f.detector, f.context["step"]) for step in range(61, 70)
             for f in det.update(step, {"loss": float("nan")})]
    assert later == []
    det.update(70, {"loss": 2.0})
    assert [f.detector for f in det.update(71, {"loss": float("inf")})] == ["nonfinite"]


def _megatron(step: int, loss: str, skipped: int = 0, nan: int = 0, scale: str = "1.0") -> str:
    # the layout of epfLLM/Megatron-LLM#33's lines (tests/data/real_lines/megatron.txt)
    return (f"iteration {step:>8}/    8000 | consumed samples: {step * 64:>12} | elapsed time per iteration (ms): "
            f"7613.1 | learning rate: 6.680E-06 | global batch size:    64 | {loss}loss scale: {scale} | grad norm: "
            f"0.752 | number of skipped iterations: {skipped:>3} | number of nan iterations: {nan:>3} |")


def test_a_nan_loss_megatron_keeps_out_of_its_line_is_raised_once():
    """Megatron prints only an average loss above 0: a NaN loss vanishes from the line (with 'number of nan
    iterations: 0' where the step was applied anyway), or is counted in 'number of nan iterations'."""
    from rankwatch.parsing import SourceContext, parse_line

    ctx = SourceContext(path="/logs/j/rank0.log", job="j", rank=0)
    rng = random.Random(1)

    def run(lines: list[str]) -> list:
        det = RankMetricsDetector()
        out = []
        for line in lines:
            rec = parse_line(line, ctx, 0, 1.0)
            out += [(rec.data["step"], f.detector, f.severity) for f in det.update(rec.data["step"], rec.data)]
        return out

    healthy = [_megatron(i, f"lm loss: {0.73 + rng.gauss(0, 0.01):.6E} | ") for i in range(1, 61)]
    # the real lines' case: no loss, nothing skipped, loss scale 1 (bf16): one critical for the run of them
    assert run(healthy + [_megatron(i, "") for i in range(61, 66)]) == [(61, "nonfinite", "critical")]
    # counted by Megatron: the logged loss is finite, the skipped iteration's was not
    assert run(healthy + [_megatron(61, "lm loss: 7.3E-01 | ", skipped=1, nan=1)]) == [(61, "nonfinite", "critical")]
    # fp16 overflow skips every iteration of the interval: no loss either, and nothing wrong
    fp16 = [x.replace("loss scale: 1.0", "loss scale: 65536.0") for x in healthy]
    assert run(fp16 + [_megatron(61, "", skipped=1, scale="32768.0")]) == []
    # a series that never logged a loss has none to lose
    assert run([_megatron(i, "") for i in range(1, 40)]) == []


def test_nonfinite_values_survive_the_wire():
    from rankwatch.records import Record, decode_record, encode_record

    rec = Record("metrics", "j", 1, 5.0, "f", 0, {"step": 3, "loss": float("nan"), "grad_norm": float("-inf")})
    back = decode_record(encode_record(rec))
    assert math.isnan(back.data["loss"]) and back.data["grad_norm"] == float("-inf") and back.data["step"] == 3
    log = Record("log", "j", 1, 5.0, "f", 0, {"msg": "NaN", "raw": "NaN"})
    assert decode_record(encode_record(log)).data["msg"] == "NaN"  # text stays text


def test_pipeline_skips_records_a_detector_cannot_handle():
    from rankwatch.processors.pipeline import Pipeline

    from rankwatch.records import Record

    p = Pipeline()
    bad = Record("metrics", "j", 1, 5.0, "f", 0, {"step": "not-a-step", "loss": 1.0})
    good = Record("metrics", "j", 1, 6.0, "f", 10, {"step": 1, "loss": None})
    assert p.process([bad, good]) == []
    assert p.errors == 1 and "f:0" in p.last_error


def test_relative_change_catches_a_jump_under_the_mad_threshold_on_a_trending_signal():
    # A smooth, fast-falling loss: the window's MAD is wide (it spans the trend), step-to-step changes are tiny.
    det = RankMetricsDetector(TrainingDetectorConfig())
    loss = [10.0 * 0.97**i for i in range(60)]
    for step, x in enumerate(loss):
        assert det.update(step, {"loss": x}) == []
    jump = loss[-1] * 1.7  # +70% in one step, still under median + 8 x 1.4826 x MAD of the trend
    out = det.update(60, {"loss": jump})
    assert [(f.detector, f.signal) for f in out] == [("relative_change", "loss")]
    info = out[0].context["threshold_info"]
    assert info["relative_loss_change"] == pytest.approx(0.7) and jump < info["loss_threshold"]


def test_relative_change_ignores_ordinary_jitter_and_recovery_from_a_dip():
    rng = random.Random(4)
    det = RankMetricsDetector(TrainingDetectorConfig())
    findings = []
    for step in range(3000):
        g = math.exp(rng.gauss(0, 0.3))  # grad norm jumping 50%+ between steps is ordinary here
        findings += [f for f in det.update(step, {"grad_norm": g}) if f.detector == "relative_change"]
    assert findings == []


def test_fixed_threshold_overrides_dynamic_and_throughput_drop():
    det = RankMetricsDetector(TrainingDetectorConfig(fixed_loss_threshold=0.3))
    for step in range(30):
        assert det.update(step, {"loss": 0.2, "throughput": 1000.0 + step % 5}) == []
    out = det.update(30, {"loss": 0.31, "throughput": 600.0})  # 1.67x slower: raised at once
    kinds = {(f.detector, f.signal, f.severity) for f in out}
    assert ("fixed", "loss", "critical") in kinds and ("throughput", "throughput", "warning") in kinds
    assert det.update(31, {"loss": 0.25, "throughput": 1001.0}) == []  # 0.25 is far above median, under fixed
    # 30% down (1.43x slower, under slowdown_min_ratio): one such step is ordinary, two in a row a slowdown,
    # raised on the second
    assert det.update(40, {"throughput": 700.0}) == []
    assert det.update(41, {"throughput": 1002.0}) == []
    assert det.update(50, {"throughput": 700.0}) == []
    assert [(f.detector, f.context["step"]) for f in det.update(51, {"throughput": 700.0})] == [("throughput", 51)]
    assert det.update(52, {"throughput": 700.0}) == []  # the same episode


def test_straggler_judged_when_complete_or_late():
    from rankwatch.models.straggler import StepStragglerDetector

    d: StepStragglerDetector[str] = StepStragglerDetector()
    found = []
    for step in range(5, 30):
        for rank in range(8):
            if rank == 6 and step >= 20:
                continue  # rank 6 falls behind ...
            t = 1.0 + 0.01 * ((rank * 7 + step) % 5) + (0.8 if rank == 3 and 10 <= step < 14 else 0.0)
            found += d.add(rank, step, t, f"r{rank}s{step}")
    for step in range(20, 30):  # ... and reports late and slow: judged against the stored statistics
        found += d.add(6, step, 1.9, f"r6s{step}")
    got = sorted((f.rank, f.step) for f in found)
    assert got == [(3, 10), (6, 20)]  # one finding per episode: its first slow step
    assert all(f.ref == f"r{f.rank}s{f.step}" and f.ranks >= 7 for f in found)


def test_packs_decode_to_records_and_bad_members_are_reported_not_fatal():
    from rankwatch.records import Record, decode_records, encode_pack, encode_record

    good = [Record("metrics", "j", r, 1.0 + r, "f", r * 10, {"step": r, "loss": 1.0}, "h:1:2") for r in range(3)]
    recs, errs = decode_records(encode_pack([encode_record(x) for x in good]))
    assert recs == good and errs == []
    recs, errs = decode_records(encode_pack([encode_record(good[0]), b'{"kind": "nope"}', b"[]"]))
    assert recs == [good[0]] and len(errs) == 2
    assert decode_records(encode_record(good[1])) == ([good[1]], [])
    assert decode_records(b"\x00junk")[0] == []


def test_the_fast_decode_path_gives_what_the_checked_one_gives(monkeypatch):
    """records._record_from takes exactly typed op/log records as they are; anything else (a rank as text, an
    integer time, a missing offset, another kind, a bool rank) goes through the checked conversion, same result."""
    from rankwatch.records import DecodeError, _checked_record_from, _record_from

    base = {"kind": "op", "job": "j", "rank": 3, "ts": 12.5, "file": "f", "offset": 7, "fid": "d:1",
            "data": {"op_count": 1, "stream": "0x1"}}
    variants = [base, {**base, "kind": "log"}, {**base, "rank": None}, {**base, "rank": "3"}, {**base, "ts": 12},
                {**base, "rank": True}, {k: v for k, v in base.items() if k not in ("file", "offset", "fid")},
                {**base, "offset": "7"}, {**base, "job": 5}, {**base, "kind": "metrics", "data": {"loss": "NaN"}},
                {**base, "data": [["op_count", 1]]}, {**base, "kind": "nope"}, {**base, "ts": "x"}, [1, 2],
                {k: v for k, v in base.items() if k != "job"}]
    for d in variants:
        try:
            want = _checked_record_from(d)
        except DecodeError:
            try:
                _record_from(d)
            except DecodeError:
                continue
            raise AssertionError(f"fast path took {d!r}") from None
        got = _record_from(d)
        assert got == want and type(got.rank) is type(want.rank) and type(got.ts) is float, d
    # the usual records do take the fast path: they decode with the checked one out of reach
    from rankwatch import records

    def unreachable(d):
        raise AssertionError(f"checked path taken for {d!r}")

    monkeypatch.setattr(records, "_checked_record_from", unreachable)
    for d in (base, {**base, "kind": "log"}, {**base, "rank": None}):
        assert _record_from(d) == records.Record(d["kind"], "j", d["rank"], 12.5, "f", 7, d["data"], "d:1")

def test_pipeline_state_roundtrip_gives_identical_verdicts(tmp_path):
    from rankwatch.processors.app import load_pipeline_state, save_pipeline_state
    from rankwatch.processors.pipeline import Pipeline

    from rankwatch.records import Record
    from rankwatch.simulate import Fault, Scenario, metric_rows

    rows = metric_rows(Scenario(ranks=4, steps=200, seed=9, faults=[Fault("straggler", 2, 150, 10, 1.8),
                                                                    Fault("loss_spike", 1, 125, magnitude=2.0)]))
    recs = sorted((Record("metrics", "j", r, row["ts"], "f", i, row) for r, series in rows.items()
                   for i, row in enumerate(series)), key=lambda x: x.ts)
    first, rest = [x for x in recs if x.data["step"] < 120], [x for x in recs if x.data["step"] >= 120]
    a = Pipeline()
    a.process(first)
    path = tmp_path / "state.json"
    save_pipeline_state(a, str(path))
    b = Pipeline()
    load_pipeline_state(b, str(path))
    got_a = [x.to_dict() for x in a.process(rest)]
    got_b = [x.to_dict() for x in b.process(rest)]
    strip = lambda xs: [{k: v for k, v in x.items() if k != "detected_at"} for x in xs]  # noqa: E731
    assert strip(got_a) == strip(got_b) and len(got_a) >= 2
    spike = (1, 125, "loss")
    assert spike in {(x["rank"], x["context"]["step"], x["signal"]) for x in got_b}
    fresh = Pipeline().process(rest)  # without the state, a restarted worker is still warming up at step 125
    assert spike not in {(x.rank, x.context["step"], x.signal) for x in fresh}


def _gpu_samples(n: int, seed: int, leak_bytes_per_s: float = 0.0) -> list[tuple[float, dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ts = 1000.0 + i
        used = 40e9 + 4e9 * ((i % 3) / 2) + leak_bytes_per_s * i + rng.gauss(0, 5e7)
        out.append((ts, {"host": "h", "gpu": 0, "mem_used_bytes": used, "mem_total_bytes": 80e9,
                         "allocated_bytes": used - 2e9, "reserved_bytes": used - 5e8, "num_alloc_retries": 0,
                         "num_ooms": 0}))
    return out


def _imbalance_feed(det, shares):
    found = []
    for bucket in range(12):
        for g, share in enumerate(shares):
            found += det.add(f"h/{g}", bucket, share + 0.001 * ((bucket + g) % 3), {"gpu": g, "bucket": bucket})
    return [(f.gpu, f.bucket) for f in found]


def test_memory_detectors_contract_pickle_and_state_roundtrip():
    """GPU memory detectors: pickle and JSON state round trips give identical verdicts and predictions."""
    import json

    from rankwatch.models.gpu_memory import GpuMemoryDetector
    from rankwatch.models.imbalance import MemoryImbalanceDetector

    samples = _gpu_samples(1500, 3, leak_bytes_per_s=20e6)
    a = GpuMemoryDetector()
    for ts, d in samples[:900]:
        a.update(ts, d)
    b = pickle.loads(pickle.dumps(a))
    c = GpuMemoryDetector()
    c.load_state(json.loads(json.dumps(a.save_state())))
    outs = []
    for det in (a, b, c):
        found = [f for ts, d in samples[900:] for f in det.update(ts, d)]
        outs.append(([(f.detector, f.severity, round(f.value or 0, 3)) for f in found],
                     det.prediction.to_dict() if det.prediction else None))
    assert outs[0] == outs[1] == outs[2]
    assert any(d == "oom" for d, _, _ in outs[0][0])  # the leak is forecast after the restore too

    shares = [0.6, 0.61, 0.59, 0.8, 0.6]
    d1: MemoryImbalanceDetector = MemoryImbalanceDetector()
    first = _imbalance_feed(d1, shares[:])
    d2: MemoryImbalanceDetector = MemoryImbalanceDetector()
    d2.load_state(json.loads(json.dumps(d1.save_state())))
    d3 = pickle.loads(pickle.dumps(d1))
    assert first and all(g == "h/3" for g, _ in first)
    assert _imbalance_feed(d2, shares) == _imbalance_feed(d3, shares)


def test_throughput_that_varies_with_batch_length_is_judged_on_its_own_spread():
    """A 20% dip under the rolling P10 is a stall in a steady series, but an ordinary step where throughput
    varies with ranks' batch lengths (lognormal, 30%); a real stall (/2.5) is found in both."""
    import random

    from rankwatch.models.training import RankMetricsDetector, TrainingDetectorConfig

    def findings(values):
        det = RankMetricsDetector(TrainingDetectorConfig())
        out = []
        for step, v in enumerate(values):
            out += [(step, f.detector) for f in det.update(step, {"throughput": v})]
        return [s for s, d in out if d == "throughput"]

    rng = random.Random(4)
    noisy = [1000 * math.exp(0.3 * rng.gauss(0, 1)) for _ in range(400)]
    steady = [1000 * (1 + 0.02 * rng.gauss(0, 1)) for _ in range(400)]
    assert len(findings(noisy)) <= 1  # the P10 rule alone flags ~2% of these steps
    noisy[300] = steady[300] = 1000 / 2.5 / 4  # a stall: a quarter of a 2.5x-slower step's throughput
    steady[200] = steady[201] = 750  # 25% down, for two steps, in a series that moves 2%
    steady[100] = 750  # ... for one step: ordinary (slowdown_min_ratio)
    assert 300 in findings(noisy) and {201, 300} <= set(findings(steady)) and 100 not in findings(steady)


def test_single_slow_steps_are_ordinary_and_critical_needs_twice_the_usual_step():
    rng = random.Random(3)
    det = RankMetricsDetector(TrainingDetectorConfig())
    for step in range(60):
        assert det.update(step, {"step_time_s": 1.0 + 0.005 * rng.gauss(0, 1)}) == []
    assert det.update(60, {"step_time_s": 1.4}) == []  # one step 40% slower: a GC pause, a slow batch
    assert det.update(61, {"step_time_s": 1.0}) == []
    (f,) = det.update(70, {"step_time_s": 1.6})  # 1.6x: raised at once, but not critical
    assert f.detector == "step_time" and f.severity == "warning"
    for step in range(71, 80):
        assert det.update(step, {"step_time_s": 1.0}) == []
    (f,) = det.update(80, {"step_time_s": 2.5})
    assert f.severity == "critical"
    # a job that logs every 10 steps: its next record is the next step judged (a slowdown that lasts is one
    # finding, raised on its second record)
    det = RankMetricsDetector(TrainingDetectorConfig())
    for step in range(0, 600, 10):
        assert det.update(step, {"step_time_s": 10.0 + 0.05 * rng.gauss(0, 1)}) == []
    found = [f.context["step"] for step in range(600, 800, 10) for f in det.update(step, {"step_time_s": 13.0})]
    assert found == [610]


def test_straggler_after_a_resume_even_when_a_ranks_records_reach_stage_2_late():
    """Resume from step 100 after step 130; rank 3 is 3x slow at step 110 of the second attempt. In the stream one
    rank's worker may lag: its last first-attempt records arrive after the others resumed, then its own resume.
    Neither may wipe the second attempt's statistics or join its steps."""
    from rankwatch.models.straggler import StepStragglerDetector

    def first(ranks, steps):
        return [(str(r), s, 1.0) for s in steps for r in ranks]

    def second(ranks):
        return [(str(r), s, 3.0 if (r, s) == (3, 110) else 1.0) for s in range(101, 126) for r in ranks]

    in_order = first(range(4), range(1, 131)) + second(range(4))
    lagged = (first(range(4), range(1, 121)) + first(range(3), range(121, 131)) + second(range(3))
              + first([3], range(121, 131)) + second([3]))
    for records in (in_order, lagged):
        d: StepStragglerDetector[None] = StepStragglerDetector()
        found = [(f.rank, f.step) for m, s, v in records for f in d.add(m, s, v, None)]
        assert found == [("3", 110)] and d.restarts == 1


def test_straggler_one_finding_per_episode_and_a_small_single_step_is_not_one():
    from rankwatch.models.straggler import StepStragglerDetector

    d: StepStragglerDetector[None] = StepStragglerDetector()
    slow = {(2, 20): 1.4,  # one 1.4x step (a garbage collection): not a straggler
            **{(5, s): 1.4 for s in range(40, 50)},  # 1.4x for 10 steps: raised at its second step, once
            **{(7, s): 2.5 for s in range(60, 63)}, (7, 70): 2.5}  # 2.5x: at once; again after a normal step
    found = [(f.rank, f.step) for step in range(1, 100) for r in range(8)
             for f in d.add(r, step, slow.get((r, step), 1.0) * (1 + 0.002 * ((r + step) % 3)), None)]
    assert found == [(5, 41), (7, 60), (7, 70)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(-5, 60)), max_size=80), st.integers(-5, 65))
def test_the_latest_index_counts_as_walking_every_member_would(updates, pos):
    # the cross-rank checks' "how many ranks are at or past this step" (models/latest_index.py)
    from rankwatch.models.latest_index import LatestIndex

    index, latest = LatestIndex(), {}
    for member, step in updates:
        index.set(member, step)
        latest[member] = step
        assert len(index) == len(latest)
    assert index.at_least(pos) == sum(1 for s in latest.values() if s >= pos)
    assert LatestIndex(latest.items()).at_least(pos) == index.at_least(pos)
