"""Log keys online: levels, verdicts and bursts, the stage's order/persistence/outputs, and quality on simulated
jobs (bootstrapped on their own normal start)."""

from __future__ import annotations

import json
import pickle
import random
import re
import time

import numpy as np
import pytest
import torch
from rankwatch.models.logkeys import Line, LogKeyConfig, LogKeyDetector, log_level
from rankwatch.processors.logkey_stage import LogKeyJob
from rankwatch.processors.offline import read_records, run_pipeline
from rankwatch.processors.pipeline import DetectionConfig, Pipeline

from rankwatch.deeplog.model import save_checkpoint
from rankwatch.sim_logs import LogFault, LogScenario, random_faults, score_bursts, write_log_job

SMALL = dict(ranks=4, steps=2400, checkpoint_every=1000, eval_every=800, eval_offset=800, lr_milestones=(1300, 2000),
             epoch_steps=1200)
CFG = dict(deeplog_bootstrap_lines=800, deeplog_train_in_thread=False, deeplog_bootstrap_steps=200)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("text", "level"), [
    ("[E ProcessGroupNCCL.cpp:607] [Rank 3] Watchdog caught collective operation timeout", "error"),
    ("transport/net_ib.cc:<*> NCCL WARN NET/IB : Got completion from peer <*> with status=<*>", "error"),
    ("RuntimeError: CUDA error: an illegal memory access was encountered", "error"),
    ("NCCL INFO Call to connect returned Connection timed out, retrying", "warn"),
    # a blind test's benign lines that read as errors: INFO-level, advice, a retry loop
    ("NCCL INFO NET/Plugin: Failed to find ncclNetPlugin_v7 symbol.", "warn"),
    ("Token indices sequence length is longer than the specified maximum sequence length for this model (<*> > "
     "<*>). Running this sequence through the model will result in indexing errors", "warn"),
    ("<*>: UserWarning: Detected call of `lr_scheduler.step()` before `optimizer.step()`. Failure to do this "
     "will result in PyTorch skipping the first value of the learning rate schedule.", "warn"),
    ("wandb: Network error (ReadTimeout), entering retry loop.", "warn"),
    ("RuntimeError: this will cause a deadlock", "error"),  # raised all the same
    ("NVRM: Xid (PCI:<*>): <*>, pid=<*>, GPU has fallen off the bus.", "error"),
    ("[W socket.cpp:<*>] [c10d] The server socket has failed to bind to [::]:<*>", "warn"),
    ("WARNING megatron.checkpointing: could not find the metadata file <*>", "warn"),
    ("<*>:<*>: UserWarning: torch.utils.checkpoint: the use_reentrant parameter should be passed", "warn"),
    ("INFO trainer: step <*> | samples/s <*> | loss <*>", None),
    ("NCCL INFO comm <*> rank <*> nranks <*> - Init COMPLETE", None),
    ("Setting TORCH_NCCL_ASYNC_ERROR_HANDLING=<*>", None),
    # the scheduler doing its job (scancel, time limit, preemption) is noted; a node failure stays an error
    ("slurmstepd: error: *** STEP <*> ON <*> CANCELLED AT <*> DUE TO TIME LIMIT ***", "warn"),
    ("slurmstepd: *** JOB <*> CANCELLED AT <*> *** on <*>", "warn"),
    ("slurmstepd: error: *** <*> <*> ON <*> CANCELLED AT <*>-<*>-20T09:<*>:<*> ***", "warn"),  # JOB and STEP mined as one
    ("srun: Job step aborted: Waiting up to <*> seconds for job step to finish.", "warn"),
    ("slurmstepd: error: *** STEP <*> ON <*> CANCELLED AT <*> DUE TO NODE FAILURE, SEE SLURMCTLD LOG FOR DETAILS ***",
     "error"),
])
def test_log_level(text, level):
    assert log_level(text) == level


def test_python_logging_headers_keep_the_level_and_never_merge_levels():
    """Real Python-logging lines (tests/data/real_lines/python_logging.txt) and same-length messages of one logger:
    the header ('- __main__ - ERROR - ', '- INFO - __main__ - ', 'ERROR:root:', loguru's) must neither route every
    message of a logger into one template nor let an ERROR line join an INFO line's template (which had made the
    level a wildcard: the error was judged as routine)."""
    from pathlib import Path

    from rankwatch.parsing import SourceContext, parse_line

    real = Path(__file__).parent / "data" / "real_lines" / "python_logging.txt"
    lines = [x for x in real.read_text().splitlines() if x and not x.startswith("#")]
    lines += ["2024-05-01 10:00:00,123 - __main__ - INFO - Starting epoch 1 now",
              "2024-05-01 10:00:01,123 - __main__ - INFO - Saved model checkpoint 7",
              "2024-05-01 10:00:02,123 - __main__ - ERROR - Failed reading shard 4",
              "05/01/2024 10:00:05 - INFO - __main__ - Evaluation finished in 3s",
              "05/01/2024 10:00:06 - ERROR - __main__ - Evaluation crashed in 3s",
              "ERROR:root:Failed to read shard 4 now",
              "2024-05-01 10:00:09.120 | ERROR    | train:main:12 - Failed to read shard 4 now",
              "2023-06-13 17:30:22 | ERROR | fairseq.trainer | failed training epoch 143",  # as the real INFO line
              "[2025-11-14 21:08:58,482][__main__][ERROR] - Job completed unsuccessfully"]
    det = LogKeyDetector()
    ctx = SourceContext(path="/logs/job/train.log", job="j")
    seen: dict[int, set[str]] = {}
    for line in lines:
        rec = parse_line(line, ctx, 0, 1.0)
        assert rec.ts > 1e9, line  # the header's time was read (slashed dates too), not the arrival time
        tid, _ = det.mine(rec.data["msg"])
        header = re.search(r"(?:^| - | \| |\]\[)(CRITICAL|ERROR|WARNING|INFO)\b", line).group(1)
        want = {"CRITICAL": "error", "ERROR": "error", "WARNING": "warn", "INFO": None}[header]
        if "Process rank" not in line:  # its 'distributed training: False' is read as a word, not a level
            assert det.level(tid) == want, (line, det.miner.template(tid))
        seen.setdefault(tid, set()).add(header)
    assert all(len(headers) == 1 for headers in seen.values()), seen
    assert len(seen) >= len(lines) - 3  # only the three same-message lines in three header styles share a key
    assert not any(det.miner.template(t).startswith("<*>") for t in seen)  # never a level made a wildcard


def _lines(det: LogKeyDetector, rank: int, msgs: list[str], t0: float) -> list[Line]:
    return [Line(rank, t0 + i, det.mine(m)[0], {"msg": m}) for i, m in enumerate(msgs)]


def _bootstrapped(seed: int = 0) -> LogKeyDetector:
    det = LogKeyDetector(LogKeyConfig(deeplog_window=4, deeplog_bootstrap_steps=300))
    rng = random.Random(seed)
    t = 0.0
    for rank in range(3):
        det.collect(_lines(det, rank, ["init process group", "NCCL INFO Init COMPLETE"], t)[0])
        for line in _lines(det, rank, ["NCCL INFO Init COMPLETE"], t + 1):
            det.collect(line)
    for step in range(300):
        rank = step % 3
        msgs = [f"step {step} loss {rng.random():.3f}"]
        if rng.random() < 0.1:
            msgs.append(f"opened shard {rng.randint(0, 99)}")
        for line in _lines(det, rank, msgs, 10 + step):
            det.collect(line)
    from rankwatch.deeplog.model import fit_windows

    w, t_, wt, vocab = det.training_set()
    model = det.new_model(len(vocab))
    fit_windows(model, w, t_, wt, steps=300)
    det.install_model(model, vocab, "bootstrap")
    return det


def test_verdicts_and_one_anomaly_per_burst():
    det = _bootstrapped()
    t = 1000.0
    normal = _lines(det, 0, [f"step {i} loss 0.5" for i in range(12)], t)
    assert det.judge(normal) == []
    # a known startup key in the middle of training: unexpected; the error lines after it join its burst,
    # except once, when the burst escalates from warning to critical
    burst = _lines(det, 0, ["init process group", "RuntimeError: CUDA error: illegal memory access",
                            "RuntimeError: CUDA error: illegal memory access"], t + 20)
    found = det.judge(burst)
    assert [(f.reason, f.severity, f.escalation) for f in found] == [
        ("unexpected_key", "warning", False), ("new_key", "critical", True)]
    assert found[0].key_rank is not None and found[0].key_rank > 1 and found[0].top
    # the same error 2 minutes later is a new burst; on another rank it is that rank's own burst
    later = _lines(det, 0, ["RuntimeError: CUDA error: illegal memory access"], t + 200)
    other = _lines(det, 1, ["RuntimeError: CUDA error: illegal memory access"], t + 200)
    assert len(det.judge(later)) == 1 and len(det.judge(other)) == 1
    # a benign new template is not raised, and windows holding it are not judged
    quiet = _lines(det, 2, ["evaluation at iteration 500"] + [f"step {i} loss 0.5" for i in range(3)], t + 300)
    assert det.judge(quiet) == [] and det.stats["unjudged"] >= 3


def test_a_flood_of_a_never_seen_warning_is_raised_once_a_trickle_is_not():
    """A new warning is mostly benign (a deprecation, a rendezvous notice): not raised. One rank repeating it 50
    times within 10 minutes is a change in behaviour (a loss scaler skipping every step): raised once per key."""
    det = _bootstrapped()
    overflow = "[deepspeed] OVERFLOW! Rank 1 Skipping step. Attempted loss scale: 1024, reducing to 512"
    deprecation = "FutureWarning: `torch.cuda.amp.autocast(args...)` is deprecated"
    t = 5000.0
    trickle = [line for r in range(3) for line in _lines(det, r, [deprecation] * 20, t + 1000 * r)]  # 60 lines, 3 ranks
    assert det.judge(trickle) == []
    lines = []
    for i in range(120):  # every step of rank 1 from some point on, interleaved with its step lines
        lines += _lines(det, 1, [f"step {i} loss 0.5", overflow], t + 5000 + 2 * i)
    found = det.judge(lines)
    assert [(f.reason, f.severity, f.line.rank, f.line.ts) for f in found] == [
        ("new_key_flood", "warning", 1, t + 5000 + 2 * 49 + 1)]  # its 50th line
    state = json.loads(json.dumps(det.save_state()))
    again = LogKeyDetector(det.cfg)
    again.load_state(state)
    assert again.flooded == det.flooded and again.judge(_lines(again, 1, [overflow] * 60, t + 9000)) == []


def test_detector_contract_pickle_and_json_state():
    a = _bootstrapped(1)
    msgs = [f"step {i} loss 0.5" for i in range(8)] + ["init process group", "fatal error in worker"]
    b = pickle.loads(pickle.dumps(a))
    c = LogKeyDetector(a.cfg)
    c.load_state(json.loads(json.dumps(a.save_state())))
    outs = []
    for det in (a, b, c):
        found = det.judge(_lines(det, 1, msgs, 5000.0))
        outs.append([(f.line.tid, f.reason, f.severity, f.key_rank) for f in found])
    assert outs[0] and outs[0] == outs[1] == outs[2]


def _run(directory: str, **cfg) -> tuple[Pipeline, list]:
    pipe = Pipeline(DetectionConfig(**{**CFG, **cfg}))
    return pipe, [a for a in run_pipeline(pipe, read_records([directory])) if a.detector == "deeplog"]


def test_bootstrapped_job_flags_injected_bursts_on_the_right_rank(tmp_path):
    total = None
    for seed in (3, 4):
        sc = LogScenario(seed=seed, **SMALL)
        sc.faults = random_faults(sc, np.random.default_rng(seed), 4, after_step=900)
        bursts = write_log_job(sc, tmp_path / f"job{seed}")
        _, found = _run(str(tmp_path / f"job{seed}"))
        s = score_bursts(found, bursts)
        total = s if total is None else (total.add(s) or total)
    print("recall", total.recall(), "precision", total.precision(), total.found, total.false_alarms)
    assert total.recall() >= 0.9 and total.precision() >= 0.9


def test_no_alarms_on_a_normal_jobs_later_phases(tmp_path):
    """Checkpoint saves, evaluation loops, LR schedule and epoch messages all come after the bootstrap."""
    sc = LogScenario(seed=11, **SMALL)
    write_log_job(sc, tmp_path / "normal")
    pipe, found = _run(str(tmp_path / "normal"))
    stage = pipe.jobs["normal"].detector(LogKeyJob)
    assert stage.det.model_source == "bootstrap" and stage.det.stats["judged"] > 1000
    assert found == [], [a.message for a in found]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A 4-rank job with an NCCL burst, a rank running its startup again and a final CUDA error, analysed."""
    d = tmp_path_factory.mktemp("logkeys") / "j"
    sc = LogScenario(seed=5, **{**SMALL, "steps": 1500})
    sc.faults = [LogFault("nccl_net", 2, 1000, 2), LogFault("out_of_order", 1, 1200, 3),
                 LogFault("cuda_error", 3, 1450, 2)]
    bursts = write_log_job(sc, d)
    pipe, found = _run(str(d))
    return str(d), bursts, pipe, found


def test_stage_order_ids_and_verdicts_do_not_depend_on_arrival(job):
    """Summaries interleaved differently across ranks (as from several workers) give the same vocabulary and
    the same anomalies as analyze's event-time order: stage 2 driven as the worker drives it (with its clock), whose
    reorder puts the ranks' lines back in order (analyze's input comes merged by event time already)."""
    directory, bursts, ref_pipe, ref = job
    assert score_bursts(ref, bursts).recall() == 1.0
    records = list(read_records([directory]))
    by_rank: dict = {}
    for r in records:
        by_rank.setdefault(r.rank, []).append(r)
    rng = random.Random(0)
    shuffled = []
    while any(by_rank.values()):  # per-rank order kept, ranks interleaved at random in bursts
        rank = rng.choice([k for k, v in by_rank.items() if v])
        n = rng.randint(1, 40)
        shuffled.extend(by_rank[rank][:n])
        del by_rank[rank][:n]
    pipe = Pipeline(DetectionConfig(**CFG))
    got = []
    for i in range(0, len(shuffled), 333):
        found, summaries = pipe.first_stage(shuffled[i:i + 333])
        got.extend(found + pipe.second_stage(summaries, wall=time.time()))
    got.extend(pipe.finish())
    got = [a for a in got if a.detector == "deeplog"]
    assert {a.id for a in got} == {a.id for a in ref} and ref
    assert pipe.jobs["j"].detector(LogKeyJob).det.miner.templates() == ref_pipe.jobs["j"].detector(LogKeyJob).det.miner.templates()


def test_state_saved_mid_stream_resumes_with_the_same_verdicts(job):
    directory, _, _, ref = job
    records = list(read_records([directory]))
    first = Pipeline(DetectionConfig(**CFG))
    half = len(records) // 2
    out = []
    for i in range(0, half, 500):
        out.extend(first.process(records[i:min(i + 500, half)]))
    restored = Pipeline(DetectionConfig(**CFG))
    restored.load_state(json.loads(json.dumps(first.save_state())))
    for i in range(half, len(records), 500):
        out.extend(restored.process(records[i:i + 500]))
    out.extend(restored.finish())
    assert {a.id for a in out if a.detector == "deeplog"} == {a.id for a in ref} and ref


def test_templates_published_gauges_set_and_anomaly_points_at_the_line(job):
    _, _, pipe, found = job
    out = pipe.outbox.drain()
    keys = {k for fam, k, _ in out if fam == "logkey"}
    det = pipe.jobs["j"].detector(LogKeyJob).det
    assert keys == {f"j/{tid}" for tid in det.miner.templates()}
    created = [v for _, _, v in out if v["change"] == "created"]
    assert all(v["schema"] == "rankwatch.logkey/v1" and v["template"] and v["file"] for v in created)
    assert pipe.gauges.get("rankwatch_log_templates", ("j",)) == len(det.miner)
    assert pipe.gauges.get("rankwatch_deeplog_model_ready", ("j",)) == 1.0
    a = next(a for a in found if a.context["reason"] == "new_key")
    assert a.rank == 2 and a.severity == "critical" and "NCCL WARN" in a.context["line"]
    with open(a.source_file, "rb") as fh:
        fh.seek(a.source_offset)
        assert b"NCCL WARN" in fh.readline()


def test_trained_checkpoint_is_used_and_reloaded_when_newer(tmp_path, job):
    directory, bursts, pipe, _ = job
    boot = pipe.jobs["j"].detector(LogKeyJob).det
    ckpt = tmp_path / "models" / "best_model.pt"
    ckpt.parent.mkdir()
    boot.vocab.miner = boot.miner.save_state()
    save_checkpoint(ckpt, boot.model, boot.vocab)
    fresh, found = _run(directory, deeplog_model=str(ckpt.parent), deeplog_reload_check_s=0.0)
    det = fresh.jobs["j"].detector(LogKeyJob).det
    assert det.model_source == f"checkpoint:{ckpt}" and det.collected == 0
    assert score_bursts(found, bursts).precision() == 1.0 and found
    assert det.miner.templates() == boot.miner.templates()  # started from the model's own miner
    version = det.model_version
    newer = tmp_path / "models" / "epoch_9.pt"
    save_checkpoint(newer, boot.model, boot.vocab)
    fresh.jobs["j"].detector(LogKeyJob).tick(0.0)
    assert det.model_version == version + 1 and det.model_source == f"checkpoint:{newer}"


def test_a_stopped_jobs_teardown_lines_are_info_not_critical(tmp_path):
    """scancel on a healthy job: torchrun's agent prints a Traceback of its SignalException, a new error key.
    Within the stop's grace after Slurm's banner that is the teardown (info, `job_stopped_at`); the same lines
    with no stop line before them stay critical, and so does a crash two seconds before the banner (srun
    cancels the step when a task fails: the crash is the finding). A stop by failure (`DUE TO NODE FAILURE`)
    is no teardown: what follows it may be news."""
    from datetime import datetime, timezone

    sc = LogScenario(seed=11, **SMALL)
    found = {}
    for banner in (True, False, "NODE FAILURE"):
        job = tmp_path / f"job{banner}"
        write_log_job(sc, job)
        end = max(r.ts for r in read_records([str(job)]))
        at = datetime.fromtimestamp(int(end) + 5, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        agent = datetime.fromtimestamp(int(end) + 5.2, tz=timezone.utc).strftime("W%m%d %H:%M:%S.%f")
        crash = datetime.fromtimestamp(int(end) + 3, tz=timezone.utc).strftime("E%m%d %H:%M:%S.%f")
        lines = [f"[rank3]:{crash} 2211 train.py:371] RuntimeError: CUDA error: an illegal memory access was encountered"]
        why = f" DUE TO {banner}" if isinstance(banner, str) else ""
        lines += [f"slurmstepd: error: *** JOB 4242 ON node7 CANCELLED AT {at}{why} ***"] if banner else []
        lines += [  # the agent's shutdown as torch 2.4+ prints it (tests/data/real_lines/launcher.txt)
            f"{agent} 1359 torch/distributed/elastic/multiprocessing/api.py:897] Sending process 1365 closing "
            "signal SIGTERM",
            "Traceback (most recent call last):",
            '  File "/usr/local/bin/torchrun", line 8, in <module>',
            "    sys.exit(main())",
            "torch.distributed.elastic.multiprocessing.api.SignalException: Process 1359 got signal: 15"]
        (job / "slurm-4242.out").write_text("\n".join(lines) + "\n")
        _, found[banner] = _run(str(job))
    stopped = [a for a in found[True] if "Traceback" in a.message]
    assert stopped and all(a.severity == "info" and a.context["job_stopped_at"] == int(end) + 5 for a in stopped)
    assert [a.severity for a in found[True] if "illegal memory access" in a.message] == ["critical"]
    assert all(a.severity == "info" for a in found[True] if "illegal memory access" not in a.message)
    assert any(a.severity == "critical" and "Traceback" in a.message for a in found[False])
    # the failure's banner is the (error-level) finding of that burst: the Traceback after it is counted in it
    assert any(a.severity == "critical" and "NODE FAILURE" in a.message for a in found["NODE FAILURE"])
    assert not [a for b in (False, "NODE FAILURE") for a in found[b] if "job_stopped_at" in a.context]


def test_analyze_judges_lines_as_it_reads_them_not_all_at_its_end(job):
    # files at rest come merged by event time: a line older than the newest is in its place. Held until the
    # analysis had run for the stream's reorder wait (2 s of wall time), a fast analysis kept every line of a job
    # in memory and judged them in one batch at its end (2,048 ranks' logs: 2.2 GB, now 0.56 GB)
    directory, _, _, ref = job
    records = list(read_records([directory]))
    pipe = Pipeline(DetectionConfig(**CFG))
    got, held = [], []
    for i in range(0, len(records), 200):
        got.extend(pipe.process(records[i:i + 200]))
        held.append(len(pipe.jobs["j"].detector(LogKeyJob).reorder))
    got.extend(pipe.finish())
    assert max(held) <= 200, max(held)  # at most the lines of the newest instant, here far fewer than a batch
    assert {a.id for a in got if a.detector == "deeplog"} == {a.id for a in ref} and ref
