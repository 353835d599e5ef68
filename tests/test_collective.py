"""Cross-rank collective timing (stage 2): lateness, stragglers, victims, pauses, hangs, and the clocks they run on."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
from rankwatch.models.collective import CollectiveConfig, CollectiveTracker
from rankwatch.processors.collective_stage import CollectiveJob
from rankwatch.processors.pipeline import DetectionConfig, Pipeline
from rankwatch.processors.stages import JobStage
from rankwatch.processors.watermarks import Watermarks

from rankwatch.records import Anomaly, Record


def enqueue_times(ranks: int, ops: int, late: dict[int, tuple[int, int, float]] | None = None, seed: int = 0,
                  step: float = 0.1) -> list[tuple[int, int, float]]:
    """(rank, opCount, enqueue time) of a synchronous comm: every rank within a few ms of the others;
    `late`: rank -> (first op, last op, lag)."""
    rng = random.Random(seed)
    out = []
    for n in range(ops):
        for r in range(ranks):
            t = 100.0 + n * step + abs(rng.gauss(0, 0.004))
            lo, hi, lag = (late or {}).get(r, (0, -1, 0.0))
            if lo <= n <= hi:
                t += lag
            out.append((r, n, t))
    return out


def feed(tracker: CollectiveTracker, events, order=None):
    found = []
    for r, n, t in order or events:
        tracker.add("c1", r, n, t, "AllReduce", 8)
        found += tracker.judge(t)[0]
    return found


def test_straggler_named_once_with_its_lag_and_peers():
    tr = CollectiveTracker(CollectiveConfig())
    found = feed(tr, enqueue_times(8, 120, {5: (60, 119, 0.2)}))
    assert [(e.rank, e.first) for e in found] == [(5, True)]
    ev = found[0]
    assert 0.18 < ev.lag < 0.25 and ev.late_ops >= 6 and ev.peers == 7
    assert 60 <= ev.op_count <= 70  # again and again: the 6th late op of a window of 10


def test_single_late_op_and_skew_below_the_floor_are_not_stragglers():
    tr = CollectiveTracker(CollectiveConfig())
    events = enqueue_times(8, 200, {3: (50, 50, 0.5), 6: (0, 199, 0.03)})  # one hiccup; 30 ms constant skew
    assert feed(tr, events) == []


def test_order_of_arrival_across_ranks_does_not_change_the_verdict():
    """Ranks reach stage 2 through different partitions and workers: any interleaving that keeps each rank's own
    order gives the same straggler at the same op."""
    events = enqueue_times(8, 120, {2: (40, 119, 0.15)}, seed=3)
    by_rank = {r: [e for e in events if e[0] == r] for r in range(8)}
    rng = random.Random(7)
    shuffled, pos = [], {r: 0 for r in by_rank}
    while any(pos[r] < len(v) for r, v in by_rank.items()):
        r = rng.choice([r for r in by_rank if pos[r] < len(by_rank[r])])
        chunk = by_rank[r][pos[r]:pos[r] + rng.randint(1, 40)]  # a rank's partition read ahead in bursts
        shuffled += chunk
        pos[r] += len(chunk)
    a = feed(CollectiveTracker(), events)
    b = feed(CollectiveTracker(), events, shuffled)
    assert [(e.rank, e.op_count) for e in a] == [(e.rank, e.op_count) for e in b] == [(2, a[0].op_count)]


def test_a_rank_on_two_comms_gets_the_same_first_finding_whatever_the_order_and_ticks():
    """A rank is in a data-parallel comm and a tensor-parallel one, late on both. Offline reads in time order and
    ticks every second; the stream reads ranks in bursts, meets the comms in the other order and ticks on the
    slowest rank's watermark at odd moments. The finding must come from the same op either way."""
    dp = [("dp", r, n, t) for r, n, t in enqueue_times(8, 150, {5: (50, 149, 0.2)}, seed=4)]
    tp = [("tp", r, n, t + 0.03) for r, n, t in enqueue_times(8, 150, {5: (50, 149, 0.2)}, seed=5)
          if r in (4, 5)]
    offline = sorted(dp + tp, key=lambda e: e[3])
    rng = random.Random(11)
    streams = {r: [e for e in offline if e[1] == r] for r in range(8)}
    seen = {r: -math.inf for r in streams}
    shuffled, ticks = [], []
    first = next(e for e in offline if e[0] == "tp")
    shuffled.append(first)  # the stream meets the tp comm first
    streams[first[1]].remove(first)
    while any(streams.values()):
        r = rng.choice([r for r, v in streams.items() if v])
        k = rng.randint(1, 30)  # a rank's partition read ahead in bursts
        chunk, streams[r] = streams[r][:k], streams[r][k:]
        shuffled += chunk
        seen[r] = chunk[-1][3]
        ticks.append((len(shuffled), min(seen.values())))

    def run(events, clock):
        tr, found = CollectiveTracker(), []
        for i, (comm, r, n, t) in enumerate(events, 1):
            tr.add(comm, r, n, t, "AllReduce", 8 if comm == "dp" else 2)
            now = clock(i, t)
            if now is not None:
                found += tr.judge(now)[0]
        found += tr.judge(max(t for *_, t in events))[0]
        return [(e.rank, e.comm, e.op_count, round(e.ts, 6)) for e in found]

    in_order = run(offline, lambda i, t: math.floor(t))
    marks = dict(ticks)
    streamed = run(shuffled, lambda i, t: marks.get(i) if rng.random() < 0.5 else None)
    assert in_order and in_order[0][0] == 5
    assert streamed == in_order


def test_an_op_with_one_rank_on_time_and_the_rest_after_it_went_stale_is_judged_without_crashing():
    """A final barrier the ranks reach over 20 s (checkpoints of different lengths): the op goes stale with one
    rank on time, so it has no median rank, and the others' enqueues, late reports, have no yardstick. They
    are dropped (`rankwatch analyze` raised KeyError here, found by a blind test)."""
    tr = CollectiveTracker(CollectiveConfig())
    feed(tr, enqueue_times(8, 30))
    t = 200.0
    tr.add("c1", 0, 30, t, "AllReduce", 8)
    for r in range(1, 8):
        tr.add("c1", r, 30, t + 6.0 + r * 2.0, "AllReduce", 8)
    found, _ = tr.judge(t + 30.0)
    assert found == [] and 30 not in tr.comms["c1"].medians and tr.comms["c1"].judged_upto == 30


def test_hang_names_the_rank_that_never_reached_the_op_and_resolves():
    tr = CollectiveTracker(CollectiveConfig(hang_min_s=30))
    events = [e for e in enqueue_times(8, 50) if not (e[0] == 4 and e[1] >= 40)]  # rank 4 stops before op 40
    feed(tr, events)
    last = max(t for _, _, t in events)
    assert tr.check_hang(last + 10) is None  # not silent long enough
    h = tr.check_hang(last + 31)
    assert h is not None and h.kind == "hang" and h.stalled == {4: 39} and h.op_count == 40
    assert math.isclose(h.ts, last + 30, abs_tol=0.01)  # dated when it became a hang
    assert tr.check_hang(last + 60) is None  # once per hang
    for n in range(40, 52):  # rank 4 catches up and everyone moves on
        for r in range(8):
            if r == 4 or n >= 50:
                tr.add("c1", r, n, last + 70 + n * 0.01, "AllReduce", 8)
    resolved = tr.check_hang(last + 80)
    assert resolved is not None and resolved.kind == "resolved"


def test_a_pause_of_every_rank_is_not_a_hang():
    tr = CollectiveTracker(CollectiveConfig(hang_min_s=30))
    events = enqueue_times(8, 50)
    feed(tr, events)
    assert tr.check_hang(max(t for _, _, t in events) + 600) is None  # evaluation, checkpoint, end of job


def test_logs_that_end_in_a_hang_name_the_rank_that_never_reached_the_op():
    """Offline, a hang whose logs just end (no watchdog line, nothing after): the peers enqueued op 40 and the
    ops after it that their CPUs could, rank 4 stopped at 39. Judged at rest, the silence since counts."""
    tr = CollectiveTracker(CollectiveConfig(hang_min_s=30))
    events = [e for e in enqueue_times(8, 43) if not (e[0] == 4 and e[1] >= 40)]
    feed(tr, events)
    end = max(t for _, _, t in events)
    assert tr.check_hang(end) is None  # the logs' own clock: not silent long enough
    assert tr.check_hang(end + 20, logs_end=(end, end)) is None  # analysed before the threshold passed: maybe live
    assert tr.check_hang(end + 40, logs_end=(end + 15, end)) is None  # a line 25 s ago: the job may still run
    h = tr.check_hang(end + 3600, logs_end=(end, end))
    assert h is not None and h.end_of_logs and h.stalled == {4: 39} and h.op_count == 40
    assert math.isclose(h.silent_s, end + 3600 - tr.comms["c1"].advanced_at)  # the silence judged: till now


def test_a_hang_names_only_the_ranks_that_never_reached_the_op():
    """Peers block at different points after the op they wait in (one enqueued two more ops, another one):
    only the rank that never reached that op is stalled, on both the stream's rule and at the end of the logs."""
    events = [e for e in enqueue_times(8, 44) if not (e[0] == 4 and e[1] >= 40) and not (e[0] == 6 and e[1] >= 42)]
    end = max(t for _, _, t in events)
    for logs_end in (None, (end, end)):
        tr = CollectiveTracker(CollectiveConfig(hang_min_s=30))
        feed(tr, events)
        h = tr.check_hang(end + 3600, logs_end=logs_end)
        assert h is not None and h.stalled == {4: 39} and h.op_count == 40


def test_a_job_stopped_mid_collective_is_not_a_hang_at_the_end_of_its_logs():
    """Every rank's log cut at one instant (a cancelled or preempted job) mid-op: the ranks that had not enqueued
    it yet were within the usual spread, or were most of the comm. No hang, at any cut."""
    events = enqueue_times(8, 120, seed=4)
    cuts = sorted({t for _, n, t in events if n >= 60})
    stopped_mid_op = 0
    for cut in cuts[::3]:
        tr = CollectiveTracker(CollectiveConfig(hang_min_s=30))
        kept = [e for e in events if e[2] <= cut]
        feed(tr, kept)
        c = tr.comms["c1"]
        stopped_mid_op += any(n < c.max_count for n, _, _ in c.last.values())
        assert tr.check_hang(cut + 3600, logs_end=(cut + 2.0, cut)) is None, cut  # and a line 2 s later
    assert stopped_mid_op > 40  # the cuts did leave ranks either side of an op


def test_a_job_stopped_before_its_stall_lasted_the_threshold_is_not_a_hang():
    """Cancelled (or torn down by its launcher) while rank 4 had not reached op 40 yet: no hang, however long
    after; the stop may reach stage 2 before the ops that preceded it. A stall that had lasted the threshold when
    the job was stopped was a hang, reported, then ended by the stop, once."""
    events = [e for e in enqueue_times(8, 50) if not (e[0] == 4 and e[1] >= 40)]
    last = max(t for _, _, t in events)
    # the banner may come before the last ranks die (signal delivery, SIGTERM handlers): within stop_grace_s
    for stop_first, stop_at in ((True, last + 3), (False, last + 3), (False, last - 1.5)):
        tr = CollectiveTracker(CollectiveConfig(hang_min_s=30))
        if stop_first:
            tr.stop(stop_at)
        feed(tr, events)
        if not stop_first:
            tr.stop(stop_at)
        assert tr.check_hang(last + 31) is None and tr.check_hang(last + 3600) is None
        assert tr.check_hang(last + 3600, logs_end=(last + 3, last)) is None  # offline, at rest
    tr = CollectiveTracker(CollectiveConfig(hang_min_s=30))
    feed(tr, events)
    h = tr.check_hang(last + 31)
    assert h is not None and h.kind == "hang" and h.stalled == {4: 39}
    tr.stop(last + 600)  # the scheduler kills the hung job ten minutes in
    ended = tr.check_hang(last + 601)
    assert ended is not None and ended.kind == "ended" and ended.stopped_at == last + 600
    assert ended.stalled == {4: 39} and math.isclose(ended.silent_s, 600, abs_tol=0.1)
    assert tr.check_hang(last + 700) is None and tr.check_hang(last + 7200) is None  # ended once, not again
    tr.stop(last + 9000)  # a later stop (after a restart) does not make the old stall a hang either
    assert tr.check_hang(last + 9600) is None


def test_a_stop_does_not_excuse_a_later_stall_after_progress_resumed():
    """The stop of an earlier attempt (before a restart) says nothing about a hang after the job moved on."""
    tr = CollectiveTracker(CollectiveConfig(hang_min_s=30))
    tr.stop(90.0)  # before any op of this attempt
    events = [e for e in enqueue_times(8, 50) if not (e[0] == 4 and e[1] >= 40)]
    feed(tr, events)
    last = max(t for _, _, t in events)
    h = tr.check_hang(last + 31)
    assert h is not None and h.kind == "hang" and h.stalled == {4: 39}


def test_ranks_that_went_on_with_new_comms_restarted_and_a_rank_running_ahead_briefly_still_hangs():
    """A job restarted without a launcher line that says so: its processes were killed at different moments
    (rank 4 short of op 40 of the old comm) and the new ones create new comms. Back within half the threshold:
    no hang; back later: the hang is reported and resolved when they go on. A rank that skipped the op and ran
    ahead on another comm for a second before blocking is still a hang."""
    events = [e for e in enqueue_times(8, 50) if not (e[0] == 4 and e[1] >= 40)]
    last = max(t for _, _, t in events)
    for back_after, hang_first in ((10.0, False), (90.0, True)):
        tr = CollectiveTracker(CollectiveConfig(hang_min_s=30))
        feed(tr, events)
        h = tr.check_hang(last + back_after - 1)
        assert (h is not None and h.kind == "hang") == hang_first
        for n in range(300):  # the new attempt's comm, every rank
            for r in range(8):
                tr.add("c2", r, n, last + back_after + 0.1 * n, "AllReduce", 8)
        h = tr.check_hang(last + back_after + 30)
        assert (h is not None and h.kind == "resolved" and h.moved_on) == hang_first
        assert tr.check_hang(last + 3600) is None and tr.hang is None
    tr = CollectiveTracker(CollectiveConfig(hang_min_s=30))
    feed(tr, events)
    for n in range(5):  # rank 4 enqueues a few ops of its TP comm, then blocks
        tr.add("tp", 4, n, last + 0.2 * n, "AllReduce", 2)
    h = tr.check_hang(last + 31)
    assert h is not None and h.kind == "hang" and h.stalled == {4: 39}
    assert tr.check_hang(last + 600) is None and tr.hang is h


def test_stops_and_stopped_comms_survive_a_restart_of_the_worker():
    events = [e for e in enqueue_times(8, 50) if not (e[0] == 4 and e[1] >= 40)]
    last = max(t for _, _, t in events)
    tr = CollectiveTracker(CollectiveConfig(hang_min_s=30))
    feed(tr, events)
    tr.stop(last + 3)
    assert tr.check_hang(last + 31) is None
    again = CollectiveTracker(CollectiveConfig(hang_min_s=30))
    again.load_state(json.loads(json.dumps(tr.save_state())))
    assert again.stops == [last + 3] and again.check_hang(last + 3600) is None


def test_analyze_reports_a_hang_whose_logs_just_end(tmp_path):
    """The simulator's hang without what follows it (GPU samples, watchdog): analysed at rest, the stalled rank
    is named with `end_of_logs`; replayed as if live (no wall time past the end), nothing is claimed."""
    from rankwatch.processors.offline import read_records, run_pipeline

    from rankwatch.simulate import Fault, Scenario, write_job

    sc = Scenario(ranks=8, steps=200, seed=22, faults=[Fault("hang", 3, 150)])
    write_job(sc, tmp_path / "job")
    recs = list(read_records([str(tmp_path / "job")]))
    last_op = max(r.ts for r in recs if r.kind == "op")
    cut = [r for r in recs if r.ts <= last_op]
    hangs = [a for a in run_pipeline(Pipeline(DetectionConfig()), cut, wall=last_op + 7200) if a.detector == "hang"]
    assert len(hangs) == 1 and hangs[0].rank == 3 and hangs[0].context["end_of_logs"] is True
    assert "end of the logs" in hangs[0].message
    assert not [a for a in run_pipeline(Pipeline(DetectionConfig()), cut) if a.detector == "hang"]


def test_a_job_stopped_mid_step_with_lines_after_its_last_op_is_no_hang(tmp_path):
    """Cancelled mid-step, the job still logs a GPU sample and a launcher line a few seconds after its ops stop:
    those move the job's clock, not the ranks' lateness for the op they had not reached."""
    from rankwatch.processors.offline import read_records, run_pipeline

    from rankwatch.simulate import Scenario, write_job

    sc = Scenario(ranks=8, steps=160, seed=7)
    write_job(sc, tmp_path / "job")
    recs = list(read_records([str(tmp_path / "job")]))
    ops = [r for r in recs if r.kind == "op"]
    trailer = next(r for r in recs if r.kind != "op")
    rng = random.Random(3)
    mid_op = 0
    for cut in sorted(ops[rng.randrange(len(ops) // 3, len(ops))].ts for _ in range(12)):  # just after an enqueue
        kept = [r for r in recs if r.ts <= cut]
        last = {}
        for r in kept:
            if r.kind == "op":
                last[(r.data["comm_id"], r.rank)] = r.data["op_count"]  # (pointers differ per process)
        mid_op += len({(c, n) for (c, _), n in last.items()}) > len({c for c, _ in last})
        late = dataclasses.replace(trailer, ts=cut + 2.5)
        found = run_pipeline(Pipeline(DetectionConfig()), kept + [late], wall=cut + 7200)
        assert not [a for a in found if a.detector == "hang"], cut
    assert mid_op >= 8  # most cuts left a comm with ranks either side of an op


def test_a_cancelled_job_is_no_hang_when_its_slurm_banner_is_read(tmp_path):
    """Slurm cancels a healthy job mid-step and each rank dies within 2 s: ranks end either side of an op, and
    those killed first look late. With the job's Slurm output read (its banner dates the cancel), no hang; without
    it, the logs alone look like one (why the Slurm output belongs with the logs: docs/OPS.md)."""
    from rankwatch.processors.offline import read_records, run_pipeline

    from rankwatch.simulate import Scenario, write_job

    sc = Scenario(ranks=8, steps=300, seed=3, cancel_s=81.7)
    write_job(sc, tmp_path / "job")
    (banner,) = list((tmp_path / "job").glob("slurm-*.out"))
    recs = list(read_records([str(tmp_path / "job")]))
    stops = [r for r in recs if r.data.get("event") == "job_stop" and not r.data["fields"].get("undated")]
    assert [(s.data["fields"]["by"], s.ts, s.rank) for s in stops] == [
        ("slurm", math.floor(sc.start_ts + 81.7), None), ("torchrun", sc.start_ts + 81.75, None)]
    last = max(r.ts for r in recs)
    assert not [a for a in run_pipeline(Pipeline(DetectionConfig()), recs, wall=last + 3600) if a.detector == "hang"]
    banner.unlink()
    recs = list(read_records([str(tmp_path / "job")]))
    assert [a.detector for a in run_pipeline(Pipeline(DetectionConfig()), recs, wall=last + 3600)
            if a.detector == "hang"] == ["hang"]


def test_undated_lines_offline_take_their_files_time_not_the_time_of_the_analysis(tmp_path):
    """A Slurm output that begins `+ srun ...` (no time) and torchrun's glog-style lines (no year): read at rest,
    they took the time of the analysis (and its year), which moved the job's clock to now: a cancelled job
    looked silent since it ended, a hang (a blind test). Leading undated lines now take their file's first
    time, a file with none its modification time, which also gives glog times their year."""
    import os

    from rankwatch.processors.offline import read_records, run_pipeline

    from rankwatch.simulate import Scenario, write_job

    sc = Scenario(ranks=8, steps=300, seed=3, cancel_s=81.7)
    write_job(sc, tmp_path / "job")
    (out,) = list((tmp_path / "job").glob("slurm-*.out"))
    out.unlink()  # without the banner: the kill jitter looks like lateness, but the logs end long ago
    launcher = tmp_path / "job" / "launcher.log"
    launcher.write_text("+ srun --ntasks-per-node=1 torchrun --nproc_per_node 8 train.py\n"
                        "W0101 00:01:22.500000 1359 torch/distributed/elastic/agent/server/api.py:719] Received 15 "
                        "death signal, shutting down workers\n")
    start = sc.start_ts
    os.utime(launcher, (start + 90, start + 90))  # written until the job's end
    recs = list(read_records([str(tmp_path / "job")]))
    mine = [r for r in recs if r.file.endswith("launcher.log")]
    assert [r.ts for r in mine] == [start + 82.5, start + 82.5]  # 2026-01-01T00:01:22.5: the mtime's year
    assert mine[1].data["event"] == "job_stop"
    assert max(r.ts for r in recs) < start + 100
    assert not [a for a in run_pipeline(Pipeline(DetectionConfig()), recs, wall=start + 3600) if a.detector == "hang"]
    launcher.write_text("+ srun --ntasks-per-node=1 torchrun --nproc_per_node 8 train.py\n")
    os.utime(launcher, (start - 10, start - 10))  # a file with no time at all: its modification time
    recs = list(read_records([str(tmp_path / "job")]))
    assert [r.ts for r in recs if r.file.endswith("launcher.log")] == [start - 10]


def test_an_undated_stop_line_counts_as_of_when_its_file_was_last_written(tmp_path):
    """torch <= 2.0's `WARNING:torch.distributed.elastic...:Received 15 death signal` has no time: it would take
    its file's previous time, which can be long before the stop. It counts as of when its file was last written
    (at rest; the shipper: when it read it), never earlier: a cancelled job is excused, a hang killed ten
    minutes in is still reported, then ended."""
    import os

    from rankwatch.processors.offline import read_records, run_pipeline

    from rankwatch.sim_collectives import build_timeline
    from rankwatch.simulate import Fault, Scenario, write_job

    line = "WARNING:torch.distributed.elastic.agent.server.api:Received 15 death signal, shutting down workers\n"
    cancelled = Scenario(ranks=8, steps=300, seed=3, cancel_s=81.7)
    hung = Scenario(ranks=8, steps=200, seed=22, faults=[Fault("hang", 3, 150)], hang_tail=False)
    hung.cancel_s = build_timeline(hung).hang_at - hung.start_ts + 600.0
    found = {}
    for name, sc in (("cancelled", cancelled), ("hung", hung)):
        write_job(sc, tmp_path / name)
        for out in (tmp_path / name).glob("slurm-*.out"):
            out.unlink()
        launcher = tmp_path / name / "torchrun.log"
        launcher.write_text(line)
        stop = sc.start_ts + sc.cancel_s + 3.0
        os.utime(launcher, (stop, stop))
        recs = list(read_records([str(tmp_path / name)]))
        found[name] = [(a.severity, a.rank, a.event_time) for a in
                       run_pipeline(Pipeline(DetectionConfig()), recs, wall=stop + 3600) if a.detector == "hang"]
    assert found["cancelled"] == []
    (hang, ended) = found["hung"]
    assert hang[:2] == ("critical", 3) and ended == ("info", 3, hung.start_ts + hung.cancel_s + 3.0)


def test_a_hang_killed_at_the_time_limit_is_reported_then_ended(tmp_path):
    """The job hangs, and Slurm kills it at its time limit ten minutes later: the hang is reported when it became
    one, and ended (info, the gauge back to 0) by the banner, dated by the banner's own time."""
    from rankwatch.processors.offline import read_records, run_pipeline

    from rankwatch.sim_collectives import build_timeline
    from rankwatch.simulate import Fault, Scenario, write_job

    sc = Scenario(ranks=8, steps=200, seed=22, faults=[Fault("hang", 3, 150)], hang_tail=False)
    hang_at = build_timeline(sc).hang_at
    sc.cancel_s = hang_at - sc.start_ts + 600.0
    write_job(sc, tmp_path / "job")
    p = Pipeline(DetectionConfig())
    found = [a for a in run_pipeline(p, list(read_records([str(tmp_path / "job")]))) if a.detector == "hang"]
    assert [(a.severity, a.rank) for a in found] == [("critical", 3), ("info", 3)]
    hang, ended = found
    assert hang.event_time < hang_at + 60 and not hang.context["end_of_logs"]
    assert ended.event_time == math.floor(hang_at + 600.0) and "ended: the job was stopped" in ended.message
    assert ended.context["stopped_by"] == {"by": "slurm", "reason": "cancelled"}
    assert ended.source_file.endswith(".out")
    assert p.gauges.get("rankwatch_hang_active", ("job",)) == 0


def op_summary(job, rank, comm, n, ts, **kw):
    return {"type": "op", "job": job, "rank": rank, "ts": ts, "comm": comm, "ptr": "", "n": n, "op": "AllReduce",
            "nranks": 4, "count": 1, "file": f"r{rank}", "offset": n, **kw}


def flag(job, rank, comm, n, ts, actual, predicted):
    a = Anomaly("op_timing", "op_interval", job, rank, ts, actual, predicted, 9.0, predicted * 1.3, "warning",
                "slow", {"stream": "s"}, stream="s")
    from rankwatch.processors.op_stage import anomaly_fields

    return {**op_summary(job, rank, comm, n, ts), "type": "op_flag", "anomaly": anomaly_fields(a)}


def as_columns(batch):
    """A batch's per-op summaries as the worker now sends them: one `ops` summary of columns, the rest after."""
    from rankwatch.processors.op_stage import OP_COLUMNS

    ops = [s for s in batch if s["type"] == "op"]
    cols = {"type": "ops", "job": ops[0]["job"], **{k: [s[k] for s in ops] for k in OP_COLUMNS}}
    return [cols] + [s for s in batch if s["type"] != "op"]


def run_job(steps, pause_at=None, straggler=None, flags=(), columns=False):
    """A 4-rank comm, 3 ops per step; returns the op-timing anomalies stage 2 lets through. `columns`: the ops
    as one columnar summary per batch (the worker's form), else one dict per op (a worker before columns)."""
    p = Pipeline(DetectionConfig())
    t, out, n = 0.0, [], 0
    for s in range(steps):
        t += 0.5 + (20.0 if s == pause_at else 0.0)
        batch = []
        for k in range(3):
            for r in range(4):
                lag = 0.3 if straggler == r and s >= steps // 2 else 0.0
                batch.append(op_summary("j", r, "id:c", n, t + 0.05 * k + 0.001 * r + lag))
            n += 1
        batch += [f for f in flags if f["n"] in range(n - 3, n)]
        batch.append({"type": "clock", "job": "j", "family": "op", "ts": t + 1})
        out += p.second_stage(as_columns(batch) if columns else batch)
    out += p.finish()
    return [a for a in out if a.detector == "op_timing"], out


def test_pause_of_every_rank_and_waiting_victims_are_not_reported_the_culprit_is():
    # every rank paused 20 s before step 30's first op (op 90): a per-rank model flags each of them
    pause_flags = [flag("j", r, "id:c", 90, 0.5 * 31 + 20 + 0.001 * r, 20.5, 0.4) for r in range(4)]
    kept, _ = run_job(40, pause_at=30, flags=pause_flags)
    assert kept == []
    # rank 2 late on every op from step 30: the others' step-boundary intervals grow, they are victims
    victim = flag("j", 0, "id:c", 93, 0.5 * 32, 0.75, 0.45)
    culprit = flag("j", 2, "id:c", 90, 0.5 * 31 + 0.3 + 0.002, 0.75, 0.45)
    kept, everything = run_job(60, straggler=2, flags=[victim, culprit])
    assert [(a.rank, a.context.get("late_by_s", 0) > 0.25) for a in kept] == [(2, True)]
    assert any(a.detector == "straggler" and a.rank == 2 for a in everything)


def _early_or_late(rank_shift: dict[tuple[int, int], float], flags_at: list[tuple[int, int, float]]):
    """A 4-rank comm, 3 ops per step (0.05 s apart, 0.5 s steps); `rank_shift[(rank, n)]` moves one enqueue;
    `flags_at`: (rank, n, actual interval) op-timing candidates against a 0.40 s prediction."""
    p = Pipeline(DetectionConfig())
    out, n, t = [], 0, 0.0
    for _step in range(60):
        t += 0.5
        batch = []
        for k in range(3):
            for r in range(4):
                batch.append(op_summary("j", r, "id:c", n, t + 0.05 * k + 0.001 * r + rank_shift.get((r, n), 0.0)))
            n += 1
        for r, at, actual in flags_at:
            if at in range(n - 3, n):
                ts = next(b["ts"] for b in batch if b["rank"] == r and b["n"] == at)
                batch.append(flag("j", r, "id:c", at, ts, actual, 0.40))
        batch.append({"type": "clock", "job": "j", "family": "op", "ts": t + 1})
        out += p.second_stage(batch)
    out += p.finish()
    return [(a.rank, a.context.get("op_count")) for a in out if a.detector == "op_timing"]


def test_a_rank_that_was_early_and_waited_for_the_pack_is_no_slow_stream():
    # rank 1 enqueues the step's last op (n = 122) 0.3 s before its peers; the next op waits for that one to
    # complete, so its interval is 0.70 s against 0.40 (and the comm's own 0.40): no rank was late, the job did
    # not slow down. A blind test's healthy runs raised 15 such findings per 1,000 steps (40-90 ms early)
    assert _early_or_late({(1, 122): -0.3}, [(1, 123, 0.70)]) == []
    # the same interval ending late (rank 1 enqueues op 123 0.3 s after its peers): its own slowness, kept
    assert [r for r, _ in _early_or_late({(1, 123): 0.3}, [(1, 123, 0.70)])] == [1]


@pytest.mark.parametrize("same_pointers", [False, True])
def test_a_restarted_job_without_init_lines_is_a_new_comm_not_its_old_one_going_back(same_pointers):
    """Without NCCL init lines a comm is known by its signature (size, first op). An elastic restart creates it
    again, opCounts from 0, in new processes (new pointers, or the same ones if the allocator repeats itself):
    a new incarnation. Taken for the old comm, every op of the new attempt looked 80 s late and its stall a
    hang, hundreds of times over."""
    p = Pipeline(DetectionConfig())
    out = []
    for attempt, start in ((0, 0.0), (1, 200.0)):
        t = start
        for n0 in range(0, 300, 3):
            t += 0.5
            batch = [op_summary("j", r, "", n, t + 0.05 * (n - n0) + 0.001 * r,
                                ptr=f"0x{r}{'' if same_pointers else attempt}aa")
                     for n in range(n0, n0 + 3) for r in range(4)]
            batch.append({"type": "clock", "job": "j", "family": "op", "ts": t + 1})
            out += p.second_stage(batch)
    out += p.finish()
    assert [a for a in out if a.detector in ("hang", "straggler")] == []
    comms = next(d for d in p.jobs["j"].detectors if isinstance(d, CollectiveJob)).tracker.comms
    assert sorted(comms) == ["sig:n4:AllReduce:1", "sig:n4:AllReduce:1#1"]


def test_ranks_coming_out_of_a_pause_spread_by_its_length_are_not_slow_streams():
    """Every rank paused 20 s before op 90 (a checkpoint: each rank writes its shard), and rank 1 came out of it
    2.3x later than the median rank (slow I/O, a blind test's healthy runs): part of the pause, not a slow
    stream. Past 3x the comm's gap, it is reported."""
    within = flag("j", 1, "id:c", 90, 0.5 * 31 + 20 + 0.001, 0.5 + 2.3 * 20.5, 0.4)
    beyond = flag("j", 2, "id:c", 90, 0.5 * 31 + 20 + 0.002, 0.5 + 3.2 * 20.5, 0.4)
    kept, _ = run_job(40, pause_at=30, flags=[within, beyond])
    assert [a.rank for a in kept] == [2]


def test_offline_clock_is_the_latest_event_and_ticks_as_it_advances():
    seen = []

    class Probe:
        summary_types = ("x",)

        def process(self, s):
            return []

        def tick(self, now):
            seen.append(now)
            return []

        def finish(self):
            return []

    st = JobStage("j", [Probe()])
    st.process([{"type": "clock", "job": "j", "family": "op", "ts": 10.0}])
    st.process([{"type": "clock", "job": "j", "family": "gpu", "ts": 10.5}])
    st.process([{"type": "clock", "job": "j", "family": "gpu", "ts": 11.2}])
    assert seen == [10.0, 11.2]


def test_stream_clock_is_the_slowest_workers_watermark():
    st = JobStage("j", [])
    assert st.now(wall=100.0) == -math.inf  # nothing reported: silence cannot be told from lag
    st.process([{"type": "progress", "job": "j", "family": "all", "source": "w1", "ts": 50.0},
                {"type": "progress", "job": "j", "family": "all", "source": "w2", "ts": 42.0}], wall=100.0)
    assert st.now(wall=100.5) == 42.0
    st.process([{"type": "progress", "job": "j", "family": "all", "source": "w2", "ts": None}], wall=101.0)
    assert st.now(wall=101.0) == -math.inf  # w2 cannot tell yet
    assert st.now(wall=120.0) == -math.inf
    st.process([{"type": "progress", "job": "j", "family": "all", "source": "w1", "ts": 60.0}], wall=125.0)
    assert st.now(wall=125.0) == 60.0  # w2 has not reported for 10 s: it left the group


def test_watermark_is_the_slowest_key_of_unread_partitions_and_advances_when_all_is_read():
    wm = Watermarks()
    wm.observe("j", "op", 0, "j/0/s", 10.0, wall=1000.0)
    wm.observe("j", "op", 0, "j/1/s", 7.0, wall=1000.0)  # same partition, another key behind
    wm.observe("j", "op", 1, "j/2/s", 12.0, wall=1000.0)
    unread = {("op", 0)}
    assert wm.report(1001.0, lambda f, p: math.inf if (f, p) in unread else 0.0) == {"j": 7.0}
    assert wm.report(1005.0, lambda f, p: 0.0) == {"j": 12.0 + 5.0}  # all read: silence passes at wall speed
    # a partition with unread messages that has not shown the job yet may hold any of its records
    assert wm.report(1005.0, lambda f, p: math.inf if p == 2 else 0.0, {"op": [0, 1, 2]}) == {"j": -math.inf}


def test_a_partition_a_moment_behind_counts_as_read_less_its_backlog():
    """Under continuous load no partition is ever read to its very end; one whose unread messages arrived in
    the last `caught_up_s` counts as read, and the time it lets pass is reduced by that backlog."""
    wm = Watermarks()
    wm.observe("j", "op", 0, "j/0/s", 10.0, wall=1000.0)
    wm.observe("j", "op", 0, "j/1/s", 7.0, wall=1000.0)  # a sparse key: its next record is due later
    backlog = {0: 0.1}
    rep = lambda wall, caught_up: wm.report(wall, lambda f, p: backlog[p], caught_up_s=caught_up)  # noqa: E731
    assert rep(1002.0, 0.0) == {"j": 7.0}  # the exact rule: the sparse key holds the clock back
    assert rep(1002.0, 0.25) == {"j": 10.0 + 2.0 - 0.1}
    backlog[0] = 3.0  # three seconds behind: not caught up, whatever the threshold
    assert rep(1002.0, 0.25) == {"j": 7.0}
    backlog[0] = math.inf  # rate unknown yet
    assert rep(1002.0, 0.25) == {"j": 7.0}


def test_state_survives_a_restart_mid_job(tmp_path):
    """Op-timing keys, the shared LSTM and the cross-rank state go through the worker's JSON state file: a
    restarted pipeline gives the verdicts of one that never stopped."""
    import orjson
    from rankwatch.processors.offline import read_records, run_pipeline

    from rankwatch.simulate import Fault, Scenario, write_job

    sc = Scenario(ranks=4, steps=240, seed=5, faults=[Fault("straggler", 1, 150, 40, 0.2),
                                                     Fault("slow_stream", 3, 200, 12, 2.5, stream="tp")])
    write_job(sc, tmp_path / "job")
    recs = list(read_records([str(tmp_path / "job")]))
    cut = next(i for i, r in enumerate(recs) if r.ts > sc.start_ts + 60)
    cfg = DetectionConfig(op_train_every=500, op_train_steps=5)
    whole = [a.to_dict() for a in run_pipeline(Pipeline(cfg), recs)]
    first = Pipeline(cfg)
    part1 = [a.to_dict() for a in first.process(recs[:cut])]
    state = orjson.loads(orjson.dumps(first.save_state()))  # what --state-file writes: JSON, no pickle
    second = Pipeline(cfg)
    second.load_state(state)
    part2 = [a.to_dict() for a in run_pipeline(second, recs[cut:])]
    strip = lambda xs: sorted((a["id"], a["detector"], a["rank"]) for a in xs)  # noqa: E731
    assert strip(part1 + part2) == strip(whole)
    assert {("straggler", 1), ("op_timing", 3)} <= {(a["detector"], a["rank"]) for a in part2}


def test_the_straggler_gauge_keeps_one_series_per_job_naming_the_worst(tmp_path):
    """Two ranks straggle at once: the job's gauge names the one holding it back most, never both (bounded
    cardinality on a 4,000-rank job), and goes away when the episodes end."""
    from rankwatch.processors.collective_stage import STRAGGLER_GAUGE
    from rankwatch.processors.offline import read_records

    from rankwatch.simulate import Fault, Scenario, write_job

    sc = Scenario(ranks=8, steps=260, seed=9, faults=[Fault("straggler", 1, 40, 120, 0.15),
                                                     Fault("straggler", 6, 80, 40, 0.35)])
    write_job(sc, tmp_path / "job")
    recs = list(read_records([str(tmp_path / "job")]))
    p = Pipeline(DetectionConfig())
    shown, found = set(), set()
    for i in range(0, len(recs), 500):
        found |= {a.rank for a in p.process(recs[i:i + 500]) if a.detector == "straggler"}
        series = p.gauges.values.get(STRAGGLER_GAUGE, {})
        assert len(series) <= 1, series
        shown |= {labels for labels in series}
    p.finish()
    assert found == {1, 6}
    assert {rank for _, rank in shown} == {"1", "6"} and len({job for job, _ in shown}) == 1
    assert not p.gauges.values.get(STRAGGLER_GAUGE)  # both episodes over by the end of the job


def test_a_rank_read_thousands_of_ops_ahead_of_its_peer_waits_for_it():
    """Catching up a backlog, one rank's partition can run far ahead of its tensor-parallel peer's (on another
    worker). Its ops wait for the peer's rather than being judged alone: every op is judged with both ranks."""
    events = enqueue_times(2, 6000, step=0.05)
    tr = CollectiveTracker()
    for r, n, t in [e for e in events if e[0] == 0] + [e for e in events if e[0] == 1]:
        tr.add("tp", r, n, t, "AllReduce", 2)
    tr.judge(max(t for *_, t in events) + 1)
    assert tr.judged("tp", 5999, complete=True) and tr.judged("tp", 2000, complete=True)
    assert tr.comms["tp"].waiting == 0


def _watchdog_job(root, lines_by_rank: dict[int, str], ranks: int = 4) -> str:
    """A job without COLL logging: per-rank metrics, then what PyTorch's watchdog printed on each rank."""
    import json

    for r in range(ranks):
        d = root / "wdjob" / f"rank{r}"
        d.mkdir(parents=True)
        with open(d / "train.log", "w") as fh:
            fh.writelines(json.dumps({"ts": 1767225600.0 + s, "step": s, "loss": 2.0}) + "\n" for s in range(30))
            if r in lines_by_rank:
                fh.write(lines_by_rank[r].format(r=r) + "\n")
    return str(root / "wdjob")


DUMP = ("[rank{r}]:[E1128 00:11:49.041194513 ProcessGroupNCCL.cpp:1870] [PG ID 0 PG GUID 0(default_pg) Rank {r}] "
        "Received a dump signal due to a collective timeout from {src} and we will try our best to dump the debug "
        "info. Last enqueued NCCL work: {enq}, last completed NCCL work: {done}.")
WATCHDOG = ("[rank{r}]:[E1128 00:11:49.041 ProcessGroupNCCL.cpp:607] [Rank {r}] Watchdog caught collective operation "
            "timeout: WorkNCCL(SeqNum=51, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for "
            "600012 milliseconds before timing out.")


def test_watchdog_lines_alone_give_a_hang_naming_the_rank_that_never_enqueued_the_op(tmp_path):
    """Without COLL logging the watchdog is the only view of a hang: its lines (torch 2.6+ dump signals here,
    from the timed-out rank and, relayed, from the others) say how far each rank got; the rank that reports a
    lower 'last enqueued' is the one the others wait for."""
    from rankwatch.processors.offline import analyze

    waiting = DUMP.format(r="{r}", src="this local rank", enq=51, done=50)
    relayed = DUMP.format(r="{r}", src=" rank 0", enq=50, done=50)
    job = _watchdog_job(tmp_path, {0: waiting, 1: waiting, 2: relayed, 3: waiting})
    hangs = [a for a in analyze([job]) if a.detector == "hang"]
    assert len(hangs) == 1
    h = hangs[0]
    assert h.rank == 2 and h.context["stalled_ranks"] == [2] and h.context["op_count"] == 51
    assert h.context["last_op_count"] == {"2": 50} and "never enqueued" in h.message
    assert {e["rank"] for e in h.context["evidence"]} == {0, 1, 2, 3}


def test_watchdog_timeouts_without_a_lower_rank_still_report_one_hang(tmp_path):
    """The stuck rank printed nothing: the hang is still reported (once), without naming a rank."""
    from rankwatch.processors.offline import analyze

    job = _watchdog_job(tmp_path, {0: WATCHDOG, 1: WATCHDOG, 3: WATCHDOG})
    hangs = [a for a in analyze([job]) if a.detector == "hang"]
    assert len(hangs) == 1 and hangs[0].rank is None and hangs[0].context["stalled_ranks"] == []
    assert hangs[0].context["op"] == "ALLREDUCE" and len(hangs[0].context["evidence"]) == 3


def stepped_times(ranks: int, steps: int, per_step: int, late_of_step, seed: int = 0):
    """(rank, opCount, enqueue time) of a comm with `per_step` ops per step (gradient buckets close together,
    then the long gap to the next step); late_of_step(step) -> {rank: lag} for that step's every op."""
    rng = random.Random(seed)
    out, n = [], 0
    for s in range(steps):
        t0 = 100.0 + s * 1.0
        late = late_of_step(s)
        for j in range(per_step):
            for r in range(ranks):
                out.append((r, n, t0 + 0.4 + 0.02 * j + abs(rng.gauss(0, 0.003)) + late.get(r, 0.0)))
            n += 1
    return out


def test_a_different_rank_late_for_one_whole_step_is_not_a_straggler_but_one_late_step_after_step_is():
    """Ranks' batches differ (sequence lengths): each step another rank computes longer and is late on every one
    of that step's 12 bucket all-reduces, more than `straggler_window` ops in a row (the old rule fired on
    each). That is imbalance, not a straggler: the window spans `straggler_steps` (3) of the comm's steps (its
    period, learned from the median enqueue times), and a straggler is late in most of them."""
    noisy = {s: {s % 8: 0.2} for s in range(200)}
    found = feed(CollectiveTracker(CollectiveConfig()), stepped_times(8, 200, 12, lambda s: noisy[s]))
    assert found == []
    persistent = feed(CollectiveTracker(CollectiveConfig()),
                      stepped_times(8, 200, 12, lambda s: {**noisy[s], 6: 0.2} if s >= 120 else noisy[s]))
    assert {e.rank for e in persistent} == {6} and [e.first for e in persistent][0]  # then an update a minute on
    assert 120 * 12 <= persistent[0].op_count <= 123 * 12 and persistent[0].window == 36


def test_ops_as_columns_give_the_verdicts_of_one_summary_per_op():
    """Stage 2 reads a batch's ops as columns (processors/op_stage.py op_columns); the per-op form is
    still accepted. Both must give the same findings: straggler, victims and pauses alike."""
    pause_flags = [flag("j", r, "id:c", 90, 0.5 * 31 + 20 + 0.001 * r, 20.5, 0.4) for r in range(4)]
    for kw in ({"straggler": 2}, {"pause_at": 30, "flags": pause_flags}):
        _, per_op = run_job(40, **kw)
        _, cols = run_job(40, columns=True, **kw)
        key = [(a.detector, a.rank, a.event_time, a.value, a.message) for a in per_op]
        assert key == [(a.detector, a.rank, a.event_time, a.value, a.message) for a in cols]
    assert any(a.detector == "straggler" and a.rank == 2 for a in run_job(40, straggler=2, columns=True)[1])


def test_stage_one_sends_each_batchs_ops_as_columns_per_job():
    from rankwatch.processors.op_stage import OP_COLUMNS

    recs = [Record("op", job, r, 100.0 + 0.1 * n + 0.001 * r, f"r{r}.log", n,
                   {"op": "AllReduce", "op_count": n, "stream": "0xs", "comm": f"0xp{r}", "comm_id": "0xid"})
            for n in range(5) for job in ("a", "b") for r in range(3)]
    recs.append(Record("op", "a", None, 101.0, "x.log", 0, {"op": "AllReduce", "op_count": 1}))  # no rank
    recs.append(Record("op", "a", 1, 101.0, "r1.log", 9, {"op": "AllReduce", "op_count": "x"}))  # malformed
    p = Pipeline(DetectionConfig(op_use_lstm=False))
    _, summaries = p.first_stage(recs)
    cols = {s["job"]: s for s in summaries if s["type"] == "ops"}
    assert set(cols) == {"a", "b"} and not [s for s in summaries if s["type"] == "op"]
    for s in cols.values():
        assert {len(s[k]) for k in OP_COLUMNS} == {15}  # every ranked, well-formed op of the job, once
        assert s["comm"][0] == "id:0xid" and sorted(set(s["rank"])) == [0, 1, 2]
    assert p.errors == 1  # the malformed opCount was counted, not lost silently nor fatal


def test_malformed_summaries_are_counted_and_the_good_ones_still_judged():
    """Summaries come from other workers (another version, a corrupt message): a bad one is counted and
    skipped, never fatal to stage 2, and changes nothing; the batch's good summaries are still taken."""
    p = Pipeline(DetectionConfig())
    t, n, found = 0.0, 0, []
    for s in range(40):
        t += 0.5
        batch = []
        for k in range(3):
            for r in range(4):
                lag = 0.3 if r == 2 and s >= 20 else 0.0
                batch.append(op_summary("j", r, "id:c", n, t + 0.05 * k + 0.001 * r + lag))
            n += 1
        cols = as_columns(batch)
        bad_lengths = {**cols[0], "rank": cols[0]["rank"][:-1], "ts": [1e12]}
        missing = {k: v for k, v in cols[0].items() if k != "offset"}
        bad_op = {**batch[0], "rank": "x"}
        # one bad value inside a column, with a time far ahead: the summary is refused whole, clock included
        bad_cell = {**cols[0], "rank": [*cols[0]["rank"][:-1], "x"], "ts": [*cols[0]["ts"][:-1], 1e12]}
        found += p.second_stage([bad_lengths, missing, bad_op, bad_cell, *cols,
                                 {"type": "clock", "job": "j", "family": "op", "ts": t + 1}])
    found += p.finish()
    assert p.errors == 4 * 40
    assert any(a.detector == "straggler" and a.rank == 2 for a in found)
    assert p.job_stage("j").detector(CollectiveJob).clock < 1e6  # the bad summary's time was not taken


def test_deferred_op_verdicts_come_with_the_next_batch_and_match_undeferred(tmp_path):
    """The worker may begin a batch's ops before the previous batch's verdicts are given (`first_stage(...,
    defer=True)`, WorkerConfig.defer_op_records): each call then gives the findings of the batch before, the
    last come from `flush_deferred`, and the findings are those of undeferred processing."""
    from rankwatch.processors.offline import read_records

    from rankwatch.simulate import Fault, Scenario, write_job

    sc = Scenario(ranks=4, steps=240, seed=5, faults=[Fault("straggler", 1, 150, 40, 0.2),
                                                     Fault("slow_stream", 3, 200, 12, 2.5, stream="tp")])
    write_job(sc, tmp_path / "job")
    recs = list(read_records([str(tmp_path / "job")]))
    batches = [recs[i:i + 700] for i in range(0, len(recs), 700)]

    def run(defer: bool) -> list[Anomaly]:
        p = Pipeline(DetectionConfig(op_use_lstm=False))
        found: list[Anomaly] = []
        for batch in batches:
            f, s = p.first_stage(batch, defer)
            found += f + p.second_stage(s)
            begun, done = p.deferred
            assert begun == done + (1 if defer and any(r.kind == "op" for r in batch) else 0)
        f, s = p.flush_deferred()
        found += f + p.second_stage(s) + p.finish()
        assert p.deferred[0] == p.deferred[1] == (sum(any(r.kind == "op" for r in b) for b in batches) if defer
                                                  else 0)
        assert p.flush_deferred() == ([], [])  # nothing left
        return found

    plain, deferred = run(False), run(True)
    key = lambda xs: sorted((a.detector, a.rank, a.event_time, a.value, a.message) for a in xs)  # noqa: E731
    assert key(deferred) == key(plain)
    assert {("straggler", 1), ("op_timing", 3)} <= {(a.detector, a.rank) for a in deferred}



def test_a_raised_hang_goes_through_the_worker_state_file(tmp_path):
    # the worker's snapshot is written by orjson, which refused the open hang's {rank: opCount} (integer keys):
    # the first save after a hang stopped the worker, and with it every page (a blind test's live run). The
    # JSON round trips of the other state tests use Python's json, which turns such keys into strings unsaid
    import orjson
    from rankwatch.models.collective import CollectiveTracker
    from rankwatch.models.hangs import HangEvent
    from rankwatch.producers.checkpoint import CheckpointStore

    tracker = CollectiveTracker()
    tracker.hang = HangEvent("hang", 1_700_000_000.0, {1: 6997, 5: 6996}, "0xabc", 6998, "AllReduce", 31.0, 30.0)
    state = tracker.save_state()
    orjson.dumps(state)  # no integer keys left
    store = CheckpointStore(tmp_path / "state.json")
    store.save({"tracker": state, "other": {3: "an integer key anywhere else is written as a string too"}})
    back = CollectiveTracker()
    back.load_state(store.load()["tracker"])
    assert back.hang == tracker.hang
