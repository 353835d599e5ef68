"""GPU memory detectors (models/memory*.py, models/oom.py, models/imbalance.py) and their pipeline stage."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from rankwatch.models.gpu_memory import GpuMemoryDetector
from rankwatch.models.imbalance import ImbalanceConfig, MemoryImbalanceDetector
from rankwatch.models.memory import MemoryDetectorConfig
from rankwatch.models.memory_series import repeated_median_slope
from rankwatch.processors.offline import run_pipeline
from rankwatch.processors.pipeline import DetectionConfig, Pipeline

from rankwatch.records import Record

GIB = 2**30
MIB = 2**20


def sawtooth_samples(seconds: int, base: float, amp: float, leak: float = 0.0, step_s: float = 2.3,
                     total: float = 80 * GIB, seed: int = 0, stats: bool = False, t0: float = 1e9):
    """1 Hz samples of a training step's sawtooth (activations rise in forward, fall in backward)."""
    rng = random.Random(seed)
    out = []
    for i in range(seconds):
        phase = ((i + rng.uniform(-0.1, 0.1)) / step_s) % 1.0
        act = amp * (phase / 0.4 if phase < 0.4 else 1 - (phase - 0.4) / 0.6)
        persistent = base + leak * i
        used = min(total, persistent + act + rng.uniform(0, 32 * MIB))
        d = {"host": "node7", "gpu": 3, "mem_used_bytes": used, "mem_total_bytes": total}
        if stats:
            d.update(allocated_bytes=used - 512 * MIB, reserved_bytes=used - 300 * MIB, num_alloc_retries=0,
                     num_ooms=0)
        out.append((t0 + i, d))
    return out


def run(det: GpuMemoryDetector, samples) -> list:
    found = []
    for ts, d in samples:
        for f in det.update(ts, d):
            f.context["ts"] = ts
            found.append(f)
    return found


def test_repeated_median_ignores_a_step_and_outliers_but_follows_a_ramp():
    t = np.arange(60, dtype=float)
    for at in (15, 22, 40):  # one step up (not in the window's middle third) is a new plateau, not a slope
        assert repeated_median_slope(t, np.where(t < at, 10.0, 20.0)) == 0.0
    ramp = 2.0 * t + 5.0
    ramp[[3, 17, 40]] += 500.0  # a checkpoint's buffers now and then
    assert repeated_median_slope(t, ramp) == pytest.approx(2.0, rel=0.01)


def test_leak_under_a_multi_gib_sawtooth_is_forecast_once_then_updated_as_the_eta_shrinks():
    # 40 GiB persistent + a 6 GiB sawtooth on an 80 GiB GPU, leaking 30 MB/s from the start of the leak
    leak = 30 * MIB
    samples = sawtooth_samples(600, 40 * GIB, 6 * GIB) + [
        (1e9 + 600 + i, d) for i, (_, d) in enumerate(sawtooth_samples(1400, 40 * GIB, 6 * GIB, leak, seed=1))]
    oom_at = 1e9 + 600 + (80 * GIB - 46 * GIB) / leak  # when the peak reaches total memory
    det = GpuMemoryDetector()
    found = [f for f in run(det, samples) if f.detector == "oom"]
    assert found, "the leak was not forecast"
    first = found[0]
    lead = oom_at - first.context["ts"]
    assert lead >= 60
    assert first.context["predicted_oom_time_seconds"] == pytest.approx(lead, rel=0.25)
    assert first.context["growth_rate_mb_per_sec"] == pytest.approx(30, rel=0.25)
    assert {"predicted_oom_time_seconds", "growth_rate_mb_per_sec", "current_usage_percent", "risk_level",
            "confidence", "recommendation"} <= set(first.context)
    # raised once, then a new anomaly only when the risk rises or the ETA halves: a handful, not one per sample
    assert [f.context["update"] for f in found][0] == "raised"
    assert set(f.context["update"] for f in found[1:]) <= {"risk_rose", "eta_halved"}
    assert 2 <= len(found) <= 10
    etas = [f.context["predicted_oom_time_seconds"] for f in found]
    assert all(b < a for a, b in zip(etas, etas[1:], strict=False))
    assert found[-1].severity == "critical" and found[-1].context["risk_level"] == "critical"


def test_stable_sawtooth_with_multi_gib_swings_near_full_memory_raises_nothing():
    # peaks at ~93% of the GPU, 10 GiB swings every step, an evaluation phase with smaller activations
    samples = sawtooth_samples(7200, 64 * GIB, 10 * GIB, seed=4)
    for i in range(3000, 3180):  # evaluation: no backward pass, half the activations
        ts, d = samples[i]
        d["mem_used_bytes"] = 64 * GIB + (d["mem_used_bytes"] - 64 * GIB) / 2
    det = GpuMemoryDetector()
    found = run(det, samples)
    assert [f for f in found if f.detector in ("oom", "leak")] == []
    assert det.prediction.predicted_oom_time_seconds is None  # no growth, no forecast


def test_leak_detector_needs_steady_growth_between_steps():
    cfg = MemoryDetectorConfig(leak_window_s=1200.0)
    leaking = GpuMemoryDetector(cfg)
    found = run(leaking, sawtooth_samples(3600, 30 * GIB, 4 * GIB, leak=40 * MIB / 60, seed=2))
    leaks = [f for f in found if f.detector == "leak"]
    assert len(leaks) == 1 and leaks[0].value == pytest.approx(40, rel=0.3)  # MB/min
    assert leaks[0].context["steady"] and leaks[0].context["periodic"]
    # one step up of 1 GiB (a larger segment cached once) is a new plateau, not a leak
    stepped = sawtooth_samples(3600, 30 * GIB, 4 * GIB, seed=3)
    for _ts, d in stepped[1800:]:
        d["mem_used_bytes"] += GIB
    assert [f for f in run(GpuMemoryDetector(cfg), stepped) if f.detector == "leak"] == []


def test_fragmentation_from_allocator_stats_and_retries():
    cfg = MemoryDetectorConfig(frag_window_s=120.0)
    det = GpuMemoryDetector(cfg)
    samples = []
    for i in range(600):
        reserved = 60 * GIB
        alloc = (30 if i < 300 else 38) * GIB * (0.9 + 0.1 * (i % 4) / 3)  # half the cache unusable at the peak
        samples.append((2e9 + i, {"host": "h", "gpu": 0, "mem_used_bytes": reserved + GIB, "mem_total_bytes": 80 * GIB,
                                  "allocated_bytes": alloc, "reserved_bytes": reserved,
                                  "inactive_split_bytes": 12 * GIB, "num_alloc_retries": 0 if i < 500 else 3,
                                  "num_ooms": 0}))
    found = [f for f in run(det, samples) if f.detector == "fragmentation"]
    assert len(found) == 1 and found[0].value == pytest.approx(0.5, abs=0.05)
    assert found[0].context["split_ratio"] == pytest.approx(0.2, abs=0.01)
    assert det.frag.ratio is not None
    healthy = GpuMemoryDetector(cfg)
    ok = [(2e9 + i, {**d, "allocated_bytes": 57 * GIB, "inactive_split_bytes": 0, "num_alloc_retries": 0})
          for i, (_, d) in enumerate(samples)]
    assert [f for f in run(healthy, ok) if f.detector == "fragmentation"] == []


def test_allocator_oom_count_is_critical_and_a_process_restart_starts_over():
    det = GpuMemoryDetector()
    base = {"host": "h", "gpu": 1, "mem_used_bytes": 70 * GIB, "mem_total_bytes": 80 * GIB, "allocated_bytes": 60 * GIB,
            "reserved_bytes": 68 * GIB, "num_ooms": 0}
    assert det.update(1.0, base) == []
    (f,) = det.update(2.0, {**base, "num_ooms": 1})
    assert f.detector == "oom" and f.severity == "critical" and f.context["update"] == "allocator_oom"
    for i in range(20):  # the process died: only the driver's footprint is left
        det.update(3.0 + i, {**base, "mem_used_bytes": 0.3 * GIB})
    assert det.restarts == 1 and len(det.used.fine) <= 3  # the old process's peaks are forgotten


def test_imbalance_names_the_heavy_gpu_whatever_the_order_of_summaries():
    shares = {f"n{g // 4}/{g % 4}": 0.55 + 0.005 * g for g in range(8)}
    shares["n1/2"] = 0.78
    events = [(b, gpu, s + 0.002 * ((b * 7 + i) % 3)) for b in range(10) for i, (gpu, s) in enumerate(shares.items())]
    verdicts = []
    for order in (events, sorted(events, key=lambda e: (e[1], e[0]))):  # by time; one GPU's whole run at a time
        det: MemoryImbalanceDetector = MemoryImbalanceDetector(ImbalanceConfig())
        found = [f for b, gpu, s in order for f in det.add(gpu, b, s, {"bucket": b})] + det.finish()
        verdicts.append(sorted((f.gpu, f.bucket) for f in found))
    assert verdicts[0] == verdicts[1] == [("n1/2", 2)]  # flagged in 3 buckets in a row: raised once
    balanced: MemoryImbalanceDetector = MemoryImbalanceDetector()
    assert [f for b, gpu, s in events if gpu != "n1/2" for f in balanced.add(gpu, b, s, None)] == []


def gpu_records(samples, job="j", rank=None, file="gpu.jsonl"):
    return [Record("gpu", job, rank, ts, file, i, dict(d)) for i, (ts, d) in enumerate(samples)]


def test_pipeline_stage_exports_bounded_per_gpu_gauges_and_anomalies_name_the_gpu():
    leak = 20 * MIB  # from 54 GiB peaks to 77.4 GiB in 20 min, on an 80 GiB GPU
    recs = gpu_records(sawtooth_samples(1200, 50 * GIB, 4 * GIB, leak=leak), rank=12)
    p = Pipeline()
    found = run_pipeline(p, recs)
    oom = [a for a in found if a.detector == "oom"]
    assert oom and oom[0].host == "node7" and oom[0].gpu == 3 and oom[0].rank == 12
    assert "node7/3 (rank 12)" in oom[0].message and oom[0].to_dict()["gpu"] == 3
    labels = ("j", "node7", "3")
    g = p.gauges
    assert g.get("rankwatch_gpu_memory_used_ratio", labels) == pytest.approx(
        recs[-1].data["mem_used_bytes"] / (80 * GIB), rel=0.01)
    assert g.get("rankwatch_gpu_oom_risk_level", labels) >= 2  # high or critical
    assert g.get("rankwatch_gpu_memory_growth_bytes_per_second", labels) == pytest.approx(leak, rel=0.25)
    assert g.get("rankwatch_gpu_oom_eta_seconds", labels) is not None
    assert g.get("rankwatch_gpu_oom_ordinary_eta_seconds", labels) >= g.get("rankwatch_gpu_oom_eta_seconds", labels)
    # bounded: a worker exports at most mem_gauge_max_gpus GPUs; the anomalies still name every GPU
    small = Pipeline(DetectionConfig(mem_gauge_max_gpus=1))
    other = [Record("gpu", "j", None, r.ts, r.file, r.offset, {**r.data, "gpu": 4}) for r in recs[:300]]
    small.process(recs[:300] + other)
    assert {k[2] for k in small.gauges.values["rankwatch_gpu_memory_used_ratio"]} == {"3"}


def test_gpu_state_survives_a_restart_through_json():
    from rankwatch.processors.app import load_pipeline_state, save_pipeline_state

    recs = gpu_records(sawtooth_samples(2000, 50 * GIB, 4 * GIB, leak=12 * MIB, seed=5))
    a = Pipeline()
    a.process(recs[:1000])
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_pipeline_state(a, d + "/s.json")
        b = Pipeline()
        load_pipeline_state(b, d + "/s.json")
    strip = lambda xs: [{k: v for k, v in x.to_dict().items() if k != "detected_at"} for x in xs]  # noqa: E731
    rest_a, rest_b = a.process(recs[1000:]), b.process(recs[1000:])
    assert strip(rest_a) == strip(rest_b) and any(x.detector == "oom" for x in rest_a)
    assert math.isclose(a.gauges.get("rankwatch_gpu_memory_peak_bytes", ("j", "node7", "3")),
                        b.gauges.get("rankwatch_gpu_memory_peak_bytes", ("j", "node7", "3")))


def test_usage_threshold_warns_once_when_asked_as_the_users_oom_threshold_does():
    det = GpuMemoryDetector(MemoryDetectorConfig(oom_usage_threshold_pct=85.0, oom_alert_on_usage=True))
    found = run(det, sawtooth_samples(300, 66 * GIB, 4 * GIB, seed=6))  # peaks at ~87.5% of 80 GiB
    usage = [f for f in found if f.context.get("update") == "usage_threshold"]
    assert len(usage) == 1 and usage[0].detector == "oom" and usage[0].threshold == 85.0
    assert [f for f in run(GpuMemoryDetector(), sawtooth_samples(300, 66 * GIB, 4 * GIB, seed=6))] == []


def test_allocator_view_alone_needs_a_long_window_to_forecast():
    # A caching allocator at its ceiling: NVML shows a flat plateau (76 of 80 GiB), while the allocator's
    # `allocated_bytes`, sampled at a random phase of each step, aliases into slow waves of 2 GiB every
    # ~27 min. A wave's rising flank looks like steep, sure growth for minutes; over a whole wave it is flat.
    rng = random.Random(7)
    samples = []
    for i in range(4 * 3600):
        wave = 1.0 * GIB * (1 - math.cos(2 * math.pi * i / 1600.0))
        samples.append((1e9 + i, {"host": "node7", "gpu": 3, "mem_used_bytes": 76 * GIB + rng.uniform(0, 2 * MIB),
                                  "mem_total_bytes": 80 * GIB, "reserved_bytes": 75.5 * GIB, "num_ooms": 0,
                                  "allocated_bytes": 72 * GIB + wave + rng.uniform(0, 64 * MIB),
                                  "num_alloc_retries": 0}))
    det = GpuMemoryDetector()
    assert [f for f in run(det, samples) if f.detector == "oom"] == []
    # a real leak in what the allocator holds, under the same plateau, is still forecast on a long window
    leaking = [(ts, {**d, "allocated_bytes": 72 * GIB + 2 * MIB * (ts - 1e9) + rng.uniform(0, 64 * MIB)})
               for ts, d in samples[:3000]]
    found = [f for f in run(GpuMemoryDetector(), leaking) if f.detector == "oom"]
    assert found and found[0].context["window_s"] >= 1200


def _first_forecasts(seeds: int, rate: float, to_oom: float, leak_start: float, ckpt_bump: float = 0.0,
                     troughs: bool = True, **sim: bool) -> list[tuple[float, float]]:
    """(lead, ETA error) of the first `oom` anomaly of each of `seeds` leak runs ((-1, 1) where none came): a
    releasing allocator's sawtooth (8 GiB swings, 1.2 s steps) sampled every 5 s, evaluation phases with
    smaller activations every 15 min, and with `ckpt_bump` checkpoints that stage that much for 20 s every
    30 min (the OOM then comes at one). `sim`: simulate_gpu's allocator_stats / hook_peaks."""
    from rankwatch.sim_memory import Faults, JobProfile, simulate_gpu

    p = JobProfile(total=80 * GIB, ctx=0.5 * GIB, step_s=1.2, fwd_frac=0.45, amp=8 * GIB, jitter=0.03,
                   allocator="releasing", granule=2 * MIB, interval=5.0, settle=0.3 * GIB, settle_tau=40,
                   load_s=20, eval_every=900, eval_len=150, eval_scale=0.4, eval_shift=0.2 * GIB,
                   ckpt_every=1800 if ckpt_bump else 1e9, ckpt_len=20 if ckpt_bump else 0, ckpt_bump=ckpt_bump)
    base = p.total - p.ctx - p.amp * 1.06 - ckpt_bump - rate * to_oom - p.settle
    out = []
    for seed in range(seeds):
        run_ = simulate_gpu(p, base, leak_start + 1.5 * to_oom, np.random.default_rng(seed),
                            Faults(rate, leak_start), **sim)
        assert run_.oom_ts is not None
        assert all(("peak_allocated_bytes" in s) == sim.get("hook_peaks", False) for s in run_.samples
                   if "allocated_bytes" in s)
        det = GpuMemoryDetector(MemoryDetectorConfig(oom_fit_troughs=troughs))
        first = (-1.0, 1.0)
        for s in run_.samples:
            found = [f for f in det.update(s["ts"], {k: v for k, v in s.items() if k != "ts"}) if f.detector == "oom"]
            if found:
                lead = run_.oom_ts - s["ts"]
                first = (lead, abs(found[0].context["predicted_oom_time_seconds"] - lead) / lead)
                break
        out.append(first)
    return out


def _on_time(firsts: list[tuple[float, float]]) -> int:
    return sum(lead >= 60 and err <= 0.25 for lead, err in firsts)


def test_fitting_the_troughs_forecasts_a_sparsely_sampled_leak_closer():
    # Sampled every 5 s, a 1.2 s step's sharp peak is seen by chance: the peaks' slope is noisy and an
    # evaluation phase at the start of a window steepens it. The troughs (what persists between steps) are
    # sampled far more often near their level; fitted too, more first forecasts are early and within 25%.
    with_troughs = _on_time(_first_forecasts(8, 1.0 * MIB, 5400.0, 600.0))
    peaks_only = _on_time(_first_forecasts(8, 1.0 * MIB, 5400.0, 600.0, troughs=False))
    assert with_troughs >= 6
    assert with_troughs > peaks_only


def test_the_hooks_interval_peaks_put_a_slow_leaks_first_forecast_on_time():
    # A sample every 5 s lands on a 1.2 s step's peak by chance, and on a checkpoint's few steps rarely: the
    # envelope stays under the peak that will fail and the forecast comes later and longer. The hook's
    # `peak_allocated_bytes` (torch's peak counter, reset at each sample) is that peak.
    slow = {"seeds": 8, "rate": MIB / 2, "to_oom": 2 * 3600.0, "leak_start": 0.0, "ckpt_bump": 0.8 * GIB}
    with_peaks = _first_forecasts(**slow, allocator_stats=True, hook_peaks=True)
    without = _first_forecasts(**slow, allocator_stats=True)
    assert _on_time(with_peaks) == 8 > _on_time(without)
    # earlier, and every first forecast within 10% (samples alone: up to 30% off)
    assert np.median([lead for lead, _ in with_peaks]) > np.median([lead for lead, _ in without])
    assert max(err for _, err in with_peaks) <= 0.1


def test_a_transient_peak_near_total_memory_is_a_high_risk_and_only_ordinary_peaks_make_it_critical():
    # 68 GiB persistent + a 6 GiB sawtooth, leaking 2 MiB/s: the ordinary peaks reach 80 GiB at t = 3072 s.
    # A checkpoint's buffers (+2 GiB for 20 s at t = 2000 s) come within ~0.1 GiB of total memory and do not
    # fail; the next checkpoint may be half an hour away, so "out of memory within 2 min" would be a false page.
    leak, total = 2 * MIB, 80 * GIB
    samples = sawtooth_samples(3040, 68 * GIB, 6 * GIB, leak, total=total, seed=5)
    for i in range(2000, 2020):
        ts, d = samples[i]
        d["mem_used_bytes"] = min(total - 64 * MIB, d["mem_used_bytes"] + 2 * GIB)
    ordinary_at = 1e9 + (total - 74 * GIB) / leak
    det = GpuMemoryDetector()
    found = [f for f in run(det, samples) if f.detector == "oom"]
    after = [f for f in found if f.context["ts"] >= 1e9 + 2000]
    assert after, "the checkpoint's near miss was not reported"
    near = after[0]  # the transient sets the earliest ETA, the ordinary steps the level
    assert near.context["risk_level"] == "high" and near.severity == "warning"
    left = ordinary_at - near.context["ts"]
    assert near.context["ordinary_oom_time_seconds"] == pytest.approx(left, rel=0.25)
    assert near.context["predicted_oom_time_seconds"] < 0.9 * near.context["ordinary_oom_time_seconds"]
    # carried along the slope, the transient's peak says "now" minutes before the ordinary steps reach it
    (soon, *_) = [f for f in after if f.context["predicted_oom_time_seconds"] < 120
                  and f.context["ordinary_oom_time_seconds"] > 240]
    assert soon.context["risk_level"] == "high" and "ordinary steps" in soon.message
    # updates follow the ordinary ETA: the buffers' 20 s climb is not an anomaly per halving of the transient's
    assert len([f for f in after if f.context["ts"] <= 1e9 + 2100]) == 1
    critical = [f for f in found if f.context["risk_level"] == "critical"]
    assert critical, "the ordinary peaks' approach was not raised as critical"
    assert all(ordinary_at - f.context["ts"] <= 240 for f in critical)


def test_no_forecast_is_raised_from_the_samples_of_a_process_that_just_died():
    # a fast leak sampled every 10 s; the process dies at a step's peak between two samples, and the next
    # samples show only the driver's footprint. Carried along the slope to that sample's time, the forecast
    # would say "now" (its ETA halved): it must not be raised from a process that is gone.
    leak, total = 50 * MIB, 80 * GIB
    samples = sawtooth_samples(1400, 40 * GIB, 6 * GIB, total=total, seed=2)[::10]
    ramp = sawtooth_samples(1000, 40 * GIB, 6 * GIB, leak, total=total, seed=3)[::10]
    det = GpuMemoryDetector()
    found = run(det, samples)
    for ts, d in ramp:
        found += run(det, [(ts + 1400, d)])
        p = det.prediction
        if found and p.predicted_oom_time_seconds is not None and p.predicted_oom_time_seconds < 30:
            break
    assert found and found[-1].context["risk_level"] == "critical"
    dead = ts + 1400
    after = run(det, [(dead + 15 + 10 * i, {**d, "mem_used_bytes": 0.3 * GIB}) for i in range(4)])
    assert [f.context for f in after if f.detector == "oom"] == []
    assert det.restarts == 1


def test_a_caching_allocator_holding_the_whole_gpu_is_not_an_oom_within_minutes():
    # NVML sees the caching allocator's reserved plateau: it climbs in 256 MiB segments as the leak needs them
    # (2 MiB/s) until it holds the whole GPU, then stays there while the process runs on its cache; when the
    # process will need more than that cache, NVML cannot show
    total, seg = 80 * GIB, 256 * MIB
    rng = random.Random(7)
    samples = []
    for i in range(0, 6600, 5):
        need = 70 * GIB + 2 * MIB * i
        reserved = min(total - 200 * MIB, math.ceil(need / seg) * seg)
        samples.append((1e9 + i, {"host": "h", "gpu": 0, "mem_used_bytes": reserved + rng.uniform(0, 8 * MIB),
                                  "mem_total_bytes": total}))
    pinned_at = 1e9 + (total - 200 * MIB - 70 * GIB) / (2 * MIB)
    det = GpuMemoryDetector()
    found = [f for f in run(det, samples) if f.detector == "oom"]
    assert found, "the plateau's climb was not forecast"
    assert [f.context["risk_level"] for f in found if f.context["risk_level"] == "critical"] == []
    # the line reaches total memory: minutes by the ETA, but the GPU is full and the real headroom out of sight
    near = [f for f in found if f.context["predicted_oom_time_seconds"] <= 120]
    assert near and all(f.context["risk_level"] == "high" and f.context["memory_full"]
                        and "NVML does not show" in f.message for f in near)
    assert all(f.context["ts"] < pinned_at for f in near)
    # flat at the top at last: no growth left to forecast, the usage alone keeps the risk at medium
    assert det.prediction.memory_full and det.prediction.risk_level.value == "medium"
