"""Stage 2 takes summaries from other workers (another version, a corrupt message): a malformed one of any type is
counted in the pipeline's errors and skipped, changes no verdict, and never stops the job's other summaries."""

from __future__ import annotations

import copy
from typing import Any

from rankwatch.processors.offline import read_records
from rankwatch.processors.pipeline import Pipeline

from rankwatch.simulate import Fault, Scenario, write_job

# a field of each summary type, and a value that cannot be read as what it must be
CORRUPT: dict[str, tuple[str, Any]] = {
    "step": ("value", "x"), "gpu_mem": ("share", None), "log": ("ts", "x"), "clock": ("ts", "later"),
    "ops": ("ts", ["x"]), "nccl_init": ("rank", "x"), "nccl_timeout": ("ts", None), "job_stop": ("ts", "x"),
    "gpu_exit": ("gpu", "x"), "slowdown": ("anomaly", {"detector": "step_time"}), "pause": ("ts", "x"),
}


def _batches(tmp_path) -> list[list[dict]]:
    sc = Scenario(ranks=4, steps=220, seed=3, watchdog_s=5.0, cancel_s=300.0, gpu_after_exit_s=30.0, faults=[
        Fault("straggler", rank=1, step=60, length=40, magnitude=0.3), Fault("hang", rank=2, step=200)])
    write_job(sc, tmp_path)
    records = list(read_records([str(tmp_path)]))
    first = Pipeline()
    return [first.first_stage(records[i:i + 500])[1] for i in range(0, len(records), 500)]


def _judge(batches: list[list[dict]]) -> tuple[list[tuple], int]:
    p = Pipeline()
    found = [a for b in batches for a in p.second_stage(b)] + p.finish()
    return sorted((a.detector, a.rank, round(a.event_time, 3)) for a in found), p.errors


def test_a_malformed_summary_of_any_type_is_counted_and_changes_no_verdict(tmp_path):
    batches = _batches(tmp_path)
    seen = {s.get("type") for b in batches for s in b}
    assert set(CORRUPT) <= seen, f"the scenario must produce every summary type, missing {set(CORRUPT) - seen}"
    clean, errors = _judge(batches)
    assert errors == 0
    assert {"straggler", "hang"} <= {d for d, _, _ in clean}

    corrupted, done = [], set()
    for b in batches:
        out = []
        for s in b:
            t = s.get("type")
            if t in CORRUPT and t not in done:  # a broken copy just before the first of each type
                key, value = CORRUPT[t]
                out.append({**copy.deepcopy(s), key: value})
                done.add(t)
            out.append(s)
        corrupted.append(out)
    verdicts, errors = _judge(corrupted)
    assert errors == len(CORRUPT)
    assert verdicts == clean


# fields that only some of a summary type's stage-2 readers use: each reader refuses the summary alike
MORE_CORRUPT = [("gpu_mem", "rank", "x"), ("gpu_mem", "bucket", "x"), ("job_stop", "offset", "x"),
                ("gpu_exit", "ts", None)]


def test_a_summary_malformed_in_a_field_only_one_reader_uses_is_counted_once_and_used_by_none(tmp_path):
    batches = _batches(tmp_path)
    clean, _ = _judge(batches)
    for t, key, value in MORE_CORRUPT:
        corrupted, done = [], False
        for b in batches:
            out = []
            for s in b:
                if s.get("type") == t and not done:
                    out.append({**copy.deepcopy(s), key: value})
                    done = True
                out.append(s)
            corrupted.append(out)
        assert done, t
        verdicts, errors = _judge(corrupted)
        assert errors == 1, (t, key)
        assert verdicts == clean, (t, key)


def test_a_pause_naming_a_step_that_is_no_number_is_counted():
    p = Pipeline()
    bad = {"type": "pause", "job": "j", "ts": 1.0, "what": "checkpoint /ckpt", "member": "0", "step": "x"}
    good = {**bad, "step": 100}
    assert p.second_stage([bad, good]) == [] and p.errors == 1
