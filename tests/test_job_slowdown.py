"""A slowdown on every rank of a job at once (a checkpoint, an evaluation, a slow filesystem) is one finding for
the job, not one per rank; one rank slow on its own keeps its own finding (models/job_slowdown.py)."""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone

from rankwatch.processors.offline import read_records, run_pipeline
from rankwatch.processors.pipeline import Pipeline
from rankwatch.processors.training_stage import SlowdownJob

T0 = 1_767_225_600.0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _job(root, ranks: int = 8, steps: int = 200, *, pauses: dict[int, float], own: dict[tuple[int, int], float],
         checkpoint_before: int | None = None, last_step: dict[int, int] | None = None, seed: int = 0) -> None:
    """Synchronous training: a pause of `pauses[step]` x lengthens that step on every rank; `own[(rank, step)]`
    lengthens one rank's step alone (a rank whose logged time is its own compute, as in pipeline schedules)."""
    rng = random.Random(seed)
    files = {r: open(root / f"rank{r}.log", "w") for r in range(ranks)}
    ts = T0
    for step in range(1, steps + 1):
        base = 1.0 * pauses.get(step, 1.0)
        ts += base
        if checkpoint_before == step:
            files[0].write(f"{_iso(ts - base + 0.01)} Saving checkpoint to /ckpt/run/iter_{step - 1:07d}\n")
        for r in range(ranks):
            if last_step and step > last_step.get(r, steps):
                continue
            st = base * own.get((r, step), 1.0) * (1 + rng.gauss(0, 0.01))
            files[r].write(json.dumps({"ts": ts + 0.001 * r, "step": step, "loss": 2.0 + rng.gauss(0, 0.01),
                                       "step_time_s": st, "throughput": 64 / st}) + "\n")
    for f in files.values():
        f.close()


def _slowdowns(root) -> list:
    found = run_pipeline(Pipeline(), read_records([str(root)]))
    return sorted((a for a in found if a.detector in ("step_time", "throughput")),
                  key=lambda a: (a.context["step"], a.detector, -1 if a.rank is None else a.rank))


def test_a_pause_on_every_rank_is_one_finding_per_signal_and_a_rank_alone_keeps_its_own(tmp_path):
    _job(tmp_path, pauses={100: 5.0}, own={(3, 60): 3.0})
    got = [(a.context["step"], a.detector, a.rank, a.severity) for a in _slowdowns(tmp_path)]
    assert got == [(60, "step_time", 3, "critical"), (60, "throughput", 3, "critical"),
                   (100, "step_time", None, "critical"), (100, "throughput", None, "critical")], got
    job_wide = _slowdowns(tmp_path)[2]
    assert job_wide.context["ranks_affected"] == 8 and job_wide.context["ranks_total"] == 8
    assert job_wide.context["ranks"] == list(range(8)) and "8 of 8 ranks" in job_wide.message
    assert job_wide.value > 4.5 and 0.9 < job_wide.expected < 1.1


def test_an_announced_checkpoint_explains_the_next_job_wide_pause_only(tmp_path):
    # rank 0 alone logs the save (as Megatron, HF and Lightning do); every rank waits for it
    _job(tmp_path, pauses={120: 6.0, 170: 6.0}, own={}, checkpoint_before=120)
    got = [(a.context["step"], a.detector, a.rank, a.severity, a.context.get("pause")) for a in _slowdowns(tmp_path)]
    ckpt = "checkpoint /ckpt/run/iter_0000119"
    assert got == [(120, "step_time", None, "info", ckpt), (120, "throughput", None, "info", ckpt),
                   (170, "step_time", None, "critical", None), (170, "throughput", None, "critical", None)], got


def test_a_rank_that_stopped_reporting_does_not_hold_the_verdict(tmp_path):
    # rank 7 logs its last step at 150; the job-wide pause at 160 is decided on the job's clock (hold_s)
    _job(tmp_path, pauses={160: 5.0}, own={}, last_step={7: 150})
    got = [(a.context["step"], a.detector, a.rank, a.context.get("ranks_affected"), a.context.get("ranks_total"))
           for a in _slowdowns(tmp_path)]
    assert got == [(160, "step_time", None, 7, 8), (160, "throughput", None, 7, 8)], got


def test_verdicts_survive_a_restart_between_the_two_stages(tmp_path):
    _job(tmp_path, pauses={100: 5.0}, own={(3, 60): 3.0}, checkpoint_before=100)
    records = list(read_records([str(tmp_path)]))
    whole = Pipeline()
    want = sorted((a.detector, -1 if a.rank is None else a.rank, a.context["step"], a.severity) for a in run_pipeline(whole, records))
    first = Pipeline()
    # mid-step: ranks 0-3 have flagged step 100, ranks 4-7 not reported it yet (their findings wait in stage 2)
    cut = next(i for i, r in enumerate(records) if r.data.get("step") == 100 and r.rank == 4)
    got = [a for i in range(0, cut, 500) for a in first.process(records[i:min(i + 500, cut)])]
    second = Pipeline()
    second.load_state(json.loads(json.dumps(first.save_state())))
    assert second.job_stage(records[0].job).detector(SlowdownJob).detector.pending  # the findings held across
    got += run_pipeline(second, records[cut:])
    assert sorted((a.detector, -1 if a.rank is None else a.rank, a.context["step"], a.severity) for a in got) == want


def test_a_resumed_job_is_not_judged_against_its_first_attempt(tmp_path):
    """Crash at step 600, resume from the checkpoint of step 100: steps 101-600 run again, the first of them slow on
    every rank (warm-up: compilation, caches). The first attempt's
    cross-rank statistics of those steps must not judge the second's, nor its warm-up count as a slowdown."""
    rng = random.Random(4)
    files = {r: open(tmp_path / f"rank{r}.log", "w") for r in range(8)}
    ts = T0
    for attempt, steps in ((0, range(1, 601)), (1, range(101, 700))):
        ts += 60.0 if attempt else 0.0  # the restart
        for i, step in enumerate(steps):
            base = (6.0, 3.0, 2.0)[i] if attempt and i < 3 else 1.0
            ts += base
            for r in range(8):
                st = base * (1 + rng.gauss(0, 0.01))
                loss = 3.0 - 0.002 * step + rng.gauss(0, 0.003)  # training: back at the checkpoint's loss
                files[r].write(json.dumps({"ts": ts + 0.001 * r, "step": step, "loss": loss,
                                           "step_time_s": st}) + "\n")
    for f in files.values():
        f.close()
    found = run_pipeline(Pipeline(), read_records([str(tmp_path)]))
    # before: the repeated steps were judged against the first attempt's medians (every rank a 6x "straggler"),
    # the warm-up was a step-time and throughput slowdown, and the loss, back at the checkpoint's (1.0 above the
    # first attempt's last), a `mad` finding on every rank
    assert [(a.detector, a.rank, a.context["step"]) for a in found] == []


def test_local_ranks_of_two_nodes_are_two_members_for_the_step_straggler(tmp_path):
    """torchrun --log-dir gives each node's launcher a run folder with local ranks 0..N-1: node A's local rank 1
    is not node B's. Keyed by the rank alone, their step times overwrote each other in the cross-rank check."""
    rng = random.Random(5)
    paths = {(node, lr): tmp_path / node / "attempt_0" / str(lr) / "stdout.log" for node in "AB" for lr in range(4)}
    for p in paths.values():
        p.parent.mkdir(parents=True)
    files = {k: open(p, "w") for k, p in paths.items()}
    ts = T0
    for step in range(1, 120):
        ts += 1.0
        for (node, lr), f in files.items():
            slow = 2.0 if (node, lr) == ("A", 1) and 50 <= step < 56 else 1.0  # its own compute (pipeline stage)
            f.write(json.dumps({"ts": ts + 0.001 * lr, "step": step, "loss": 2.0 + rng.gauss(0, 0.01),
                                "step_time_s": slow * (1 + rng.gauss(0, 0.01))}) + "\n")
    for f in files.values():
        f.close()
    found = run_pipeline(Pipeline(), read_records([str(tmp_path)]))
    got = sorted({(a.rank, a.context["step"]) for a in found if a.detector == "straggler"})
    assert got == [(1, 50)], got  # one finding for the episode, on node A's local rank 1
    assert all(a.source_file == str(paths[("A", 1)]) for a in found if a.detector == "straggler")


# ---- the grouping itself (models/job_slowdown.py), case by case ---------------------------------------------
def _model(n: int = 8, step: int = 0, ts: float = 0.0):
    from rankwatch.models.job_slowdown import JobSlowdown

    j = JobSlowdown()
    for m in range(n):
        j.progress(str(m), step, ts)
    return j


def _cand(m: int, step: int, ts: float, v: float = 5.0):
    from rankwatch.models.job_slowdown import Candidate

    return Candidate(str(m), step, ts, "step_time", v, 1.0, ref=f"r{m}@{step}")


def _report(j, step: int, ts: float, flagged: dict[int, float] | None = None, ranks=range(8)):
    for m in ranks:
        j.progress(str(m), step, ts)
        if flagged and m in flagged:
            j.add(_cand(m, step, ts, flagged[m]))


def _decided(j, now: float):
    jobs, ranks = j.decide(now)
    return [(f.step, len(f.members), f.pause) for f in jobs], [c.ref for c in ranks]


def test_a_ranks_own_slowdown_after_a_job_wide_one_is_its_own():
    j = _model()
    _report(j, 100, 100.0, {m: 5.0 for m in range(8)})
    _report(j, 101, 101.0)
    assert _decided(j, 101.0) == ([(100, 8, None)], [])
    _report(j, 102, 102.0, {3: 3.0})  # rank 3 alone, after a normal record: its own
    _report(j, 103, 103.0)
    assert _decided(j, 103.0) == ([], ["r3@102"])


def test_a_slowdown_flagged_a_record_later_on_some_ranks_is_still_one():
    # the per-rank rule raises a small slowdown at the next record: 3 ranks at step 50, 3 at their next record
    j = _model()
    _report(j, 50, 50.0, {0: 1.6, 1: 1.6, 2: 1.6})
    _report(j, 51, 51.0, {3: 1.3, 4: 1.3, 5: 1.3})
    _report(j, 52, 52.0)
    assert _decided(j, 52.0) == ([(50, 6, None)], [])
    # logged every 10 steps: the next record is 10 steps on
    j = _model()
    _report(j, 100, 100.0, {m: 1.6 for m in range(5)})
    _report(j, 110, 110.0, {m: 1.3 for m in range(5, 8)})
    _report(j, 120, 120.0)
    assert _decided(j, 120.0) == ([(100, 8, None)], [])


def test_a_late_rank_joins_the_finding_decided_without_it():
    j = _model(ts=100.0)
    _report(j, 160, 1600.0, {m: 5.0 for m in range(7)}, ranks=range(7))
    assert _decided(j, 1600.0) == ([], [])  # rank 7 has not reported step 160: wait ...
    assert _decided(j, 1661.0) == ([(160, 7, None)], [])  # ... at most the hold
    _report(j, 160, 1662.0, {7: 5.0}, ranks=[7])
    _report(j, 161, 1663.0)
    assert _decided(j, 1663.0) == ([], []) and j.absorbed == 7


def test_a_pause_explains_only_the_slowdown_right_after_it():
    j = _model()
    _report(j, 99, 99.0)
    j.announce(99.5, "checkpoint /ckpt/99", "0")
    _report(j, 100, 104.0, {m: 5.0 for m in range(8)})
    _report(j, 101, 105.0)
    assert _decided(j, 105.0) == ([(100, 8, "checkpoint /ckpt/99")], [])
    j.announce(106.0, "checkpoint /ckpt/101", "0")  # a fast save: no slowdown after it ...
    for step in range(102, 140):
        _report(j, step, 106.0 + step - 101)
    _report(j, 140, 150.0, {m: 5.0 for m in range(8)})  # ... so it does not explain a stall later
    _report(j, 141, 151.0)
    assert _decided(j, 151.0) == ([(140, 8, None)], [])


def test_the_finding_named_does_not_depend_on_arrival_order():
    refs = set()
    for order in (list(range(8)), list(reversed(range(8)))):
        j = _model()
        _report(j, 10, 10.0, {m: 5.0 for m in range(8)}, ranks=order)
        _report(j, 11, 11.0)
        refs.add(j.decide(11.0)[0][0].first.ref)
    assert refs == {"r0@10"}


def test_a_rank_silent_for_the_hold_stops_counting():
    j = _model()
    _report(j, 10, 10.0, ranks=range(8))
    for step in range(11, 200):  # rank 7 is gone after step 10
        _report(j, step, float(step), {m: 5.0 for m in range(4)} if step == 150 else None, ranks=range(7))
    assert _decided(j, 199.0) == ([(150, 4, None)], [])  # 4 of the 7 ranks alive: job-wide, without a wait


def test_an_announced_pause_explains_the_slowdown_of_a_job_whose_metrics_one_rank_writes(tmp_path):
    # Megatron's last rank alone prints the iteration lines, and the save announcement is in its log too
    _job(tmp_path, ranks=1, pauses={120: 6.0, 170: 6.0}, own={}, checkpoint_before=120)
    got = [(a.context["step"], a.detector, a.rank, a.severity, a.context.get("pause")) for a in _slowdowns(tmp_path)]
    ckpt = "checkpoint /ckpt/run/iter_0000119"
    assert got == [(120, "step_time", 0, "info", ckpt), (120, "throughput", 0, "info", ckpt),
                   (170, "step_time", 0, "critical", None), (170, "throughput", 0, "critical", None)], got


def _sync_job(root, ranks: int, steps: int, slow: dict[int, float], noise: list[float], seed: int = 0) -> None:
    """Synchronous training: `slow[step]` x on every rank; rank r's logged time jitters by noise[r] (some ranks'
    timers are tighter than others', so a shared slowdown crosses some ranks' thresholds and not others')."""
    rng = random.Random(seed)
    files = [open(root / f"rank{r}.log", "w") for r in range(ranks)]
    ts = T0
    for step in range(1, steps + 1):
        base = slow.get(step, 1.0)
        ts += base
        for r, f in enumerate(files):
            st = base * (1 + rng.gauss(0, noise[r]))
            f.write(json.dumps({"ts": ts + 0.001 * r, "step": step, "loss": 2.0 + rng.gauss(0, 0.01),
                                "step_time_s": st}) + "\n")
    for f in files:
        f.close()


def test_a_shared_slowdown_that_crossed_only_some_ranks_thresholds_is_the_jobs(tmp_path):
    # 16 ranks, 3 steps 1.4x slower on all: the 4 ranks with tight timers cross their thresholds, the 12 others'
    # noise is too wide. Before: 4 per-rank findings (each "a spike"), as if those ranks were slow on their own
    _sync_job(tmp_path, 16, 300, {s: 1.4 for s in (200, 201, 202)}, [0.004] * 4 + [0.06] * 12)
    got = [(a.detector, a.rank, a.context.get("ranks_affected")) for a in _slowdowns(tmp_path)]
    assert got == [("step_time", None, 16)], got


def test_a_lasting_slowdown_is_one_finding_until_it_ends(tmp_path):
    # every rank 1.6x slower from step 200 to 499 (a straggler all wait for), then again at 600-602. While the
    # first lasts, ranks whose windows fill with its values raise it again, one by one: part of it, not new
    _sync_job(tmp_path, 16, 700, {**{s: 1.6 for s in range(200, 500)}, **{s: 3.0 for s in range(600, 603)}},
              [0.004 + 0.002 * (r % 8) for r in range(16)], seed=1)
    got = [(a.detector, a.rank, a.context["step"]) for a in _slowdowns(tmp_path)]
    assert [(d, r) for d, r, _ in got] == [("step_time", None), ("step_time", None)], got
    assert got[0][2] in (200, 201) and got[1][2] in (600, 601)


def _megatron_job(root, saves: range, slow: set[int], ranks: int = 4) -> None:
    """Megatron's layout: the last rank prints the (dated, newer Megatron) iteration lines every 10 iterations;
    rank 0 prints the saves, undated, after its one dated line (`print_datetime` before training). Each logged
    interval that held a save, or is in `slow`, is 1.8x as long."""
    rng = random.Random(5)
    files = [open(root / f"rank_{r}.log", "w") for r in range(ranks)]
    ts = T0
    files[0].write(f"[before the start of training step] datetime: {_iso(ts)[:19].replace('T', ' ')} \n")
    for it in range(10, 2001, 10):
        per = 2.0 * (1.8 if (it - 10 in saves or it in slow) else 1.0) * (1 + rng.gauss(0, 0.01))
        ts += 10 * per
        stamp = _iso(ts)[:19].replace("T", " ")
        files[-1].write(f" [{stamp}] iteration {it:8d}/    2000 | consumed samples: {it * 64:12d} | elapsed time per "
                        f"iteration (ms): {per * 1000:.1f} | learning rate: 1.000000E-04 | global batch size:    64 "
                        f"| lm loss: {2.0 + rng.gauss(0, 0.005):.6E} | loss scale: 1.0 | grad norm: 1.000 | number "
                        "of skipped iterations:   0 | number of nan iterations:   0 |\n")
        if it in saves:
            files[0].write(f"saving checkpoint at iteration {it:7d} to /ckpt/run in torch_dist format\n")
            files[0].write(f"  successfully saved checkpoint from iteration {it:7d} to /ckpt/run [ t 1/1, p 1/1 ]\n")
    for f in files:
        f.close()


def test_undated_save_announcements_explain_the_slowdown_after_the_iteration_they_name(tmp_path):
    # 39 saves, all on rank 0's log with the time of its one dated line: each explains the interval after it,
    # and only that one; a slowdown with no save before it stays a warning
    saves = range(50, 2000, 50)
    _megatron_job(tmp_path, saves, slow={1234 // 10 * 10})
    got = {(a.context["step"], a.detector): (a.severity, a.context.get("pause")) for a in _slowdowns(tmp_path)}
    after_save = {step for step, _ in got if step - 10 in saves}
    assert len(after_save) >= 35, sorted(after_save)  # the first intervals are the detectors' warm-up
    for (step, _), (severity, pause) in got.items():
        if step in after_save:
            assert (severity, pause) == ("info", "checkpoint /ckpt/run"), (step, severity, pause)
        else:
            assert severity != "info" and pause is None, (step, severity, pause)
    assert (1230, "step_time") in got


def test_a_named_step_is_not_matched_where_the_jobs_steps_are_record_counts():
    # HF Trainer's dicts carry no step: the job's steps are record numbers, and `checkpoint-500` is no record
    # number. The pause then follows the announcer's last record, as an unnamed one does
    for counted, want in ((True, [(51, 8, "checkpoint out/checkpoint-500")]), (False, [(51, 8, None)])):
        j = _model()
        for m in range(8):
            j.progress(str(m), 50, 50.0, counted=counted)
        j.announce(50.5, "checkpoint out/checkpoint-500", "0", 500)
        _report(j, 51, 56.0, {m: 5.0 for m in range(8)})
        _report(j, 52, 57.0)
        assert _decided(j, 57.0) == (want, []), counted


def test_one_save_announced_twice_is_one_pause():
    from rankwatch.models.job_slowdown import JobSlowdown
    det: JobSlowdown = JobSlowdown()
    det.announce(100.0, "checkpoint /ckpt/run", "0", 1000)  # "saving checkpoint at iteration 1000 ..."
    det.announce(130.0, "checkpoint /ckpt/run", "0", 1000)  # "successfully saved checkpoint from iteration 1000 ..."
    det.announce(900.0, "checkpoint /ckpt/run", "0", 2000)
    assert [p[3] for p in det.pauses] == [1000, 2000]
