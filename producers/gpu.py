"""`producer --gpu`: sample every GPU of a node and publish GPU sample records to the GPU topic (key job/host/gpu).

Sources of samples:
- NVML through nvidia-ml-py (`nvml_sample_fn`): per GPU memory used/total, utilisation, temperature, power, and
  the memory of the compute processes NVML lists (`proc_used_bytes`, where the driver tells);
- a replay of recorded samples (`gpu_replay.read_samples`): GPU sample JSON lines (the format of docs/FORMATS.md) or the
  CSV that `nvidia-smi --query-gpu=timestamp,index,memory.used,memory.total,... --format=csv [-l 1]` prints,
  paced in real time or `--speed N` times faster (0: as fast as possible);
- any function returning per-GPU dicts (tests, demos, other telemetry).

Delivery: acks=all, idempotent producer; samples wait in a bounded buffer (`buffer_samples`) while the broker is
away. When it overflows the *oldest* samples are dropped (the newest say most about an OOM to come), counted in
`rankwatch_sampler_dropped_samples_total` and logged: never silently.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from rankwatch.producers.gpu_replay import paced

from rankwatch.config import Settings
from rankwatch.records import Record, encode_record

log = logging.getLogger("rankwatch.sampler")
MIB = 2**20
SampleFn = Callable[[], list[dict[str, Any]]]  # one dict per GPU: gpu, mem_used_bytes, mem_total_bytes, ...


class NvmlUnavailable(RuntimeError):
    """No NVML library or no NVIDIA GPU on this machine."""


@dataclass
class GpuSamplerConfig:
    """[sampler] section."""

    interval_s: float = 1.0
    devices: tuple[int, ...] | None = None  # NVML indices; default every GPU
    host: str | None = None  # default: this machine's name
    buffer_samples: int = 100_000  # held while the broker is away (at 8 GPUs x 1 Hz: ~3.5 h)
    send_batch: int = 1000
    stall_report_s: float = 5.0


# ---- NVML ---------------------------------------------------------------------------------------------------
def nvml_sample_fn(devices: Iterable[int] | None = None) -> SampleFn:
    """A sample function over NVML. Raises NvmlUnavailable when there is no driver library or no GPU."""
    try:
        import pynvml
    except ImportError as exc:  # nvidia-ml-py is a dependency; still, say what is missing
        raise NvmlUnavailable(f"nvidia-ml-py is not installed ({exc})") from exc
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(f"NVML: {exc}") from exc
    if count == 0:
        raise NvmlUnavailable("NVML found no NVIDIA GPU")
    wanted = list(devices) if devices else list(range(count))
    bad = [i for i in wanted if not 0 <= i < count]
    if bad:
        raise NvmlUnavailable(f"no GPU with index {bad} (this machine has {count})")
    handles = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in wanted]

    def optional(read: Callable[[], Any]) -> Any:
        try:
            return read()
        except pynvml.NVMLError:  # not supported on this GPU, or no permission: leave the field out
            return None

    def sample() -> list[dict[str, Any]]:
        out = []
        for i, h in handles:
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            d: dict[str, Any] = {"gpu": i, "mem_used_bytes": int(mem.used), "mem_total_bytes": int(mem.total)}
            util = optional(lambda h=h: pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            temp = optional(lambda h=h: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
            power = optional(lambda h=h: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0)
            procs = optional(lambda h=h: pynvml.nvmlDeviceGetComputeRunningProcesses(h))
            for name, v in (("util_pct", util), ("temp_c", temp), ("power_w", power)):
                if v is not None:
                    d[name] = float(v)
            used = [p.usedGpuMemory for p in procs or [] if isinstance(p.usedGpuMemory, int)]
            if used:  # None inside containers that cannot see the processes' PIDs
                d["proc_used_bytes"] = int(sum(used))
            out.append(d)
        return out

    return sample


# ---- rank mapping -------------------------------------------------------------------------------------------
def load_rank_map(path: str | None, env: dict[str, str] | None = None) -> dict[int, int]:
    """NVML index -> rank. From `--rank-map` (JSON `{"0": 8, ...}` or lines `gpu rank`), else from the
    launcher's environment: a sampler started inside one rank's process (`RANK`, `LOCAL_RANK`,
    `CUDA_VISIBLE_DEVICES`) maps its GPU to `RANK`; one per node (`NODE_RANK`/`GROUP_RANK` and
    `LOCAL_WORLD_SIZE`) maps GPU i to node_rank x local_world_size + i. Empty when nothing tells."""
    env = dict(os.environ) if env is None else env
    if path:
        text = Path(path).read_text()
        try:
            data = json.loads(text)
            return {int(k): int(v) for k, v in data.items()}
        except (json.JSONDecodeError, AttributeError):
            out = {}
            for line in text.splitlines():
                parts = line.replace(",", " ").split()
                if len(parts) == 2 and not line.lstrip().startswith("#"):
                    out[int(parts[0])] = int(parts[1])
            return out
    visible = [int(x) for x in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip().isdigit()]
    if "RANK" in env and "LOCAL_RANK" in env:
        local = int(env["LOCAL_RANK"])
        physical = visible[local] if local < len(visible) else local
        return {physical: int(env["RANK"])}
    node = env.get("NODE_RANK", env.get("GROUP_RANK"))
    if node is not None and "LOCAL_WORLD_SIZE" in env:
        lws = int(env["LOCAL_WORLD_SIZE"])
        physical = visible or list(range(lws))
        return {g: int(node) * lws + i for i, g in enumerate(physical[:lws])}
    return {}


class GpuSampler:
    """Turns a sample function's dicts into GPU sample records (host, rank, event time added)."""

    def __init__(self, sample_fn: SampleFn, job: str, host: str | None = None, ranks: dict[int, int] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.sample_fn = sample_fn
        self.job = job
        self.host = host or socket.gethostname()
        self.ranks = ranks or {}
        self.clock = clock
        self.errors = 0

    def sample(self) -> list[Record]:
        ts = self.clock()
        try:
            rows = self.sample_fn()
        except Exception as exc:  # noqa: BLE001 - a GPU fallen off the bus must not stop the sampler
            self.errors += 1
            if self.errors in (1, 10) or self.errors % 100 == 0:
                log.warning("sampling failed (%d times so far): %r", self.errors, exc)
            return []
        out = []
        for row in rows:
            gpu = int(row["gpu"])
            data = {"host": str(row.get("host") or self.host), **{k: v for k, v in row.items() if k != "host"}}
            out.append(Record("gpu", self.job, self.ranks.get(gpu), ts, "", -1, data))
        return out


# ---- publishing ---------------------------------------------------------------------------------------------
class SamplerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p = "rankwatch_sampler_"
        self.samples = Counter(p + "samples", "GPU samples taken", registry=registry)
        self.sent = Counter(p + "sent_samples", "GPU samples acknowledged by the broker", registry=registry)
        self.dropped = Counter(p + "dropped_samples", "Oldest samples dropped: buffer full while the broker "
                               "was away", registry=registry)
        self.send_failures = Counter(p + "send_failures", "Samples the producer failed to deliver (re-sent)",
                                     registry=registry)
        self.buffered = Gauge(p + "buffered_samples", "Samples waiting for the broker", registry=registry)
        self.stalled = Gauge(p + "stalled", "1 while the broker does not acknowledge", registry=registry)


class GpuPublisher:
    """Sends records to the GPU topic from a background thread; see the module for the delivery contract."""

    def __init__(self, settings: Settings, config: GpuSamplerConfig, metrics: SamplerMetrics,
                 producer_factory: Callable[[], Any] | None = None) -> None:
        self.topic = settings.topic_gpu
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self.factory = producer_factory or self._kafka_producer
        self.buffer: deque[Record] = deque()
        self.cond = threading.Condition()
        self.stop_event = threading.Event()
        self.dropped = 0
        self.sent = 0
        self.producer: Any = None
        self.thread = threading.Thread(target=self._run, name="rankwatch-gpu-publisher", daemon=True)

    def _kafka_producer(self) -> Any:
        from kafka import KafkaProducer

        return KafkaProducer(**self.settings.kafka_kwargs(), acks="all", enable_idempotence=True, linger_ms=20,
                             delivery_timeout_ms=7 * 24 * 3600 * 1000, request_timeout_ms=30000,
                             max_block_ms=3_600_000, retry_backoff_ms=200)

    def start(self) -> GpuPublisher:
        self.thread.start()
        return self

    def offer(self, records: list[Record]) -> None:
        with self.cond:
            for rec in records:
                if len(self.buffer) >= self.config.buffer_samples:
                    self.buffer.popleft()
                    self.dropped += 1
                    self.metrics.dropped.inc()
                    if self.dropped in (1, 100) or self.dropped % 10_000 == 0:
                        log.warning("GPU sample buffer full (%d) while the broker is away: %d oldest samples "
                                    "dropped so far", self.config.buffer_samples, self.dropped)
                self.buffer.append(rec)
            self.metrics.samples.inc(len(records))
            self.metrics.buffered.set(len(self.buffer))
            self.cond.notify()

    def _connect(self) -> bool:
        from kafka.errors import KafkaError

        while not self.stop_event.is_set() or self.buffer:
            try:
                self.producer = self.factory()
                return True
            except KafkaError as exc:
                self.metrics.stalled.set(1)
                log.warning("broker %s unreachable (%s); sampling goes on into the buffer", self.settings.bootstrap,
                            exc)
                if self.stop_event.wait(2.0):
                    return False
        return False

    def _run(self) -> None:
        from kafka.errors import KafkaTimeoutError

        if not self._connect():
            return
        while True:
            with self.cond:
                while not self.buffer and not self.stop_event.is_set():
                    self.cond.wait(0.5)
                if not self.buffer:
                    return
                batch = [self.buffer.popleft() for _ in range(min(len(self.buffer), self.config.send_batch))]
            futures = [self.producer.send(self.topic, key=r.key().encode(), value=encode_record(r)) for r in batch]
            started = time.monotonic()
            while True:
                try:
                    self.producer.flush(timeout=self.config.stall_report_s)
                    break
                except KafkaTimeoutError:
                    self.metrics.stalled.set(1)
                    if self.stop_event.is_set() and time.monotonic() - started > 2 * self.config.stall_report_s:
                        log.warning("stopping with %d samples unacknowledged and %d buffered: not delivered",
                                    len(batch), len(self.buffer))
                        return
                    log.warning("STALLED: broker has not acknowledged %d GPU samples for %.0f s; sampling goes on "
                                "into the buffer (%d held)", len(batch), time.monotonic() - started, len(self.buffer))
            self.metrics.stalled.set(0)
            failed = [r for r, f in zip(batch, futures, strict=True) if f.failed()]
            self.sent += len(batch) - len(failed)
            self.metrics.sent.inc(len(batch) - len(failed))
            if failed:
                self.metrics.send_failures.inc(len(failed))
                with self.cond:
                    self.buffer.extendleft(reversed(failed))  # again, first, in their order
                time.sleep(1.0)
            self.metrics.buffered.set(len(self.buffer))

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is buffered (up to `timeout`), then stop."""
        self.stop_event.set()
        with self.cond:
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)
        if self.producer is not None:
            self.producer.close(timeout=5)
        if self.buffer:
            log.warning("%d GPU samples were not delivered before shutdown", len(self.buffer))


def run_sampling(source: Iterable[list[Record]], publisher: GpuPublisher, stop: threading.Event) -> int:
    """Hand every batch of records to the publisher until the source ends or `stop` is set."""
    n = 0
    for records in source:
        if stop.is_set():
            break
        publisher.offer(records)
        n += len(records)
    return n


def live_batches(sampler: GpuSampler, interval_s: float, stop: threading.Event,
                 clock: Callable[[], float] = time.monotonic) -> Iterator[list[Record]]:
    """One sample of every GPU per interval, on a fixed schedule (a slow NVML call does not drift it)."""
    next_at = clock()
    while not stop.is_set():
        yield sampler.sample()
        next_at += interval_s
        delay = next_at - clock()
        if delay < 0:
            next_at = clock()  # fell behind: sample now, keep the interval from here
        elif stop.wait(delay):
            return


def replay_batches(records: Iterable[Record], speed: float, stop: threading.Event) -> Iterator[list[Record]]:
    for rec in paced(records, speed, stop=stop):
        yield [rec]
