"""What the scheduler and the launcher say when a job, or a worker of it, stops (real lines and their sources:
tests/data/real_lines/launcher.txt).

Why they matter: a job cancelled, preempted or torn down mid-step leaves some ranks short of the collective the
others had enqueued, which is what a hang looks like from the ops alone. Stage 2 does not call that a hang when
the job was stopped before the stall had lasted the hang threshold, and ends an open hang when the job is
stopped (models/hangs.py). Two events, by what stopped:

- `job_stop`, the whole job (or the whole attempt) stopped:
  - Slurm's banner, anywhere in the line (after a progress bar, with or without `slurmstepd: error: `): `*** JOB
    123 ON node01 CANCELLED AT 2024-04-20T09:09:37 DUE TO TIME LIMIT ***`, the `STEP 123.0` form, the reasons
    TIME LIMIT, PREEMPTION, NODE FAILURE(, SEE SLURMCTLD LOG ...), JOB REQUEUE, TASK FAILURE and Slurm 25.05's
    `DUE to SIGNAL Killed` (lower-case "to"), none for a plain scancel before 25.05, and the pre-15.08 `*** JOB
    123 CANCELLED AT ... *** on node`. The banner's own time is the event's time: a job killed at its time limit
    hours into a hang was stopped then, not at the file's last line.
  - torchrun's agent signalled (by srun, the scheduler, Ctrl-C): `Received 15 death signal, shutting down workers`
    (also `Signals.SIGTERM`), `SignalException: Process 1313 got signal: 2`; an elastic restart of the worker
    group: `Worker group FAILED. 3/3 attempts left; will restart worker group` (reason restart: this attempt's
    collectives will not continue).
  - Open MPI aborting the job: `mpirun noticed that process rank 1 with PID 363 on node n1 exited on signal 9
    (Killed).`; srun tearing the step down: `srun: forcing job termination`, `srun: Job step aborted: ...`.
- `worker_exit`, workers of one node: torchrun `failed (exitcode: -9) local_rank: 3 (pid: 812917) of binary: ...`,
  `Sending process 59460 closing signal SIGTERM` / `Closing process 293866 via signal SIGTERM`, DeepSpeed's
  `Killing subprocess 13266` and `... exits with return code = -9`, srun's `srun: error: n1: tasks 2,4-5: Killed`.
  Not a stop of the job: ranks on other nodes may well hang waiting for the dead one until NCCL's timeout, and
  that is a hang to report.

Fields: `by` (slurm, torchrun, deepspeed, mpirun), `reason`, and what the line names (`job_id`, `node`,
`signal`, `pid`, `local_rank`, `rank`, `exitcode`). A line without a time of its own (the `WARNING:torch.
distributed.elastic...:` logging of torch <= 2.0, srun's lines) takes the file's previous event time, which may
be long before the stop (a job killed hours into a hang): it is marked `undated`, with `written_by`, when it
was read (the shipper) or its file last written (at rest): a time it cannot be later than. Stage 2 dates such
a stop then, never too early, so it cannot excuse a hang that lasted.
"""

from __future__ import annotations

import re
from typing import Any

from rankwatch.formats.base import Parsed, SourceContext
from rankwatch.formats.prefixes import parse_iso

NAME = "launcher"
_SLURM = re.compile(r"\*\*\* (?P<scope>JOB|STEP) (?P<id>[\w.+]+) (?:ON (?P<node>\S+) )?CANCELLED AT "
                    r"(?P<at>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?: DUE (?i:to) (?P<why>[^*]+?))? \*\*\*"
                    r"(?: on (?P<node_after>\S+))?")
_WHY = (("TIME LIMIT", "time_limit"), ("PREEMPTION", "preemption"), ("NODE FAILURE", "node_failure"),
        ("JOB REQUEUE", "requeue"), ("TASK FAILURE", "task_failure"), ("SIGNAL", "signal"))
_DEATH = re.compile(r"Received (?:Signals\.)?(?P<sig>SIG[A-Z]+|\d+) death signal")
_SIGNAL_EXC = re.compile(r"SignalException: Process (?P<pid>\d+) got signal: (?P<sig>\d+)")
_RESTART = re.compile(r"Worker group FAILED\. (?P<left>\d+)/(?P<max>\d+) attempts left")
_MPI = re.compile(r"mpirun noticed that process rank (?P<rank>\d+) with PID \S+ on node \S+ exited on signal "
                  r"(?P<sig>\d+)")
_FAILED = re.compile(r"failed \(exitcode: (?P<code>-?\d+)\) local_rank: (?P<lr>\d+) \(pid: (?P<pid>\d+)\)")
_CLOSING = re.compile(r"(?:Sending process (?P<pid>\d+) closing signal|Closing process (?P<pid2>\d+) via signal) "
                      r"(?P<sig>SIG[A-Z]+)")
_KILLING = re.compile(r"Killing subprocess (?P<pid>\d+)")
_DS_EXIT = re.compile(r"--local_rank=(?P<lr>\d+)'.*\] exits with return code = (?P<code>-?\d+)")
_SRUN_TASKS = re.compile(r"srun: error: (?P<node>\S+): tasks? (?P<tasks>[\d,-]+): (?P<what>Exited with exit code "
                         r"(?P<code>\d+)|Killed|Terminated)")


def _slurm(body: str) -> Parsed | None:
    m = _SLURM.search(body)
    if m is None:
        return None
    why = (m.group("why") or "").upper()
    reason = next((r for key, r in _WHY if why.startswith(key)), why.lower().replace(" ", "_") or "cancelled")
    fields: dict[str, Any] = {"by": "slurm", "reason": reason, "scope": m.group("scope").lower(),
                              "job_id": m.group("id")}
    node = m.group("node") or m.group("node_after")
    if node:
        fields["node"] = node
    if reason == "signal":
        fields["signal"] = why.split(" ", 1)[1].strip().lower() if " " in why else ""
    return Parsed("log", {"event": "job_stop", "fields": fields}, None, parse_iso(m.group("at")))


def _signal(sig: str) -> int | str:
    return int(sig) if sig.isdigit() else sig


def _job(body: str) -> dict[str, Any] | None:
    """The fields of a job-wide stop other than Slurm's banner, or None."""
    if m := _DEATH.search(body):
        return {"by": "torchrun", "reason": "signal", "signal": _signal(m.group("sig"))}
    if m := _SIGNAL_EXC.search(body):
        return {"by": "torchrun", "reason": "signal", "signal": int(m.group("sig")), "pid": int(m.group("pid"))}
    if m := _RESTART.search(body):
        return {"by": "torchrun", "reason": "restart", "attempts_left": int(m.group("left"))}
    if m := _MPI.search(body):
        return {"by": "mpirun", "reason": "rank_died", "rank": int(m.group("rank")), "signal": int(m.group("sig"))}
    if "srun: forcing job termination" in body or "srun: Job step aborted" in body:
        return {"by": "slurm", "reason": "step_aborted"}
    return None


def _worker(body: str) -> dict[str, Any] | None:
    """The fields of one node's workers stopping, or None."""
    if m := _FAILED.search(body):
        return {"by": "torchrun", "reason": "worker_failed", "local_rank": int(m.group("lr")),
                "pid": int(m.group("pid")), "exitcode": int(m.group("code"))}
    if m := _CLOSING.search(body):
        return {"by": "torchrun", "reason": "teardown", "pid": int(m.group("pid") or m.group("pid2")),
                "signal": m.group("sig")}
    if m := _KILLING.search(body):
        return {"by": "deepspeed", "reason": "teardown", "pid": int(m.group("pid"))}
    if m := _DS_EXIT.search(body):
        return {"by": "deepspeed", "reason": "worker_failed", "local_rank": int(m.group("lr")),
                "exitcode": int(m.group("code"))}
    if m := _SRUN_TASKS.search(body):
        fields: dict[str, Any] = {"by": "slurm", "reason": "worker_failed", "node": m.group("node"),
                                  "tasks": m.group("tasks")}
        if m.group("code"):
            fields["exitcode"] = int(m.group("code"))
        else:
            fields["signal"] = m.group("what").lower()
        return fields
    return None


def parse(body: str, ctx: SourceContext) -> Parsed | None:
    """Any of the lines above; None otherwise. `undated` when neither the prefix nor the line gave a time."""
    p = _slurm(body) if "CANCELLED AT" in body else None
    if p is None:
        fields = _job(body)
        event = "job_stop"
        if fields is None:
            fields, event = _worker(body), "worker_exit"
        if fields is None:
            return None
        p = Parsed("log", {"event": event, "fields": fields})
    if p.ts is None and not ctx.line_dated:
        p.data["fields"]["undated"] = True
        p.data["fields"]["written_by"] = ctx.arrival
    return p


# a substring every line above contains (the registry tries the parser only on lines that have one)
KEYS = ("CANCELLED AT", "death signal", "got signal", "Worker group FAILED", "mpirun noticed", "srun: ",
        "(exitcode:", "closing signal", "via signal", "Killing subprocess", "exits with return code")

__all__ = ["NAME", "KEYS", "parse"]
