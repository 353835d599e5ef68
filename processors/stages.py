"""The second stage: cross-rank detectors per job, fed by compact summaries from the first stage.

Per-key detectors (one rank's loss, one rank/stream's op intervals, one GPU's memory) run where their key's
partition is. Checks that compare the ranks of a job cannot: a job's ranks land on many partitions and workers.
The first stage therefore emits small `Summary` dicts (e.g. `{type: "ops", job, rank: [...], comm: [...], n: [...],
ts: [...]}`, a batch's ops of one job as columns),
which reach one `JobStage` per job: in process for `rankwatch analyze` and the hook, through the job-keyed
summaries topic in the stream. Same code, so the verdicts agree whatever the number of workers.

Time. Offline, records are merged by event time and every first-stage batch sends a `clock` summary per job
and record family: the job's clock is the latest event time, detectors that judge the absence of events (a
hang) are ticked whenever it advances by `tick_every_s`, and the end of input is the moment of judgement
(`finish`). In the stream, a job's keys are spread over partitions and workers that may lag one another, so
the latest event time overstates what is known. Every worker reports, a few times a second, a low watermark per
job (processors/watermarks.py), after the summaries of the records it covers; the job's clock is the earliest
of the workers' reports: everything before it has arrived. A worker that lags holds the clock back; a silent
job (a hang) lets it advance at wall speed once everything is read.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any, Protocol

from rankwatch.records import Anomaly

Summary = dict[str, Any]  # JSON-able; keys: type, job, ts, and type-specific fields (rank, file, offset, ...)


BadSummary = Callable[[Summary, Exception], None]  # counts a malformed summary (StageContext.skip_summary)
MALFORMED = (KeyError, TypeError, ValueError)  # what reading a summary's fields raises on a malformed one


def take_each(summaries: Iterable[Summary], take: Callable[[Summary], Any], on_bad: BadSummary) -> None:
    """`take` every summary; one that is malformed (another worker's version, a corrupt message) is counted
    and skipped, so the batch's good summaries still count. `take` must raise before it changes anything."""
    for s in summaries:
        try:
            take(s)
        except MALFORMED as exc:
            on_bad(s, exc)


def anomaly_fields(a: Anomaly) -> dict[str, Any]:
    """A first-stage finding as a summary field, for stage 2 to hold and release (`Anomaly(**fields)`)."""
    d = asdict(a)
    d.pop("detected_at", None)
    return d


def finite(x: Any) -> float:
    """A summary's number: float(x), refusing NaN and infinities (they would poison medians and clocks)."""
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"not a finite number: {x!r}")
    return v


class JobDetector(Protocol):
    """A cross-rank detector of one job. Plain object: no Kafka, files or Prometheus."""

    summary_types: tuple[str, ...]

    def process(self, summaries: list[Summary]) -> list[Anomaly]: ...

    def tick(self, now: float) -> list[Anomaly]: ...

    def finish(self, wall: float | None = None) -> list[Anomaly]:
        """End of input (offline). `wall`: when the logs are judged; their silence since they end lasts till then."""

    def save_state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class Gauges:
    """Current values the worker exports as Prometheus gauges: name -> label values -> value. Detectors write
    here instead of importing prometheus_client; the worker declares each name's labels (processors/sinks.py)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[str, ...], float]] = defaultdict(dict)

    def set(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self.values[name][labels] = float(value)

    def remove(self, name: str, labels: tuple[str, ...]) -> None:
        self.values.get(name, {}).pop(labels, None)

    def get(self, name: str, labels: tuple[str, ...]) -> float | None:
        return self.values.get(name, {}).get(labels)


class Outbox:
    """Messages a detector wants published besides anomalies (e.g. a new log template to the log-keys topic):
    (topic family as in Settings.topics(), key, JSON-able value). The worker drains and sends them; offline
    they are kept for inspection (`drain`)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, Any]] = []

    def put(self, family: str, key: str, value: Any) -> None:
        self.items.append((family, key, value))

    def drain(self) -> list[tuple[str, str, Any]]:
        out, self.items = self.items, []
        return out


JobDetectorFactory = Callable[[str], JobDetector]  # job name -> detector


class JobStage:
    """The second stage of one job: routes summaries to its detectors by type and keeps the job's clock."""

    def __init__(self, job: str, detectors: Iterable[JobDetector], tick_every_s: float = 1.0,
                 on_bad: BadSummary | None = None) -> None:
        self.job = job
        self.on_bad: BadSummary = on_bad or (lambda s, exc: None)
        self.detectors = list(detectors)
        self.tick_every_s = tick_every_s
        self.routes: dict[str, list[JobDetector]] = defaultdict(list)
        for det in self.detectors:
            for t in det.summary_types:
                self.routes[t].append(det)
        self.event_time = -math.inf  # the latest event time of any record of the job
        self.last_tick = -math.inf
        # stream: (worker, family) -> [watermark, wall time last heard]
        self.progress: dict[tuple[str, str], list[float]] = {}

    def detector(self, cls: type) -> Any:
        """This job's stage-2 detector of that class (e.g. `stage.detector(LogKeyJob)`)."""
        return next(d for d in self.detectors if isinstance(d, cls))

    def process(self, summaries: list[Summary], wall: float | None = None) -> list[Anomaly]:
        """`wall`: the stream's processing time (None offline: then this also ticks on event time)."""
        out: list[Anomaly] = []
        by_detector: dict[int, list[Summary]] = defaultdict(list)
        progressed = False
        for s in summaries:
            t = s.get("type")
            if t == "clock":
                try:
                    self.event_time = max(self.event_time, finite(s["ts"]))
                except MALFORMED as exc:
                    self.on_bad(s, exc)
                continue
            if t == "progress":
                self._progress(s, wall)
                progressed = True
                continue
            for det in self.routes.get(t, ()):
                by_detector[id(det)].append(s)
        for det in self.detectors:
            batch = by_detector.get(id(det))
            if batch:
                out.extend(det.process(batch))
        if wall is None and self.event_time - self.last_tick >= self.tick_every_s:
            out.extend(self._tick(self.event_time))
        elif wall is not None and progressed:  # the job's clock may have moved: judge now, not at the next timer
            out.extend(self.tick(wall))
        return out

    def _progress(self, s: Summary, wall: float | None) -> None:
        ts = s.get("ts")  # null: the worker cannot tell yet (JSON has no -Infinity)
        self.progress[(str(s.get("source", "")), str(s.get("family", "")))] = [
            float(ts) if isinstance(ts, (int, float)) else -math.inf, wall if wall is not None else 0.0]

    def now(self, wall: float | None, forget_after_s: float = 10.0) -> float:
        """The job's clock (see the module doc)."""
        if wall is None:
            return self.event_time
        for key in [k for k, p in self.progress.items() if wall - p[1] > forget_after_s]:
            del self.progress[key]  # a worker that left the group (its keys moved to another)
        if not self.progress:
            return -math.inf  # nothing known yet: silence cannot be told from lag
        return min(ts for ts, _ in self.progress.values())

    def tick(self, wall: float | None = None) -> list[Anomaly]:
        now = self.now(wall)
        return self._tick(now) if math.isfinite(now) and now > self.last_tick else []

    def _tick(self, now: float) -> list[Anomaly]:
        self.last_tick = now
        out: list[Anomaly] = []
        for det in self.detectors:
            out.extend(det.tick(now))
        return out

    def finish(self, wall: float | None = None) -> list[Anomaly]:
        out: list[Anomaly] = []
        for det in self.detectors:
            out.extend(det.finish(wall))
        return out

    def save_state(self) -> dict[str, Any]:
        return {"event_time": self.event_time if math.isfinite(self.event_time) else None,
                "detectors": {type(d).__name__: d.save_state() for d in self.detectors}}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("event_time") is not None:
            self.event_time = float(state["event_time"])
            self.last_tick = self.event_time
        saved = state.get("detectors", {})
        for det in self.detectors:
            if type(det).__name__ in saved:
                det.load_state(saved[type(det).__name__])
