"""Detection quality per log format: the labelled scenarios of `rankwatch eval`, written in each framework's
format (rankwatch.sim_formats), read back through `rankwatch analyze` or the real shipper -> broker -> worker,
scored like the JSON baseline (rankwatch.evaluate.score).

A format is judged on the faults it can show: loss spikes and NaN losses everywhere, grad-norm explosions where
it prints a grad norm, throughput drops where it prints throughput or step time. (Stragglers are found in
collective timing, not in step time: rankwatch/eval_ops.py.) Formats that count steps from 1 (Megatron, DeepSpeed, torchtitan) are mapped back to the simulator's steps.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from rankwatch.evaluate import FAMILIES, Quality, job_name, labelled_scenario, report, score
from rankwatch.sim_formats import RENDERERS, SIGNALS, STEP_OFFSET, write_format_job
from rankwatch.simulate import Scenario

# fault kind -> the printed signals that can show it
FAULT_SIGNALS = {"loss_spike": {"loss"}, "grad_explosion": {"grad_norm"}, "nonfinite": {"loss"},
                 "throughput_drop": {"throughput", "step_time_s"}}
BAR_KINDS = ("loss_spike", "grad_explosion", "nonfinite")  # the bar: >= 0.9 precision and recall


def judged_kinds(fmt: str) -> list[str]:
    return [k for k, sigs in FAULT_SIGNALS.items() if sigs & SIGNALS[fmt]]


def folder(fmt: str, sc: Scenario) -> str:
    return f"{fmt}-seed{sc.seed}"


def write_all(scenarios: list[Scenario], formats: list[str], root: str) -> int:
    return sum(write_format_job(sc, fmt, os.path.join(root, folder(fmt, sc))) for fmt in formats for sc in scenarios)


def _shift(found: list[dict[str, Any]], offset: int) -> list[dict[str, Any]]:
    if not offset:
        return found
    out = []
    for a in found:
        ctx = dict(a.get("context") or {})
        if isinstance(ctx.get("step"), int):
            ctx["step"] -= offset
        out.append({**a, "context": ctx})
    return out


def score_format(fmt: str, scenarios: list[Scenario], by_folder: dict[str, list[dict[str, Any]]]
                 ) -> tuple[dict[str, Quality], int]:
    per_job = {job_name(sc): _shift(by_folder.get(folder(fmt, sc), []), STEP_OFFSET.get(fmt, 0)) for sc in scenarios}
    q, drift = score(scenarios, per_job)
    return {k: v for k, v in q.items() if k in judged_kinds(fmt)}, drift


def run_offline(scenarios: list[Scenario], formats: list[str], root: str) -> dict[str, list[dict[str, Any]]]:
    from rankwatch.processors.offline import analyze

    return {folder(fmt, sc): [a.to_dict() for a in analyze([os.path.join(root, folder(fmt, sc))])]
            for fmt in formats for sc in scenarios}


def expected_metric_records(scenarios: list[Scenario], formats: list[str], root: str) -> int:
    """How many metrics records the fixtures hold (the stream run waits for the worker to have seen them all)."""
    from rankwatch.processors.offline import AnalyzeStats, read_records

    stats = AnalyzeStats()
    for fmt in formats:
        for sc in scenarios:
            for _ in read_records([os.path.join(root, folder(fmt, sc))], stats=stats):
                pass
    return stats.records["metrics"]


def evaluate_formats(seeds: int = 20, formats: list[str] | None = None, path: str = "offline",
                     bootstrap: str | None = None, ranks: int = 8, steps: int = 300
                     ) -> tuple[list[str], dict[str, dict[str, dict[str, Quality]]]]:
    """Report lines, and results[path][format][fault kind] -> Quality."""
    formats = formats or list(RENDERERS)
    scenarios = [labelled_scenario(s, ranks, steps) for s in range(seeds)]
    results: dict[str, dict[str, dict[str, Quality]]] = {}
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rankwatch-formats-") as root:
        write_all(scenarios, formats, root)
        runs: list[tuple[str, dict[str, list[dict[str, Any]]]]] = []
        if path in ("offline", "both"):
            runs.append(("offline", run_offline(scenarios, formats, root)))
        if path in ("stream", "both"):
            from rankwatch.stream_eval import run_stream

            want = expected_metric_records(scenarios, formats, root)
            runs.append(("stream", run_stream(scenarios, root, bootstrap, expected_metrics=want)))
        for name, found in runs:
            results[name] = {}
            for fmt in formats:
                q, drift = score_format(fmt, scenarios, found)
                results[name][fmt] = q
                lines += [""] + report(f"{fmt} ({name}, {seeds} seeds x {ranks} ranks x {steps} steps)", q, drift)
    return lines, results


def bar_met(results: dict[str, dict[str, dict[str, Quality]]]) -> bool:
    return all(q.precision >= 0.9 and q.recall >= 0.9 for per_fmt in results.values() for per_kind in
               per_fmt.values() for kind, q in per_kind.items() if kind in BAR_KINDS)


__all__ = ["FAULT_SIGNALS", "BAR_KINDS", "judged_kinds", "evaluate_formats", "score_format", "bar_met",
           "write_all", "run_offline", "expected_metric_records", "FAMILIES"]
