"""Quality of the GPU memory detectors on simulated runs (rankwatch/sim_memory.py), through the same pipeline as
the worker and `rankwatch analyze`. Used by bench/bench_memory.py (the figures in docs/DETECTION.md) and by
tests/test_memory_quality.py (the bar on fewer seeds).

Scoring:
- leak runs (per tier) and fast ramps: the first `oom` anomaly's lead time before the simulated OOM (the bar:
  >= 60 s), and its ETA error at that moment, |predicted - actual| / actual;
- stable runs (sawtooth with multi-GiB swings, evaluation phases, checkpoints): every `oom`/`leak` anomaly is
  a false alarm (the bar: none), `fragmentation` ones are counted too;
- fragmentation runs: a `fragmentation` anomaly, and how long after the growth began;
- imbalanced jobs: the imbalanced GPU named by an `imbalance` anomaly (the bar: >= 95%), any other GPU named
  is a false alarm; balanced jobs: every `imbalance` anomaly is a false alarm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from rankwatch.processors.offline import run_pipeline
from rankwatch.processors.pipeline import DetectionConfig, Pipeline
from rankwatch.records import Anomaly
from rankwatch.sim_memory import (
    LEAK_TIERS,
    GpuRun,
    fragmentation_run,
    imbalance_job,
    leak_run,
    ramp_run,
    stable_run,
    to_records,
)


def judge(runs: list[GpuRun], config: DetectionConfig | None = None) -> list[Anomaly]:
    return run_pipeline(Pipeline(config), to_records(runs))


@dataclass
class LeadResult:
    runs: int = 0
    leads: list[float] = field(default_factory=list)  # seconds before OOM of the first oom anomaly (-1: none)
    eta_errors: list[float] = field(default_factory=list)  # at that first anomaly
    standing_errors: list[float] = field(default_factory=list)  # of the last one issued >= 60 s before the OOM
    leak_found: int = 0
    # critical forecasts ("out of memory within 2 min") issued more than 10 min before the OOM: a false page
    early_critical: int = 0
    early_critical_runs: int = 0
    after_oom: int = 0  # forecasts raised after the OOM (the process is gone)
    critical_runs: int = 0  # runs with a critical forecast before the OOM (the page came)

    def add(self, run: GpuRun, found: list[Anomaly]) -> None:
        self.runs += 1
        assert run.oom_ts is not None, "a leak run must end in an OOM"
        ooms = sorted((a for a in found if a.detector == "oom" and a.event_time < run.oom_ts),
                      key=lambda a: a.event_time)
        if ooms:
            lead = run.oom_ts - ooms[0].event_time
            self.leads.append(lead)
            eta = ooms[0].context.get("predicted_oom_time_seconds")
            self.eta_errors.append(abs(float(eta) - lead) / lead if eta is not None and lead > 0 else 1.0)
        else:
            self.leads.append(-1.0)
            self.eta_errors.append(1.0)
        standing = [a for a in ooms if run.oom_ts - a.event_time >= 60]
        err = 1.0
        if standing and standing[-1].context.get("predicted_oom_time_seconds") is not None:
            lead = run.oom_ts - standing[-1].event_time
            err = abs(float(standing[-1].context["predicted_oom_time_seconds"]) - lead) / lead
        self.standing_errors.append(err)
        self.leak_found += any(a.detector == "leak" for a in found)
        early = [a for a in ooms if a.context.get("risk_level") == "critical" and run.oom_ts - a.event_time > 600]
        self.early_critical += len(early)
        self.early_critical_runs += bool(early)
        self.critical_runs += any(a.context.get("risk_level") == "critical" for a in ooms)
        self.after_oom += sum(a.detector == "oom" and a.event_time > run.oom_ts
                              and a.context.get("update") != "allocator_oom" for a in found)

    @property
    def early(self) -> float:
        return sum(x >= 60 for x in self.leads) / max(1, self.runs)

    @property
    def accurate(self) -> float:
        return sum(e <= 0.25 for e in self.eta_errors) / max(1, self.runs)

    @property
    def standing(self) -> float:
        """The forecast standing 60 s before the OOM (the last one issued by then) within 25%."""
        return sum(e <= 0.25 for e in self.standing_errors) / max(1, self.runs)

    @property
    def both(self) -> float:
        return sum(x >= 60 and e <= 0.25 for x, e in zip(self.leads, self.eta_errors, strict=True)) / max(1, self.runs)


@dataclass
class MemoryQuality:
    tiers: dict[str, LeadResult] = field(default_factory=dict)
    ramp: LeadResult = field(default_factory=LeadResult)
    stable_runs: int = 0
    stable_hours: float = 0.0
    stable_alarms: list[str] = field(default_factory=list)  # oom/leak on stable runs
    stable_frag_alarms: int = 0
    frag_runs: int = 0
    frag_found: int = 0
    frag_delays: list[float] = field(default_factory=list)
    imbalance_jobs: int = 0
    imbalance_named: int = 0
    imbalance_wrong: int = 0  # other GPUs named in imbalanced jobs
    balanced_jobs: int = 0
    balanced_alarms: int = 0

    @property
    def leak_runs(self) -> LeadResult:
        total = LeadResult()
        for r in self.tiers.values():
            total.runs += r.runs
            total.leads += r.leads
            total.eta_errors += r.eta_errors
            total.standing_errors += r.standing_errors
            total.leak_found += r.leak_found
            total.early_critical += r.early_critical
            total.early_critical_runs += r.early_critical_runs
            total.after_oom += r.after_oom
            total.critical_runs += r.critical_runs
        return total

    def bar(self) -> dict[str, bool]:
        lr = self.leak_runs
        return {"forecast >= 60 s before OOM in >= 90% of leak runs": lr.early >= 0.9,
                "ETA error <= 25% at that moment (the first forecast's) in >= 90% of leak runs": lr.both >= 0.9,
                "no OOM/leak alarm on stable runs": not self.stable_alarms,
                "imbalanced GPU named in >= 95% of jobs": self.imbalance_named >= 0.95 * max(1, self.imbalance_jobs)}


def evaluate_memory(seeds: int, tiers: Iterable[str] = tuple(LEAK_TIERS), stable_s: float = 7200.0,
                    config: DetectionConfig | None = None,
                    progress: Callable[[str], None] | None = None, hook_peaks: bool = False) -> MemoryQuality:
    """`hook_peaks`: the leak and stable runs that carry allocator stats also send each interval's peak."""
    q = MemoryQuality()
    step = progress or (lambda _: None)
    for tier in tiers:
        res = q.tiers.setdefault(tier, LeadResult())
        for seed in range(seeds):
            run = leak_run(seed, tier, hook_peaks)
            res.add(run, judge([run], config))
            step(f"leak {tier}")
    for seed in range(seeds):
        run = ramp_run(seed)
        q.ramp.add(run, judge([run], config))
        step("ramp")
    for seed in range(seeds):
        run = stable_run(seed, stable_s, hook_peaks)
        found = judge([run], config)
        q.stable_runs += 1
        q.stable_hours += stable_s / 3600
        q.stable_alarms += [f"seed {seed} {run.labels}: {a.detector} {a.message}" for a in found
                            if a.detector in ("oom", "leak")]
        q.stable_frag_alarms += sum(a.detector == "fragmentation" for a in found)
        step("stable")
    for seed in range(seeds):
        run = fragmentation_run(seed)
        found = [a for a in judge([run], config) if a.detector == "fragmentation"]
        q.frag_runs += 1
        if found:
            q.frag_found += 1
            q.frag_delays.append(found[0].event_time - run.samples[0]["ts"])
        step("fragmentation")
    for seed in range(seeds):
        for imbalanced in (True, False):
            runs = imbalance_job(seed, imbalanced)
            found = [a for a in judge(runs, config) if a.detector == "imbalance"]
            named = {f"{a.host}/{a.gpu}" for a in found}
            if imbalanced:
                q.imbalance_jobs += 1
                victim = runs[0].labels["victim"]
                q.imbalance_named += victim in named
                q.imbalance_wrong += len(named - {victim})
            else:
                q.balanced_jobs += 1
                q.balanced_alarms += len(found)
        step("imbalance")
    return q


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else float("nan")


def report_lines(q: MemoryQuality) -> list[str]:
    lines = ["| scenario | runs | first forecast >= 60 s before OOM | its ETA within 25% | both | median lead | "
             "median / max ETA error | forecast standing at -60 s within 25% | leak anomaly | "
             "critical before the OOM | critical > 10 min early (runs) | after the OOM |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(name: str, r: LeadResult) -> str:
        leads = [x for x in r.leads if x >= 0]
        return (f"| {name} | {r.runs} | {_pct(r.early)} | {_pct(r.accurate)} | {_pct(r.both)} | "
                f"{_median(leads):.0f} s | {_pct(_median(r.eta_errors))} / {_pct(max(r.eta_errors, default=0))} | "
                f"{_pct(r.standing)} | {_pct(r.leak_found / max(1, r.runs))} | "
                f"{_pct(r.critical_runs / max(1, r.runs))} | {r.early_critical} ({r.early_critical_runs}) | "
                f"{r.after_oom} |")

    for tier, r in q.tiers.items():
        lines.append(row(f"leak {tier}", r))
    lines.append(row("**all leaks**", q.leak_runs))
    lines.append(row("fast ramp (0.25-1 GiB/s)", q.ramp))
    lines.append("")
    lines.append(f"stable runs: {q.stable_runs} ({q.stable_hours:.0f} h): OOM/leak alarms {len(q.stable_alarms)}, "
                 f"fragmentation alarms {q.stable_frag_alarms}")
    lines.append(f"fragmentation growth: found in {q.frag_found}/{q.frag_runs}, median "
                 f"{_median(q.frag_delays) / 60:.0f} min after the growth began")
    lines.append(f"imbalance: imbalanced GPU named in {q.imbalance_named}/{q.imbalance_jobs}, other GPUs named "
                 f"{q.imbalance_wrong}; balanced jobs: {q.balanced_alarms} alarms in {q.balanced_jobs}")
    for name, ok in q.bar().items():
        lines.append(f"bar: {name}: {'MET' if ok else 'MISSED'}")
    return lines
