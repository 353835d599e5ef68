"""`MemoryWatcher`: this node's GPUs watched locally, without Kafka, by the service's detectors.

The library form of the users' memory tool (its `MemoryProfiler`/`OOMDetector`): sample, judge, call back,
report. `rankwatch memory profile|oom|leak|fragment` drive it; so can a user's script:

    watcher = MemoryWatcher(interval_s=1.0)
    watcher.add_warning_callback(lambda device, prediction: ...)   # e.g. lower the batch size
    watcher.start_monitoring()
    ...
    watcher.stop_monitoring()
    report = watcher.generate_report("memory.json")
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from rankwatch.memory_report import MemoryTimeline, build_report
from rankwatch.models.oom_prediction import OomPrediction
from rankwatch.processors.pipeline import DetectionConfig, Pipeline
from rankwatch.records import Anomaly, Record

log = logging.getLogger("rankwatch.memory")
WarningCallback = Callable[[Any, OomPrediction | None], None]


class MemoryWatcher:
    def __init__(self, sample_fn: Callable[[], list[dict[str, Any]]] | None = None, interval_s: float = 1.0,
                 devices: list[int] | None = None, job: str = "local", host: str | None = None,
                 config: DetectionConfig | None = None, clock: Callable[[], float] = time.time) -> None:
        self.interval_s = interval_s
        self.job, self.host, self.clock, self.devices = job, host, clock, devices
        self.pipeline = Pipeline(config)
        self.timeline = MemoryTimeline()
        self.anomalies: list[Anomaly] = []
        self.warning_callbacks: list[WarningCallback] = []
        self.anomaly_callbacks: list[Callable[[Anomaly], None]] = []
        self._sample_fn = sample_fn
        self._sampler: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- callbacks ----------------------------------------------------------------------------------------
    def add_warning_callback(self, fn: WarningCallback) -> None:
        """`fn(device, prediction)` on every OOM forecast raised or updated (device: the GPU index)."""
        self.warning_callbacks.append(fn)

    def add_anomaly_callback(self, fn: Callable[[Anomaly], None]) -> None:
        self.anomaly_callbacks.append(fn)

    # ---- feeding --------------------------------------------------------------------------------------------
    def feed(self, records: Iterable[Record]) -> list[Anomaly]:
        """Judge GPU sample records (from the sampler, or a replay); returns the anomalies they raised."""
        batch = list(self.timeline.watch(records))
        with self._lock:
            found = self.pipeline.process(batch)
        for a in found:
            self.anomalies.append(a)
            for fn in self.anomaly_callbacks:
                fn(a)
            if a.detector == "oom":
                from rankwatch.processors.memory_stage import GpuMemoryHandler
                det = self.pipeline.handler(GpuMemoryHandler).gpus.get((a.job, str(a.host), int(a.gpu or 0)))  # type: ignore
                for cb in self.warning_callbacks:
                    try:
                        cb(a.gpu, det.prediction if det is not None else None)
                    except Exception:  # noqa: BLE001 - a user's callback must not stop the watch
                        log.exception("OOM warning callback failed")
        return found

    def _ensure_sampler(self) -> None:
        """NVML unless a sample function was given; raises NvmlUnavailable without a GPU."""
        if self._sampler is None:
            from rankwatch.producers.gpu import GpuSampler, nvml_sample_fn

            fn = self._sample_fn or nvml_sample_fn(self.devices)
            self._sampler = GpuSampler(fn, self.job, self.host, clock=self.clock)

    def sample_once(self) -> list[Anomaly]:
        self._ensure_sampler()
        return self.feed(self._sampler.sample())

    # ---- running ----------------------------------------------------------------------------------------------
    def run(self, duration_s: float | None = None, stop: threading.Event | None = None) -> None:
        """Sample every `interval_s` until `duration_s` has passed or `stop` is set (blocking)."""
        stop = stop or self._stop
        end = time.monotonic() + duration_s if duration_s else None
        next_at = time.monotonic()
        while not stop.is_set() and (end is None or time.monotonic() < end):
            self.sample_once()
            next_at += self.interval_s
            stop.wait(max(0.0, next_at - time.monotonic()))

    def start_monitoring(self) -> None:
        self._stop.clear()
        self._ensure_sampler()  # fail here, not in the thread
        self._thread = threading.Thread(target=self.run, name="rankwatch-memory-watch", daemon=True)
        self._thread.start()

    def stop_monitoring(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    # ---- reporting ----------------------------------------------------------------------------------------
    def generate_report(self, path: str | None = None) -> dict[str, Any]:
        with self._lock:
            report = build_report(self.timeline, self.pipeline, self.anomalies)
        if path:
            with open(path, "wb") as fh:
                fh.write(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        return report
