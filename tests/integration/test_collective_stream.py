"""Collective timing through the real stream: with two workers in one group (a job's ranks and streams on both,
its cross-rank stage on one), stragglers, slow streams and hangs get the verdicts `rankwatch analyze` gives;
and the measured bar of docs/DETECTION.md on both paths (CI-sized)."""

from __future__ import annotations

import time

import pytest
from rankwatch.processors.offline import analyze

from rankwatch.eval_ops import bar_met, evaluate_ops
from rankwatch.parsing import parse_iso
from rankwatch.simulate import Fault, Scenario, write_job

from .conftest import WorkerProcess, make_settings, read_topic
from .test_logkeys_stream import _events, _send, _wait

COLLECTIVE = ("straggler", "op_timing", "hang")


def verdicts(anomalies) -> set:
    return {(a["detector"], a["rank"], round(a["event_time_s"], 3), a["severity"]) for a in anomalies
            if a["detector"] in COLLECTIVE}


@pytest.mark.timeout(300)
def test_two_workers_give_the_collective_verdicts_of_analyze(broker, tmp_path):
    settings = make_settings(broker.bootstrap, partitions=4)
    jobs = {"slow": Scenario(ranks=8, steps=260, seed=21, faults=[
                Fault("straggler", 5, 60, 40, 0.2), Fault("slow_stream", 2, 180, 14, 2.0, stream="tp")]),
            "stuck": Scenario(ranks=8, steps=200, seed=22, faults=[Fault("hang", 3, 150)], watchdog_s=90.0)}
    expected, records = set(), []
    from rankwatch.processors.offline import read_records

    for name, sc in jobs.items():
        write_job(sc, tmp_path / name)
        expected |= verdicts([dict(a.to_dict(), event_time_s=a.event_time) for a in analyze([str(tmp_path / name)])])
        records += read_records([str(tmp_path / name)])
    records.sort(key=lambda r: r.ts)
    assert {(d, r) for d, r, _, _ in expected} >= {("straggler", 5), ("op_timing", 2), ("hang", 3)}

    # the second worker judges its batches in slices of 64 records (`max_batch_records`) and gives every batch's
    # op verdicts with the next one (`defer_op_records`, `defer_min_messages`), or on its idle flush: the same
    # verdicts, and its job clock must not pass records it has read but not judged yet
    workers = [WorkerProcess(settings), WorkerProcess(settings, env_extra={"RANKWATCH_MAX_BATCH_RECORDS": "64",
                                                                         "RANKWATCH_DEFER_OP_RECORDS": "1",
                                                                         "RANKWATCH_DEFER_MIN_MESSAGES": "1"})]
    try:
        warmup = [r for r in records if r.kind == "metrics"][:200]
        for r in warmup:
            r.job = "warmup"
        _send(settings, warmup)
        _wait(lambda: all(_events(w.metrics_port) > 0 for w in workers), 90, "both workers to consume")
        _send(settings, records)

        def streamed():
            got = [dict(a, event_time_s=parse_iso(a["event_time"])) for a in read_topic(settings,
                                                                                          settings.topic_anomalies)]
            return verdicts(a for a in got if a["job"] in jobs)

        # the hang is judged once both workers report the job read to its end and its silence has lasted
        try:
            _wait(lambda: streamed() >= expected, 150, "the stream to reach analyze's verdicts")
        except AssertionError as e:
            got = streamed()
            raise AssertionError(f"{e}; missing {sorted(expected - got)}, extra {sorted(got - expected)}") from None
        time.sleep(3.0)
        assert streamed() == expected
    finally:
        for w in workers:
            w.stop()


@pytest.mark.timeout(400)
def test_collective_bar_offline_and_streaming(broker):
    lines, results = evaluate_ops(seeds=4, path="both", bootstrap=broker.bootstrap, normal_steps=400)
    print("\n".join(lines))
    assert set(results) == {"offline", "stream"}
    for path, (q, normal) in results.items():
        assert all(x.faults >= 4 for x in q.values()), path
        assert bar_met(q, normal), (path, lines)
        assert sum(normal["alarms"].values()) <= 2, (path, normal)  # false alarms on long normal runs
        # seeds 1 and 3 are cancelled: by Slurm's banner, and with no Slurm output but the GPUs' memory freed
        assert not normal["alarms"].get("hang"), (path, normal)
