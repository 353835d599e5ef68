"""Records in, anomalies out. The single home of detection logic, driven by the Faust agents,
`rankwatch analyze` and the in-training hook alike, so streaming and offline agree by construction."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rankwatch.models.training import Finding, RankMetricsDetector, TrainingDetectorConfig

from rankwatch.records import Anomaly, Record

DetectionConfig = TrainingDetectorConfig  # one typed config for the pipeline's detectors


class Pipeline:
    """Holds per-key detector state (job/rank for training metrics). No Kafka, files or Prometheus here."""

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.ranks: dict[tuple[str, int | None], RankMetricsDetector] = {}
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
        except (TypeError, ValueError, KeyError) as exc:
            # A record that passed parsing but trips a detector must not stop the stream for every rank.
            self.errors += 1
            self.last_error = f"{rec.kind} record {rec.file}:{rec.offset}: {exc!r}"
        return []

    def _metrics(self, rec: Record) -> list[Anomaly]:
        key = (rec.job, rec.rank)
        det = self.ranks.get(key)
        if det is None:
            det = self.ranks[key] = RankMetricsDetector(self.config)
        step = int(rec.data.get("step", -1))
        return [self._anomaly(rec, f) for f in det.update(step, rec.data)]

    @staticmethod
    def _anomaly(rec: Record, f: Finding) -> Anomaly:
        return Anomaly(detector=f.detector, signal=f.signal, job=rec.job, rank=rec.rank, event_time=rec.ts,
                       value=f.value, expected=f.expected, score=f.score, threshold=f.threshold,
                       severity=f.severity, message=f.message, context=f.context, source_file=rec.file,
                       source_offset=rec.offset)

    def save_state(self) -> dict[str, Any]:
        return {"ranks": [[job, rank, d.save_state()] for (job, rank), d in self.ranks.items()]}

    def load_state(self, state: dict[str, Any]) -> None:
        for job, rank, st in state.get("ranks", []):
            det = self.ranks[(job, rank)] = RankMetricsDetector(self.config)
            det.load_state(st)
