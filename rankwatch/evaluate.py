"""Measured detection quality: labelled scenarios -> anomalies -> precision, recall and delay per fault type.

`rankwatch eval --seeds 20 [--path offline|stream|both]`. The same scenarios run through `analyze` (offline) or
through the real shipper, broker and worker (stream).
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rankwatch.simulate import Fault, Scenario, write_job

# fault kind -> (detectors, signals) whose anomalies it explains
FAMILIES: dict[str, tuple[set[str], set[str]]] = {
    "loss_spike": ({"mad", "relative_change", "fixed"}, {"loss"}),
    "grad_explosion": ({"mad", "relative_change", "fixed"}, {"grad_norm"}),
    "nonfinite": ({"nonfinite"}, {"loss", "grad_norm"}),
    "throughput_drop": ({"throughput", "step_time"}, {"throughput", "step_time_s"}),
}


def labelled_scenario(seed: int, ranks: int = 8, steps: int = 300) -> Scenario:
    """Seeded job with 2 loss spikes, 2 grad explosions, a NaN, a job-wide throughput drop, a straggler rank, and
    a slow loss drift that must NOT be flagged; faults do not overlap on a rank. The straggler (0.1-0.4 s late on
    every collective) slows every rank's steps, as in synchronous training; whether it is named is measured on
    collective timing (rankwatch/eval_ops.py), here it only explains the step-time and throughput anomalies it
    causes on every rank."""
    rng = np.random.default_rng(10_000 + seed)
    faults: list[Fault] = []
    taken: dict[int, list[tuple[int, int]]] = defaultdict(list)

    def place(kind: str, length: int, magnitude: float, rank: int | None = None) -> None:
        for _ in range(100):
            r = int(rng.integers(0, ranks)) if rank is None else rank
            s = int(rng.integers(60, steps - length - 5))
            spans = taken[r] if r >= 0 else [sp for v in taken.values() for sp in v]
            if all(s + length + 25 < a or s > b + 25 for a, b in spans):
                taken[r].append((s, s + length))
                faults.append(Fault(kind, r, s, length, magnitude))
                return

    place("throughput_drop", int(rng.integers(4, 9)), float(rng.uniform(1.6, 2.5)), rank=-1)
    place("straggler", int(rng.integers(8, 16)), 0.1 + 0.6 * (float(rng.uniform(1.5, 2.0)) - 1.5))
    for _ in range(2):
        place("loss_spike", 1, float(rng.uniform(1.5, 3.0)))
        place("grad_explosion", 1, float(rng.uniform(4.0, 20.0)))
    place("nonfinite", 1, 1.0)
    drift_rank = next(r for r in range(ranks) if not taken[r]) if any(not taken[r] for r in range(ranks)) else 0
    faults.append(Fault("drift", drift_rank, steps // 3, steps - steps // 3, 1.3))
    return Scenario(ranks=ranks, steps=steps, seed=seed, faults=faults)


def _matches(f: Fault, a: dict[str, Any], tolerance: int = 1) -> bool:
    step = (a.get("context") or {}).get("step")
    if step is None or not (f.step <= step <= f.step + f.length - 1 + tolerance):
        return False
    job_wide = f.rank == -1 or (f.kind == "straggler" and a.get("signal") in ("step_time_s", "throughput"))
    return job_wide or a.get("rank") == f.rank


@dataclass
class Quality:
    tp: int = 0
    fp: int = 0
    faults: int = 0
    detected: int = 0
    delays: list[float] = field(default_factory=list)  # steps (training eval) or seconds (ops eval)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.detected / self.faults if self.faults else 1.0


def score(scenarios: list[Scenario], anomalies_by_job: dict[str, list[dict]]) -> tuple[dict[str, Quality], int]:
    """Per fault type quality, and the number of anomalies raised on the drift (which must be none)."""
    q = {kind: Quality() for kind in FAMILIES}
    drift_alarms = 0
    for sc in scenarios:
        found = anomalies_by_job.get(job_name(sc), [])
        for f in sc.faults:
            if f.kind == "drift":  # alarms on the drifting rank once the drift has begun
                drift_alarms += sum(1 for a in found if a["signal"] == "loss" and a["detector"] != "nonfinite"
                                    and a.get("rank") == f.rank and (a.get("context") or {}).get("step", -1)
                                    >= f.step and not any(_matches(g, a) for g in sc.faults if g.kind != "drift"))
                continue
            if f.kind not in FAMILIES:
                continue  # judged elsewhere (the straggler: rankwatch/eval_ops.py)
            dets, sigs = FAMILIES[f.kind]
            hits = [a for a in found if a["detector"] in dets and a["signal"] in sigs and _matches(f, a)]
            q[f.kind].faults += 1
            if hits:
                q[f.kind].detected += 1
                q[f.kind].delays.append(min(a["context"]["step"] for a in hits) - f.step)
        for a in found:
            kinds = [k for k, (dets, sigs) in FAMILIES.items() if a["detector"] in dets and a["signal"] in sigs]
            for kind in kinds:
                if any(f.kind == kind and _matches(f, a) for f in sc.faults):
                    q[kind].tp += 1
                elif not any(f.kind not in (kind, "drift") and _matches(f, a) for f in sc.faults):
                    q[kind].fp += 1  # explained by no fault (an alarm on the drift counts against it too)
    return q, drift_alarms


def job_name(sc: Scenario) -> str:
    return f"eval-seed{sc.seed}"


def run_offline(scenarios: list[Scenario], root: str) -> dict[str, list[dict]]:
    from rankwatch.processors.offline import analyze

    return {job_name(sc): [a.to_dict() for a in analyze([os.path.join(root, job_name(sc))])] for sc in scenarios}


def write_scenarios(scenarios: list[Scenario], root: str) -> int:
    return sum(write_job(sc, os.path.join(root, job_name(sc))) for sc in scenarios)


def report(title: str, q: dict[str, Quality], drift_alarms: int) -> list[str]:
    lines = [f"{title}", f"{'fault type':<16} {'faults':>6} {'precision':>9} {'recall':>7} {'delay mean/max (steps)':>23}"]
    for kind, x in q.items():
        delay = f"{np.mean(x.delays):.2f} / {max(x.delays)}" if x.delays else "-"
        lines.append(f"{kind:<16} {x.faults:>6} {x.precision:>9.3f} {x.recall:>7.3f} {delay:>23}")
    lines.append(f"alarms on slow loss drifts (must be 0): {drift_alarms}")
    return lines


def evaluate(seeds: int = 20, ranks: int = 8, steps: int = 300, path: str = "offline",
             bootstrap: str | None = None) -> tuple[list[str], dict[str, dict[str, Quality]]]:
    scenarios = [labelled_scenario(s, ranks, steps) for s in range(seeds)]
    results: dict[str, dict[str, Quality]] = {}
    out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rankwatch-eval-") as root:
        write_scenarios(scenarios, root)
        if path in ("offline", "both"):
            q, drift = score(scenarios, run_offline(scenarios, root))
            results["offline"] = q
            out += report(f"rankwatch analyze: {seeds} seeds x {ranks} ranks x {steps} steps", q, drift)
        if path in ("stream", "both"):
            from rankwatch.stream_eval import run_stream

            q, drift = score(scenarios, run_stream(scenarios, root, bootstrap))
            results["stream"] = q
            out += [""] + report(f"streaming (shipper -> broker -> worker): {seeds} seeds", q, drift)
    return out, results
