"""Measured collective-timing quality: stragglers, slow streams, hangs, and false alarms on long normal runs.

`rankwatch eval --suite ops`. Per seed three jobs of the simulator's synchronous DP x TP timeline
(rankwatch/sim_collectives.py): one with a straggler (0.1-0.4 s late on every op for 30-60 steps) and a slow
stream (x1.5-3 intervals for ~50 ops) on other ranks and times, one that hangs, and one long normal run with
drift and evaluation pauses. Half the hangs go on to the watchdog's lines (in half of those the stalled rank
crashed: its GPU's memory is freed while the others hold theirs); in the other half the logs just end
(offline, `rankwatch analyze` then judges the silence since their end). Half the normal runs are cancelled by
Slurm mid-run (each rank dies within 2 s of the cancel): no hang. Half of those have the banner in the job's
Slurm output; the other half have no Slurm output, only the GPU sampler showing every GPU's memory freed. Faults
are matched by rank and time, not step: collectives carry no step number.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rankwatch.evaluate import Quality
from rankwatch.sim_collectives import build_timeline
from rankwatch.simulate import Fault, Scenario, write_job

KINDS = {"straggler": {"straggler"}, "slow_stream": {"op_timing"}, "hang": {"hang"}}
TIERS = {"straggler": ((0.1, 0.2), (0.2, 0.4)), "slow_stream": ((1.5, 2.0), (2.0, 3.0))}


@dataclass
class OpsQuality(Quality):
    """The training eval's counts (precision, recall, delays in seconds here), plus who was named and recall per
    magnitude tier."""

    named: int = 0  # straggler/hang: the right rank named
    by_tier: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))


@dataclass
class LabelledJob:
    name: str
    scenario: Scenario
    windows: dict[int, tuple[float, float]]  # fault index -> (start, end) event time
    normal: bool = False
    op_records: int = 0  # ops the job logged (up to its cancellation, if any)


def scenarios(seed: int, ranks: int = 8, steps: int = 400, normal_steps: int = 1200) -> list[LabelledJob]:
    rng = np.random.default_rng(20_000 + seed)
    tier = seed % 2  # half the seeds subtle, half obvious
    lag = float(rng.uniform(*TIERS["straggler"][tier]))
    factor = float(rng.uniform(*TIERS["slow_stream"][tier]))
    straggler_rank, slow_rank = (int(x) for x in rng.choice(ranks, 2, replace=False))
    stream = "tp" if rng.random() < 0.5 else "dp"
    ops_per_step = 4 if stream == "tp" else 3
    s1 = int(rng.integers(80, 140))
    s2 = int(rng.integers(s1 + 90, steps - 40))
    common: dict[str, Any] = {"ranks": ranks, "seed": seed, "step_drift": float(rng.uniform(0.0, 0.1)),
                              "nccl_style": ("2.14", "2.18", "2.19")[seed % 3], "watchdog_s": 120.0}
    faulty = Scenario(steps=steps, faults=[
        Fault("straggler", straggler_rank, s1, int(rng.integers(30, 61)), lag),
        Fault("slow_stream", slow_rank, s2, max(50 // ops_per_step, 1), factor, stream=stream)], **common)
    # odd seeds: the logs end at the hang (the scheduler killed the job; no watchdog line, nothing after it)
    hang = Scenario(steps=steps, faults=[Fault("hang", int(rng.integers(0, ranks)), int(rng.integers(150, 350)))],
                    pauses={int(rng.integers(60, 140)): float(rng.uniform(5, 20))}, hang_tail=seed % 2 == 0,
                    hang_crash=seed % 4 == 2, **common)
    normal = Scenario(steps=normal_steps, faults=[], **{**common, "seed": seed + 50_000},
                      pauses={int(s): float(rng.uniform(5, 30)) for s in rng.integers(100, normal_steps - 50, 3)})
    cancel_at = float(rng.uniform(0.4, 0.9))
    if seed % 2:  # odd seeds: Slurm cancels the normal run mid-step; its ranks die within 2 s of each other
        normal.cancel_s = cancel_at * normal_steps * normal.step_s
        if seed % 4 == 3:  # ... and half of those leave no Slurm output, only the GPUs' memory freed
            normal.slurm_output, normal.gpu_after_exit_s = False, 60.0
    out = []
    for name, sc, is_normal in (("faulty", faulty, False), ("hang", hang, False), ("normal", normal, True)):
        tl = build_timeline(sc)
        end = sc.start_ts + sc.cancel_s if sc.cancel_s is not None else math.inf
        out.append(LabelledJob(f"ops-seed{seed}-{name}", sc, tl.windows, is_normal,
                               sum(1 for e in tl.ops if e.ts <= end)))
    return out


def _match(f: Fault, window: tuple[float, float], a: dict[str, Any], hang_slack: float) -> bool:
    t = a["event_time_s"]
    if f.kind == "hang":
        return window[0] <= t <= window[0] + hang_slack
    return a.get("rank") == f.rank and window[0] - 1.0 <= t <= window[1] + 5.0


def score(jobs: list[LabelledJob], found: dict[str, list[dict]], hang_threshold_s: float = 30.0
          ) -> tuple[dict[str, OpsQuality], dict[str, Any]]:
    q = {k: OpsQuality() for k in KINDS}
    normal = {"op_records": 0, "alarms": defaultdict(int), "victim_alarms": 0}
    slack = 2 * hang_threshold_s
    for job in jobs:
        anomalies = found.get(job.name, [])
        if job.normal:
            normal["op_records"] += job.op_records
            for a in anomalies:
                if a["detector"] in ("op_timing", "straggler", "hang"):
                    normal["alarms"][a["detector"]] += 1
            continue
        for i, f in enumerate(job.scenario.faults):
            win = job.windows[i]
            hits = [a for a in anomalies if a["detector"] in KINDS[f.kind] and a.get("severity") != "info"
                    and _match(f, win, a, slack)]
            qq = q[f.kind]
            qq.faults += 1
            tier = "-".join(map(str, next((t for t in TIERS.get(f.kind, ()) if t[0] <= f.magnitude <= t[1]),
                                          ("all",))))
            qq.by_tier[tier][0] += 1
            if hits:
                qq.detected += 1
                qq.by_tier[tier][1] += 1
                qq.delays.append(min(a["event_time_s"] for a in hits) - win[0])
                if f.kind == "hang":
                    qq.named += any(f.rank in (a["context"].get("stalled_ranks") or []) for a in hits)
                else:
                    qq.named += any(a.get("rank") == f.rank for a in hits)
            if f.kind == "straggler":  # the victims: every other rank waits for the straggler
                normal["victim_alarms"] += sum(1 for a in anomalies if a["detector"] == "op_timing"
                                               and a.get("rank") != f.rank and win[0] <= a["event_time_s"]
                                               <= win[1] + 5.0)
        for a in anomalies:
            if a.get("severity") == "info":
                continue  # a hang's "resolved" note
            for kind, dets in KINDS.items():
                if a["detector"] not in dets:
                    continue
                explained = [f for i, f in enumerate(job.scenario.faults) if _match(f, job.windows[i], a, slack)]
                if any(f.kind == kind for f in explained):
                    q[kind].tp += 1
                elif not explained:
                    q[kind].fp += 1
    return q, normal


def bar_met(q: dict[str, OpsQuality], normal: dict[str, Any], hang_threshold_s: float = 30.0) -> bool:
    """The issue's bar: precision and recall >= 0.9 per fault type, the straggler named in >= 95% of runs, hangs
    reported within 2x the threshold (scored by the match window), zero op-timing alarms on victims."""
    return (all(x.precision >= 0.9 and x.recall >= 0.9 for x in q.values())
            and q["straggler"].named >= 0.95 * q["straggler"].faults
            and all(d <= 2 * hang_threshold_s for d in q["hang"].delays)
            and normal["victim_alarms"] == 0)


def _folder(root: str, job: LabelledJob, stream_group: int) -> str:
    seed = int(job.name.split("seed")[1].split("-")[0])
    return os.path.join(root, f"group{seed - seed % stream_group}", job.name)


def run_offline(jobs: list[LabelledJob], root: str, stream_group: int = 4, detection: Any = None
                ) -> dict[str, list[dict]]:
    """`detection`: a DetectionConfig (default: the defaults)."""
    from rankwatch.processors.offline import analyze

    return {j.name: [_with_time(a.to_dict(), a.event_time) for a in
                     analyze([_folder(root, j, stream_group)], detection=detection)] for j in jobs}


def _with_time(d: dict[str, Any], t: float) -> dict[str, Any]:
    d["event_time_s"] = t
    return d


def report(title: str, q: dict[str, OpsQuality], normal: dict[str, Any]) -> list[str]:
    lines = [title, f"{'fault type':<12} {'faults':>6} {'precision':>9} {'recall':>7} {'named':>6} "
                    f"{'delay mean/max (s)':>19}  recall by magnitude"]
    for kind, x in q.items():
        delay = f"{np.mean(x.delays):.1f} / {max(x.delays):.1f}" if x.delays else "-"
        tiers = "  ".join(f"{t}: {d}/{n}" for t, (n, d) in sorted(x.by_tier.items()))
        named = f"{x.named / x.detected:.2f}" if x.detected else "-"
        lines.append(f"{kind:<12} {x.faults:>6} {x.precision:>9.3f} {x.recall:>7.3f} {named:>6} {delay:>19}  {tiers}")
    per10k = {k: v / max(normal["op_records"], 1) * 1e4 for k, v in normal["alarms"].items()}
    lines.append(f"normal runs: {normal['op_records']} op records, alarms {dict(normal['alarms']) or 0} "
                 f"({', '.join(f'{k} {v:.2f}' for k, v in per10k.items()) or '0'} per 10k ops); "
                 f"op-timing alarms on straggler victims: {normal['victim_alarms']}")
    return lines


def _count_lines(folder: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                total += sum(1 for _ in fh)
    return total


def evaluate_ops(seeds: int = 20, path: str = "offline", bootstrap: str | None = None, ranks: int = 8,
                 steps: int = 400, normal_steps: int = 1200, stream_group: int = 4, detection: Any = None
                 ) -> tuple[list[str], dict[str, Any]]:
    """`detection` (a DetectionConfig) applies to the offline path; the stream's worker reads its own config."""
    jobs = [j for s in range(seeds) for j in scenarios(s, ranks, steps, normal_steps)]
    out: list[str] = []
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rankwatch-eval-ops-") as root:
        for j in jobs:
            write_job(j.scenario, _folder(root, j, stream_group))
        if path in ("offline", "both"):
            q, normal = score(jobs, run_offline(jobs, root, stream_group, detection))
            results["offline"] = (q, normal)
            out += report(f"collective timing, rankwatch analyze: {seeds} seeds x {ranks} ranks", q, normal)
        if path in ("stream", "both"):
            from rankwatch.parsing import parse_iso
            from rankwatch.stream_eval import run_stream_jobs

            # a few seeds' jobs per run: each run is a worker catching up a backlog of a dozen jobs (as after a
            # restart); dozens of jobs' backlogs at once would measure the backlog, not the detectors
            found: dict[str, list[dict]] = {}
            for first in range(0, seeds, stream_group):
                group = [j for j in jobs if first <= int(j.name.split("seed")[1].split("-")[0]) < first + stream_group]
                sub = os.path.join(root, f"group{first}")
                n = sum(_count_lines(os.path.join(sub, j.name)) for j in group)
                found.update(run_stream_jobs(sub, n, bootstrap, settle_s=35.0))
            for items in found.values():
                for a in items:
                    a["event_time_s"] = parse_iso(a["event_time"])
            q, normal = score(jobs, found)
            results["stream"] = (q, normal)
            out += [""] + report(f"collective timing, streaming: {seeds} seeds, {stream_group} per worker run", q,
                                 normal)
    return out, results
