"""Records in, anomalies out. The single home of detection logic, driven by the Faust agents,
`rankwatch analyze` and the in-training hook alike, so streaming and offline agree by construction."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rankwatch.models.straggler import StepStragglerDetector, StragglerConfig
from rankwatch.models.training import Finding, RankMetricsDetector, TrainingDetectorConfig

from rankwatch.records import Anomaly, Record


@dataclass
class DetectionConfig(TrainingDetectorConfig):
    """The pipeline's one config: per-rank training detectors plus the cross-rank straggler detector."""

    straggler_ratio: float = 0.3
    straggler_k: float = 8.0
    straggler_min_ranks: int = 3


class Pipeline:
    """Holds per-key detector state (job/rank for training metrics, job for cross-rank checks).
    No Kafka, files or Prometheus here."""

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.ranks: dict[tuple[str, int | None], RankMetricsDetector] = {}
        self.stragglers: dict[str, StepStragglerDetector[Record]] = {}
        self.checkpoints: dict[tuple[str, int | None], str] = {}
        self.events = 0
        self.errors = 0  # records a detector could not handle (logged, skipped; the stream goes on)
        self.last_error: str = ""

    def process(self, records: Iterable[Record]) -> list[Anomaly]:
        out: list[Anomaly] = []
        for rec in records:
            out.extend(self.process_one(rec))
        return out

    def process_one(self, rec: Record) -> list[Anomaly]:
        self.events += 1
        try:
            if rec.kind == "metrics":
                return self._metrics(rec)
            if rec.kind == "log":
                self._log(rec)
        except (TypeError, ValueError, KeyError) as exc:
            # A record that passed parsing but trips a detector must not stop the stream for every rank.
            self.errors += 1
            self.last_error = f"{rec.kind} record {rec.file}:{rec.offset}: {exc!r}"
        return []

    def _log(self, rec: Record) -> None:
        if "checkpoint" in rec.data:  # recognised by the parser: "Saving checkpoint to ..."
            self.checkpoints[(rec.job, rec.rank)] = str(rec.data["checkpoint"])

    def _metrics(self, rec: Record) -> list[Anomaly]:
        key = (rec.job, rec.rank)
        det = self.ranks.get(key)
        if det is None:
            det = self.ranks[key] = RankMetricsDetector(self.config)
        step = int(rec.data["step"])
        out = [self._anomaly(rec, f) for f in det.update(step, rec.data)]
        st = rec.data.get("step_time_s")
        if rec.rank is not None and isinstance(st, (int, float)) and st == st:
            out.extend(self._straggler(rec, step, float(st)))
        return out

    def _straggler(self, rec: Record, step: int, step_time: float) -> list[Anomaly]:
        c = self.config
        det = self.stragglers.get(rec.job)
        if det is None:
            det = self.stragglers[rec.job] = StepStragglerDetector(
                StragglerConfig(ratio=c.straggler_ratio, k=c.straggler_k, min_ranks=c.straggler_min_ranks))
        out = []
        for f in det.add(rec.rank, step, step_time, rec):
            msg = (f"rank {f.rank} took {f.value:.3g}s at step {f.step}, {f.value / f.median:.2f}x the median "
                   f"{f.median:.3g}s of {f.ranks} ranks (threshold {f.threshold:.3g}s)")
            rank_det = self.ranks.get((rec.job, f.rank))
            info = rank_det.threshold_info({}) if rank_det is not None else {}
            finding = Finding("straggler", "step_time_s", f.value, f.median, f.threshold, f.score,
                              "critical" if f.value > 2 * f.median else "warning", msg,
                              {"step": f.step, "ranks_compared": f.ranks, "threshold_info": info})
            out.append(self._anomaly(f.ref, finding))
        return out

    def _anomaly(self, rec: Record, f: Finding) -> Anomaly:
        ctx = dict(f.context)
        ctx.setdefault("step", rec.data.get("step"))
        if isinstance(rec.data.get("lr"), float):
            ctx["lr"] = rec.data["lr"]  # for context: was the learning rate just changed?
        ctx["model_checkpoint"] = self.checkpoints.get((rec.job, rec.rank))
        return Anomaly(detector=f.detector, signal=f.signal, job=rec.job, rank=rec.rank, event_time=rec.ts,
                       value=f.value, expected=f.expected, score=f.score, threshold=f.threshold,
                       severity=f.severity, message=f.message, context=ctx, source_file=rec.file,
                       source_offset=rec.offset)

    def save_state(self) -> dict[str, Any]:
        return {"ranks": [[job, rank, d.save_state()] for (job, rank), d in self.ranks.items()],
                "stragglers": {job: d.save_state() for job, d in self.stragglers.items()},
                "checkpoints": [[job, rank, path] for (job, rank), path in self.checkpoints.items()]}

    def load_state(self, state: dict[str, Any]) -> None:
        for job, rank, st in state.get("ranks", []):
            det = self.ranks[(job, rank)] = RankMetricsDetector(self.config)
            det.load_state(st)
        for job, st in state.get("stragglers", {}).items():
            self.stragglers[job] = StepStragglerDetector()
            self.stragglers[job].load_state(st)
        for job, rank, path in state.get("checkpoints", []):
            self.checkpoints[(job, rank)] = path
