"""GPU memory: detection quality on simulated runs, sampler overhead, and pipeline throughput of GPU samples.

    python bench/bench_memory.py                    # all three, 20 seeds (about 3 min on 2 cores)
    python bench/bench_memory.py --quality --seeds 20
    python bench/bench_memory.py --overhead --throughput [--stream]

Quality: leaks of 10 MB/min to 200 MB/s, fast ramps, 2 h stable runs with multi-GiB sawtooth swings, fragmentation
growth and imbalanced jobs from rankwatch/sim_memory.py, judged by the same pipeline as the worker
(rankwatch/memory_eval.py explains the scoring). Overhead: the sampler's own cost per GPU sample around an
NVML-like function (the driver's calls are not timed: no GPU here). Throughput: GPU samples per second through
`Pipeline.first_stage` + `second_stage` in micro-batches of 500, as the worker runs them; with --stream, through
the embedded broker and a real worker.
"""

from __future__ import annotations

import argparse
import sys
import time
import types

from rich.progress import Progress

from rankwatch.memory_eval import LEAK_TIERS, evaluate_memory, report_lines


def quality(seeds: int, hook_peaks: bool = False) -> None:
    total = seeds * (len(LEAK_TIERS) + 4)
    with Progress(transient=True) as progress:
        task = progress.add_task("simulated runs", total=total)
        q = evaluate_memory(seeds, progress=lambda _: progress.advance(task), hook_peaks=hook_peaks)
    print(f"GPU memory detection quality, {seeds} seeds per scenario"
          + (" (the hook's runs send each interval's peak: memory_peaks=True)" if hook_peaks else ""))
    print("\n".join(report_lines(q)))
    for line in q.stable_alarms:
        print("stable-run alarm:", line)


def _fake_pynvml(n_gpus: int) -> types.ModuleType:
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    mem = types.SimpleNamespace(used=40 * 2**30, total=80 * 2**30)
    util = types.SimpleNamespace(gpu=97)
    procs = [types.SimpleNamespace(usedGpuMemory=39 * 2**30)]
    m.NVMLError, m.NVML_TEMPERATURE_GPU = NVMLError, 0
    m.nvmlInit = lambda: None
    m.nvmlDeviceGetCount = lambda: n_gpus
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetMemoryInfo = lambda h: mem
    m.nvmlDeviceGetUtilizationRates = lambda h: util
    m.nvmlDeviceGetTemperature = lambda h, k: 64
    m.nvmlDeviceGetPowerUsage = lambda h: 610_000
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: procs
    return m


def overhead(n: int = 2000, gpus: int = 8) -> None:
    from rankwatch.producers.gpu import GpuSampler, nvml_sample_fn

    from rankwatch.records import encode_record

    sys.modules["pynvml"] = _fake_pynvml(gpus)
    sampler = GpuSampler(nvml_sample_fn(), "bench", "node0", {i: i for i in range(gpus)})
    t = time.perf_counter()
    for _ in range(n):
        for rec in sampler.sample():
            rec.key().encode()
            encode_record(rec)
    per = (time.perf_counter() - t) / (n * gpus)
    print(f"sampler: {per * 1e6:.1f} us of CPU per GPU sample (NVML wrapper, record, key, encoding; the driver's "
          f"own calls excluded), i.e. {per * gpus * 100:.4f}% of one core for {gpus} GPUs at 1 Hz")
    del sys.modules["pynvml"]


def _leaking(gpus: int, tier: str, hook_peaks: bool = False) -> list:
    """GPUs that all leak at `tier`'s rate, spread over hosts of 8."""
    from rankwatch.sim_memory import leak_run

    runs = []
    for g in range(gpus):
        r = leak_run(g, tier, hook_peaks)
        r.host, r.gpu = f"node{g // 8:03d}", g % 8
        for s in r.samples:
            s["host"], s["gpu"] = r.host, r.gpu
        runs.append(r)
    return runs


def _records(gpus: int, seconds: int, leaking: bool = False) -> list:
    """A fleet of steady GPUs (jobs of 8-16, one imbalanced per pair of jobs), or of GPUs that all leak (every
    evaluation then fits every window: the worst case)."""
    from rankwatch.sim_memory import imbalance_job, to_records

    if leaking:
        runs = _leaking(gpus, "10MB/s")
        return [rec for rec in to_records(runs) if rec.ts - runs[0].samples[0]["ts"] < seconds]
    runs = []
    for job in range((gpus + 15) // 16):
        runs += imbalance_job(job, job % 2 == 0, duration=float(seconds))
    return to_records(runs[:gpus])


def _judge_seconds(recs: list) -> float:
    """Seconds one pipeline takes over `recs` in the worker's micro-batches of 500 (both stages)."""
    from rankwatch.processors.pipeline import Pipeline

    p = Pipeline()
    t = time.perf_counter()
    for i in range(0, len(recs), 500):
        found, summaries = p.first_stage(recs[i:i + 500])
        p.second_stage(summaries)
    return time.perf_counter() - t


def throughput(gpus: int = 64, seconds: int = 900) -> None:
    for leaking in (False, True):
        recs = _records(gpus, seconds, leaking)
        dt = _judge_seconds(recs)
        what = "every GPU leaking (worst case)" if leaking else "steady GPUs"
        print(f"pipeline, {what}: {len(recs) / dt:,.0f} GPU samples/s ({len(recs):,} samples of {gpus} GPUs, "
              f"one process: {len(recs) / dt:,.0f} GPUs sampled at 1 Hz per worker core)")


def throughput_history(gpus: int = 16) -> None:
    """The costliest case: GPUs leaking for hours (every window from 40 s to 2.8 h fitted at every 5 s
    evaluation), half with the hook's allocator stats and interval peaks (four fits per GPU instead of two)."""
    from rankwatch.sim_memory import to_records

    runs = _leaking(gpus, "60MB/min", hook_peaks=True)
    recs = to_records(runs)
    seconds = [r.samples[-1]["ts"] - r.samples[0]["ts"] for r in runs]
    evaluations = sum(seconds) / 5.0  # one per 5 s bucket
    dt = _judge_seconds(recs)
    print(f"pipeline, {gpus} GPUs leaking for {sum(seconds) / 3600 / gpus:.1f} h each (1-5 s samples, half with "
          f"allocator stats and interval peaks): {len(recs) / dt:,.0f} samples/s, {1e3 * dt / evaluations:.2f} ms "
          f"per GPU evaluation (every 5 s): one core keeps up with ~{5 * evaluations / dt:,.0f} such GPUs")


def stream(gpus: int = 64, seconds: int = 900) -> None:
    import os
    import subprocess
    import tempfile
    import urllib.request

    from rankwatch.producers.gpu import GpuPublisher, GpuSamplerConfig, SamplerMetrics

    from rankwatch.broker import EmbeddedBroker, ensure_topics, free_port
    from rankwatch.config import Settings

    recs = _records(gpus, seconds)
    with tempfile.TemporaryDirectory(), EmbeddedBroker() as broker:
        s = Settings(bootstrap=broker.bootstrap, partitions=8, app_id=f"bench-mem-{int(time.time())}")
        ensure_topics(s)
        port = free_port()
        worker = subprocess.Popen([sys.executable, "-m", "rankwatch.cli", "worker", "--embedded", "--metrics-port",
                                   str(port)], env={**os.environ, **s.env()}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            from prometheus_client import CollectorRegistry

            pub = GpuPublisher(s, GpuSamplerConfig(buffer_samples=len(recs) + 1), SamplerMetrics(CollectorRegistry()))
            pub.start()
            pub.offer(recs)
            pub.close(120)

            def consumed() -> float:
                try:
                    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                except OSError:
                    return 0.0
                return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
                           if x.startswith('rankwatch_events_total{kind="gpu"}'))

            while consumed() < 1:
                time.sleep(0.05)
            t0, n0 = time.perf_counter(), consumed()
            while consumed() < len(recs):
                time.sleep(0.05)
            dt = time.perf_counter() - t0
            print(f"worker (embedded broker, 1 worker): {(len(recs) - n0) / dt:,.0f} GPU samples/s "
                  f"({len(recs):,} samples of {gpus} GPUs, backlog consumed from the topic)")
        finally:
            worker.terminate()
            worker.wait(20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--hook-peaks", action="store_true",
                    help="quality: runs with allocator stats also send peak_allocated_bytes (TrainingMonitor "
                         "memory_peaks=True)")
    a = ap.parse_args()
    everything = not (a.quality or a.overhead or a.throughput or a.stream)
    if a.overhead or everything:
        overhead()
    if a.throughput or everything:
        throughput()
        throughput_history()
    if a.stream:
        stream()
    if a.quality or everything:
        quality(a.seeds, a.hook_peaks)


if __name__ == "__main__":
    main()
