"""Records in, anomalies out. The single home of detection logic, driven by the Faust agents,
`rankwatch analyze` and the in-training hook alike, so streaming and offline agree by construction.

Two stages (docs/ARCHITECTURE.md): stage 1 runs per-key detectors by record family and emits compact summaries;
stage 2 runs the cross-rank detectors of each job over those summaries. `process` runs both in process
(`analyze`, the hook); the worker runs `first_stage` where a key's partition is and `second_stage` where the
job's summaries partition is, with the job-keyed summaries topic in between.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from rankwatch.models.collective import CollectiveConfig
from rankwatch.models.job_slowdown import SlowdownConfig
from rankwatch.models.logkeys import LogKeyConfig
from rankwatch.models.memory import MemoryDetectorConfig
from rankwatch.models.op_timing import OpTimingConfig
from rankwatch.models.training import TrainingDetectorConfig
from rankwatch.processors.collective_stage import CollectiveJob
from rankwatch.processors.logkey_stage import LogHandler, LogKeyJob
from rankwatch.processors.memory_stage import GpuImbalanceJob, GpuMemoryHandler
from rankwatch.processors.op_stage import NcclEventHandler, OpHandler
from rankwatch.processors.stages import Gauges, JobStage, Outbox, Summary
from rankwatch.processors.training_stage import MetricsHandler, SlowdownJob, StepStragglerJob

from rankwatch.records import Anomaly, Record


@dataclass
class DetectionConfig(TrainingDetectorConfig, SlowdownConfig, OpTimingConfig, CollectiveConfig, MemoryDetectorConfig,
                      LogKeyConfig):
    """The pipeline's one config (section [detection]): every detector's settings, one flat namespace."""

    straggler_ratio: float = 0.3
    straggler_k: float = 8.0
    straggler_min_ranks: int = 3


class FirstStageHandler(Protocol):
    """Per-key detectors of one record family."""

    def process(self, records: list[Record]) -> tuple[list[Anomaly], list[Summary]]: ...

    def save_state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class StageContext:
    """What handlers and job detectors share: the config, the gauges, the outbox and the error count."""

    def __init__(self, config: DetectionConfig, wanted: set[str]) -> None:
        self.config = config
        self.gauges = Gauges()
        self.outbox = Outbox()
        self.wanted = wanted
        self.errors = 0  # records a detector could not handle (logged, skipped; the stream goes on)
        self.last_error = ""
        self.wall: float | None = None  # the stream's processing time of the current call; None offline

    def wants(self, summary_type: str) -> bool:
        """Emit this summary type only if a stage-2 detector consumes it (summaries cost a topic hop)."""
        return summary_type in self.wanted

    def skip(self, rec: Record, exc: Exception) -> None:
        # A record that passed parsing but trips a detector must not stop the stream for every rank.
        self.errors += 1
        self.last_error = f"{rec.kind} record {rec.file}:{rec.offset}: {exc!r}"

    def skip_summary(self, summary: dict[str, Any], exc: Exception) -> None:
        # a malformed summary (another worker's version, a corrupt message) is counted, not fatal to stage 2
        self.errors += 1
        self.last_error = f"{summary.get('type')} summary of job {summary.get('job')}: {exc!r}"


# Stage 1: record family (Record.family()) -> handler classes, each sees every record of its family.
# Stage 2: job detector classes, one instance of each per job.
FIRST_STAGE: dict[str, list[type]] = {
    "metrics": [MetricsHandler],
    "op": [OpHandler],
    "log": [NcclEventHandler, LogHandler],
    "gpu": [GpuMemoryHandler],
}
JOB_DETECTORS: list[type] = [StepStragglerJob, SlowdownJob, CollectiveJob, GpuImbalanceJob, LogKeyJob]


class Pipeline:
    """Holds per-key detector state (stage 1) and per-job cross-rank state (stage 2).
    No Kafka, files or Prometheus here."""

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        wanted = {t for cls in JOB_DETECTORS for t in cls.summary_types}
        self.ctx = StageContext(self.config, wanted)
        self.handlers: dict[str, FirstStageHandler] = {
            f"{fam}/{cls.__name__}": cls(self.ctx) for fam, classes in FIRST_STAGE.items() for cls in classes}
        self.by_family = {fam: [self.handlers[f"{fam}/{cls.__name__}"] for cls in classes]
                          for fam, classes in FIRST_STAGE.items()}
        self.jobs: dict[str, JobStage] = {}
        self.events = 0

    # ---- shared state, as properties so callers need not know where it lives --------------------------
    @property
    def gauges(self) -> Gauges:
        return self.ctx.gauges

    @property
    def outbox(self) -> Outbox:
        return self.ctx.outbox

    @property
    def errors(self) -> int:
        return self.ctx.errors

    @property
    def last_error(self) -> str:
        return self.ctx.last_error

    @property
    def checkpoints(self) -> dict[tuple[str, int | None], str]:
        return self.handler(MetricsHandler).checkpoints  # type: ignore[attr-defined]

    def handler(self, cls: type) -> Any:
        """The stage-1 handler of that class (e.g. `pipeline.handler(GpuMemoryHandler)`)."""
        return next(h for h in self.handlers.values() if isinstance(h, cls))

    # ---- the stages --------------------------------------------------------------------------------------
    def first_stage(self, records: Iterable[Record], defer: bool = False) -> tuple[list[Anomaly], list[Summary]]:
        """Per-key detectors. Records are grouped by family (order kept within each), so a handler can batch
        across keys (one LSTM forward pass for every stream in the micro-batch). `defer`: handlers that can
        (collective ops) give this batch's findings with the next call or `flush_deferred`, and those of a batch
        deferred before with this one (processors/app.py: the worker overlaps the LSTM with the next batch)."""
        by_family: dict[str, list[Record]] = defaultdict(list)
        clocks: dict[tuple[str, str], float] = {}
        for rec in records:
            self.events += 1
            family = rec.family()
            by_family[family].append(rec)
            if rec.ts > clocks.get((rec.job, family), float("-inf")):
                clocks[(rec.job, family)] = rec.ts
        out: list[Anomaly] = []
        # every record advances its job's clock in stage 2, whatever summaries the handlers emit: a hang is
        # judged against the time the job's other records (GPU samples, other ranks) say it is
        summaries: list[Summary] = [{"type": "clock", "job": job, "family": fam, "ts": ts}
                                    for (job, fam), ts in clocks.items()]
        for family, recs in by_family.items():
            for handler in self.by_family.get(family, ()):
                found, summ = handler.process(recs, defer=True) if defer and hasattr(handler, "flush") \
                    else handler.process(recs)
                out.extend(found)
                summaries.extend(summ)
        return out, summaries

    def flush_deferred(self) -> tuple[list[Anomaly], list[Summary]]:
        """The findings and summaries of deferred batches (first_stage with `defer`)."""
        out: list[Anomaly] = []
        summaries: list[Summary] = []
        for handler in self.handlers.values():
            if hasattr(handler, "flush"):
                found, summ = handler.flush()
                out.extend(found)
                summaries.extend(summ)
        return out, summaries

    @property
    def deferred(self) -> tuple[int, int]:
        """(batches deferred so far, those whose findings have been given since): equal when none is pending."""
        hs = [h for h in self.handlers.values() if hasattr(h, "flush")]
        return sum(h.deferred_begun for h in hs), sum(h.deferred_done for h in hs)

    def job_stage(self, job: str) -> JobStage:
        stage = self.jobs.get(job)
        if stage is None:
            stage = self.jobs[job] = JobStage(job, [cls(job, self.ctx) for cls in JOB_DETECTORS],
                                              on_bad=self.ctx.skip_summary)
        return stage

    def second_stage(self, summaries: Iterable[Summary], wall: float | None = None) -> list[Anomaly]:
        """Cross-rank detectors, per job. `wall`: the stream's processing time (advances idle job clocks)."""
        by_job: dict[str, list[Summary]] = defaultdict(list)
        for s in summaries:
            by_job[str(s.get("job", ""))].append(s)
        out: list[Anomaly] = []
        self.ctx.wall = wall
        for job, items in by_job.items():
            out.extend(self.job_stage(job).process(items, wall))
        return out

    def process(self, records: Iterable[Record]) -> list[Anomaly]:
        found, summaries = self.first_stage(records)
        return found + self.second_stage(summaries)

    def process_one(self, rec: Record) -> list[Anomaly]:
        return self.process([rec])

    def tick(self, wall: float | None = None, jobs: Iterable[str] | None = None) -> list[Anomaly]:
        """Judge the absence of events (hangs) on each job's clock (processors/stages.py: `JobStage.now`)."""
        out: list[Anomaly] = []
        self.ctx.wall = wall
        for job in list(self.jobs) if jobs is None else jobs:
            if job in self.jobs:
                out.extend(self.jobs[job].tick(wall))
        return out

    def finish(self, wall: float | None = None) -> list[Anomaly]:
        """End of input (offline): the moment of judgement for whatever is still open. `wall`: the time of the
        analysis, if the logs are all there is (nothing came after their end until then), else None."""
        out: list[Anomaly] = []
        for stage in self.jobs.values():
            out.extend(stage.finish(wall))
        return out

    def drop_jobs(self, jobs: Iterable[str]) -> None:
        """Forget the stage-2 state of jobs this worker no longer owns (their summaries partition moved)."""
        for job in jobs:
            self.jobs.pop(job, None)

    # ---- persistence ----------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return {"handlers": {fam: h.save_state() for fam, h in self.handlers.items()},
                "jobs": {job: st.save_state() for job, st in self.jobs.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        if "ranks" in state:  # snapshots written before the two stages: the metrics handler's state
            state = {"handlers": {"metrics/MetricsHandler": state}, "jobs": {}}
        for fam, st in state.get("handlers", {}).items():
            if fam in self.handlers:
                self.handlers[fam].load_state(st)
        for job, st in state.get("jobs", {}).items():
            self.job_stage(job).load_state(st)
