"""Prometheus metrics of the worker. Label values come from fixed vocabularies (record kinds, detectors,
severities, signals, topic names, collective names) plus `job`, which is capped at `max_job_labels` distinct
values (the rest are reported as "other"). Per-rank detail lives in the anomaly records, not in Prometheus
series, with two bounded exceptions: the straggler gauge carries the one rank it names (one series per job), and
the per-GPU memory gauges carry host and gpu (capped per worker, dropped when a GPU goes silent; docs/MEMORY.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from rankwatch.processors.stages import Gauges

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Gauges that detectors set through `Pipeline.gauges` (no Prometheus import in detectors): name -> (help,
# label names). The first label is always `job` (capped like every job label); the others must be bounded.
DETECTOR_GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "rankwatch_log_templates": ("Log templates (log keys) mined for the job", ("job",)),
    "rankwatch_log_templates_unknown": ("Log templates of the job that its DeepLog model does not know "
                                        "(new since the model was trained or bootstrapped)", ("job",)),
    "rankwatch_deeplog_model_ready": ("1 when the job's DeepLog model judges its log keys (0: bootstrapping)",
                                      ("job",)),
}


def _declare_memory_gauges() -> None:
    """Per-GPU memory gauges (processors/memory_stage.py): the one place host and gpu are labels, as GPU memory
    monitoring asks; bounded by `mem_gauge_max_gpus` per worker and dropped when a GPU goes silent."""
    from rankwatch.processors.memory_stage import GAUGE_LABELS, GAUGES

    DETECTOR_GAUGES.update({name: (doc, GAUGE_LABELS) for name, doc in GAUGES.items()})


def _declare_collective_gauges() -> None:
    """Hang and straggler state per job (processors/collective_stage.py): one series per job each; the straggler
    gauge names its rank as a label, only while the episode lasts, so it stays one series per job."""
    from rankwatch.processors.collective_stage import HANG_GAUGE, STRAGGLER_GAUGE

    DETECTOR_GAUGES[HANG_GAUGE] = ("1 while a collective of the job hangs (ranks never reached an op the others "
                                   "are stuck in), else 0", ("job",))
    DETECTOR_GAUGES[STRAGGLER_GAUGE] = ("How late the job's straggler enqueues its collectives, seconds after the "
                                        "median rank; present only while a straggler is named", ("job", "rank"))


_declare_memory_gauges()
_declare_collective_gauges()

# collective names a stream's op-timing anomalies are counted under (anything else: "other")
OP_ROLES = frozenset({"allreduce", "allgather", "reducescatter", "broadcast", "reduce", "send", "recv",
                      "alltoall", "gather", "scatter", "sendrecv"})


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, max_job_labels: int = 50) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.max_job_labels = max_job_labels
        self._jobs: set[str] = set()
        self.events = Counter("rankwatch_events", "Records processed, by kind", ["kind"], registry=r)
        self.anomalies = Counter("rankwatch_anomalies", "Anomalies published", ["detector", "severity", "job"],
                                 registry=r)
        self.decode_errors = Counter("rankwatch_decode_errors", "Messages that were not valid records "
                                     "(sent to the dead-letter topic)", ["topic"], registry=r)
        self.parse_errors = Counter("rankwatch_parse_errors", "Dead-lettered inputs seen on the dead-letter "
                                    "topic, from every shipper (stage parse) and worker (stage decode)",
                                    ["stage", "job"], registry=r)
        self.pipeline_errors = Counter("rankwatch_pipeline_errors", "Valid records a detector could not "
                                       "handle (skipped, logged)", registry=r)
        self.state_save_errors = Counter("rankwatch_state_save_errors", "Snapshots of the detectors' state "
                                         "(--state-file) that could not be written (logged; the last one stays)",
                                         registry=r)
        self.lag = Gauge("rankwatch_consumer_lag", "Messages behind the log end, by topic", ["topic"],
                         registry=r)
        self.latency = Histogram("rankwatch_processing_latency_seconds",
                                 "From the shipper producing a message to the worker taking it into a batch (one observation "
                                 "per message: a pack's records share its produce time)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.latest_score = Gauge("rankwatch_latest_score", "Score of the latest anomaly",
                                  ["detector", "signal", "job"], registry=r)
        self.op_timing = Counter("rankwatch_op_timing_anomalies", "Op-timing anomalies (slow rank/streams), by "
                                 "job and the collective the stream runs", ["job", "role"], registry=r)
        self.last_anomaly = Gauge("rankwatch_last_anomaly_timestamp_seconds",
                                  "When the latest anomaly was published", ["detector", "severity", "job"],
                                  registry=r)

        self.detector_gauges = {name: Gauge(name, doc, list(labels), registry=r)
                                for name, (doc, labels) in DETECTOR_GAUGES.items()}
        self._gauge_series: dict[str, set[tuple[str, ...]]] = {name: set() for name in DETECTOR_GAUGES}

    def sync_gauges(self, gauges: Gauges) -> None:
        """Mirror the detectors' current values; series a detector removed are removed here too."""
        for name, gauge in self.detector_gauges.items():
            current = {(self.job_label(labels[0]), *labels[1:]): v
                       for labels, v in gauges.values.get(name, {}).items()}
            for labels in self._gauge_series[name] - current.keys():
                gauge.remove(*labels)
            for labels, v in current.items():
                gauge.labels(*labels).set(v)
            self._gauge_series[name] = set(current)

    def job_label(self, job: str) -> str:
        if job in self._jobs:
            return job
        if len(self._jobs) < self.max_job_labels:
            self._jobs.add(job)
            return job
        return "other"

    def observe_anomaly(self, detector: str, severity: str, signal: str, job: str, score: float | None,
                        at: float, role: str | None = None) -> None:
        job = self.job_label(job)
        if detector == "op_timing":
            self.op_timing.labels(job, role if role in OP_ROLES else "other").inc()
        self.anomalies.labels(detector, severity, job).inc()
        self.last_anomaly.labels(detector, severity, job).set(at)
        if score is not None and score == score:
            self.latest_score.labels(detector, signal, job).set(score)
