"""A stopped job told from a hung one by its GPUs: all released together is a stop, one released is a crash."""

from __future__ import annotations

import dataclasses
import json

from rankwatch.models.gpu_release import GpuRelease
from rankwatch.processors.collective_stage import CollectiveJob
from rankwatch.processors.offline import read_records, run_pipeline
from rankwatch.processors.pipeline import DetectionConfig, Pipeline

from rankwatch.sim_collectives import build_timeline
from rankwatch.simulate import Fault, Scenario, write_job


def busy(rel: GpuRelease, gpus: list[str], ts: float, share: float = 0.5) -> None:
    for i, g in enumerate(gpus):
        rel.in_use(g, ts, i, share=share)


def test_all_gpus_released_together_is_a_stop_once_declared_and_a_crash_is_not():
    gpus = [f"n{i // 4}/{i % 4}" for i in range(8)]
    rel = GpuRelease()
    busy(rel, gpus, 100.0)
    busy(rel, ["n9/0"], 100.0, share=0.01)  # an idle GPU on a sampled node is not the job's
    for g in gpus[:7]:
        rel.exited(g, 130.0 + int(g[-1]), ref=(g, 1))
        assert rel.stop(set(range(8))) is None  # one node's GPUs gone, the other's held: a crash
    rel.exited(gpus[7], 131.5, ref=("n1/3", 7))
    assert rel.stop(set()) is None  # no collective view of the job: nothing to compare the GPUs with
    assert rel.stop(set(range(8))) == (133.0, True, 8, ("n0/3", 1))  # dated and pointed at the last release
    rel.declare(133.0)
    assert rel.stop(set(range(8))) is None  # applied once
    state = json.loads(json.dumps(rel.save_state()))
    again = GpuRelease()
    again.load_state(state)
    assert again.save_state() == rel.save_state()


def test_a_restart_or_ranks_out_of_the_samplers_sight_are_no_stop_and_a_slow_release_is_not_together():
    gpus = ["a/0", "a/1"]
    rel = GpuRelease()
    busy(rel, gpus, 100.0)
    rel.exited("a/0", 110.0)
    rel.exited("a/1", 111.0)
    assert rel.stop({0, 1, 2, 3}) is None  # ranks 2 and 3 run where nothing samples: they may hang
    busy(rel, gpus, 150.0)  # new processes hold the GPUs again
    assert rel.stop({0, 1}) is None
    rel.exited("a/0", 160.0)
    rel.exited("a/1", 900.0)  # a crash, then the survivor's watchdog many minutes later (NCCL's 10 min)
    assert rel.stop({0, 1})[:3] == (900.0, False, 2)
    unmapped = GpuRelease()
    for g in gpus:
        unmapped.in_use(g, 100.0, share=0.5)
        unmapped.exited(g, 120.0)
    assert unmapped.stop({0, 1, 2}) is None and unmapped.stop({0, 1})[:3] == (120.0, True, 2)


def _analyze(recs, wall):
    p = Pipeline(DetectionConfig())
    return [a for a in run_pipeline(p, recs, wall=wall) if a.detector == "hang"], p


def test_a_cancelled_job_without_its_slurm_output_is_no_hang_when_its_gpus_were_released(tmp_path):
    """Cancelled mid-step, no scheduler or launcher line anywhere: the per-node GPU sampler shows every GPU's
    memory freed within seconds of the last ops, so no hang; where it shows nothing after the job, a hang."""
    sc = Scenario(ranks=8, steps=300, seed=3, cancel_s=81.7, slurm_output=False, gpu_after_exit_s=60.0)
    write_job(sc, tmp_path / "job")
    assert not list((tmp_path / "job").glob("slurm-*"))
    recs = list(read_records([str(tmp_path / "job")]))
    last = max(r.ts for r in recs)
    assert _analyze(recs, last + 3600)[0] == []
    write_job(dataclasses.replace(sc, gpu_after_exit_s=0.0), tmp_path / "bare")
    recs = list(read_records([str(tmp_path / "bare")]))
    assert [a.severity for a in _analyze(recs, last + 3600)[0]] == ["critical"]


def test_a_crashed_rank_whose_gpu_was_released_is_a_hang_then_ended_when_the_others_die(tmp_path):
    """Rank 3 crashes: its GPU is freed, the others hold theirs waiting for it. That is a hang naming rank 3;
    when the watchdog kills the others minutes later and their GPUs are freed, the hang has ended."""
    sc = Scenario(ranks=8, steps=200, seed=22, faults=[Fault("hang", 3, 150)], watchdog_s=660.0)
    hang_at = build_timeline(sc).hang_at
    write_job(sc, tmp_path / "job")
    recs = []
    for r in read_records([str(tmp_path / "job")]):
        if r.kind == "gpu" and r.ts > hang_at and (r.rank == 3 or r.ts > hang_at + sc.watchdog_s + 0.5):
            r = dataclasses.replace(r, data={**r.data, "mem_used_bytes": 5 * 10**8})
        recs.append(r)
    tail = max(r.ts for r in recs)
    recs += [dataclasses.replace(r, ts=r.ts + k * 1.0) for r in recs if r.kind == "gpu" and r.ts == tail
             for k in range(1, 30)]
    found, p = _analyze(recs, None)
    assert [(a.severity, a.rank) for a in found] == [("critical", 3), ("info", 3)]
    assert found[0].event_time < hang_at + 60
    assert "all 8 of its GPUs released their memory" in found[1].message
    assert found[1].event_time > hang_at + sc.watchdog_s
    assert p.gauges.get("rankwatch_hang_active", ("job",)) == 0


def _four_rank_job(spread: float) -> tuple[list[dict], list[dict], float]:
    """Stage-2 summaries of a 4-rank comm, 40 ops 0.5 s apart, rank r enqueuing `spread` x r s after rank 0,
    rank 3 never reaching op 39; and each GPU's busy summary. Returns (ops, busy GPUs, time of the last op)."""
    ops, t = [], 0.0
    for n in range(40):
        t += 0.5
        ops += [{"type": "op", "job": "j", "rank": r, "ts": t + spread * r, "comm": "id:c", "ptr": "", "n": n,
                 "op": "AllReduce", "nranks": 4, "count": 1, "file": f"r{r}", "offset": n}
                for r in range(4) if not (n == 39 and r == 3)]
    gpus = [{"type": "gpu_mem", "job": "j", "host": "h", "gpu": r, "rank": r, "ts": 1.0, "bucket": 0,
             "share": 0.5, "peak": 1, "total": 2, "file": "g", "offset": r} for r in range(4)]
    return ops, gpus, t


def _exits(at: dict[int, float]) -> list[dict]:
    return [{"type": "gpu_exit", "job": "j", "host": "h", "gpu": r, "rank": r, "ts": ts, "file": "g",
             "offset": 100 + r} for r, ts in at.items()]


def _ticks(p: Pipeline, t: float, seconds: int) -> list:
    return [a for k in range(1, seconds)
            for a in p.second_stage([{"type": "clock", "job": "j", "family": "gpu", "ts": t + k}])]


def test_a_release_over_minutes_that_arrives_before_the_hang_is_judged_still_ends_it():
    """Summaries arrive in any order: the GPUs' release (rank 3's at once, the others' minutes later) reaches
    stage 2 before the job's clock makes the stall a hang. Spread out, it excuses nothing, and waits: the hang
    is reported, then ended by it."""
    p = Pipeline(DetectionConfig())
    ops, gpus, t = _four_rank_job(0.001)  # rank 3 hangs short of op 39
    exits = _exits({r: t + (1.0 if r == 3 else 200.0) for r in range(4)})
    out = p.second_stage(ops + gpus + exits + [{"type": "clock", "job": "j", "family": "op", "ts": t}])
    out += _ticks(p, t, 300)
    hangs = [a for a in out if a.detector == "hang"]
    assert [(a.severity, a.rank) for a in hangs] == [("critical", 3), ("info", 3)]
    assert hangs[1].event_time == t + 200.0 and hangs[1].source_offset in (100, 101, 102)
    assert hangs[1].context["stopped_by"] == {"by": None, "reason": "all 4 of its GPUs released their memory"}


def test_a_release_read_before_the_jobs_ops_still_stops_it():
    """A worker catching up reads the GPU topic ahead of the op topic: the release of every GPU reaches stage 2
    before any op of the job. It is kept until the ops show which ranks the job has, and then it is a stop."""
    p = Pipeline(DetectionConfig())
    ops, gpus, t = _four_rank_job(0.3)  # rank 3 killed 0.9 s after its peers enqueued op 39
    out = p.second_stage(gpus + _exits({r: t + 1.0 + 0.2 * r for r in range(4)}))
    out += p.second_stage(ops + [{"type": "clock", "job": "j", "family": "op", "ts": t}])
    out += _ticks(p, t, 120)
    assert not [a for a in out if a.detector == "hang"]
    job = p.jobs["j"].detector(CollectiveJob)
    assert job.tracker.stops == [t + 1.6] and not job.gpu_pending
