"""`producer --tail PATH...`: tail logs, parse each line once, ship typed records to Kafka, lose nothing.

Delivery contract: a checkpoint (file identity + byte offset) is advanced only after the broker acknowledged
every record before it (acks=all, idempotent producer). After a crash the records written since the last
checkpoint are read back from the broker (producers/reconcile.py) so a restart neither loses nor repeats lines.
While the broker is unreachable the shipper stops reading (bounded memory), keeps retrying, says it is stalled
in its log and metrics, and carries on where it was when the broker returns.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from rankwatch.producers.checkpoint import CheckpointStore
from rankwatch.producers.packing import Message, PartitionMap, pack_messages, rank_group_key
from rankwatch.producers.reconcile import end_positions, shipped_since, tp_key
from rankwatch.producers.tail import HOST, Line, Tailer

from rankwatch.config import ConfigError, Settings, load_config
from rankwatch.formats.user import UserFormat, load_user_formats
from rankwatch.parsing import ContextResolver, ParseError, parse_line
from rankwatch.records import dead_letter, encode_record

log = logging.getLogger("rankwatch.producer")


@dataclass
class ShipperConfig:
    job: str | None = None
    rank: int | None = None
    checkpoint: str | None = None  # default: ~/.cache/rankwatch/ckpt-<hash of paths and job>.json
    batch_lines: int = 20000  # most lines read before waiting for acks (bounds memory during outages)
    linger_ms: int = 20
    delivery_timeout_ms: int = 7 * 24 * 3600 * 1000  # retry for a week rather than drop a line
    stall_report_s: float = 5.0
    poll_interval_s: float = 0.1
    max_line_bytes: int = 65536
    metrics_port: int = 9109  # 0: no HTTP endpoint
    compression: str | None = None  # gzip | snappy | lz4 | zstd (the last three need their Python package)
    pack_bytes: int = 256 * 1024  # most bytes of records packed into one message (producers/packing.py)
    op_group_ranks: int = 8  # collective-op records keyed by groups of this many ranks (0: by rank/stream)


class ShipperMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p = "rankwatch_shipper_"
        self.lines = Counter(p + "lines", "Lines shipped, by record kind", ["kind"], registry=registry)
        self.bytes = Counter(p + "bytes", "Bytes of log lines read", registry=registry)
        self.errors = Counter(p + "parse_errors", "Lines sent to the dead-letter topic", ["reason"],
                              registry=registry)
        self.truncated = Counter(p + "truncated_lines", "Lines over the size limit, cut", registry=registry)
        self.send_failures = Counter(p + "send_failures", "Records the producer failed to deliver (re-sent)",
                                     registry=registry)
        self.lag = Gauge(p + "lag_bytes", "Bytes written to tailed files and not yet shipped", registry=registry)
        self.stalled = Gauge(p + "stalled", "1 while the broker does not acknowledge", registry=registry)
        self.pending = Gauge(p + "pending_records", "Records sent and not yet acknowledged", registry=registry)
        self.files = Gauge(p + "files", "Files being tracked", registry=registry)


class TailerCollector:
    """Exposes the tailer's own counters (rotations, truncations, ...) at scrape time."""

    def __init__(self, tailer: Tailer) -> None:
        self.tailer = tailer

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        st = self.tailer.stats
        for name, value, doc in (
            ("rotations", st.rotations, "Files renamed away (rotation) and drained"),
            ("truncations", st.truncations, "Files that shrank (truncated) and were read again from 0"),
            ("copies_recognised", st.copies_recognised, "copytruncate copies resumed at the old offset"),
            ("deduplicated_lines", st.deduplicated, "Lines skipped after a crash: already on the broker"),
            ("read_errors", st.read_errors, "Failed reads of tailed files"),
        ):
            yield CounterMetricFamily(f"rankwatch_shipper_{name}", doc, value=value)


class StoppedWhileStalled(RuntimeError):
    """Shutdown was requested while records were still unacknowledged."""


def _reason_class(reason: str) -> str:
    # Bounded label values: the first words of the reason, never the offending content.
    return reason.split(":")[0].split(" is ")[0][:40]


class Shipper:
    def __init__(self, paths: list[str], settings: Settings, config: ShipperConfig, *,
                 registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time,
                 formats: tuple[UserFormat, ...] = ()) -> None:
        self.paths = [os.path.abspath(p) for p in paths]
        self.settings = settings
        self.config = config
        self.clock = clock
        self.topics = settings.topics()
        self.registry = registry or CollectorRegistry()
        self.metrics = ShipperMetrics(self.registry)
        self.tailer = Tailer(self.paths, max_line=config.max_line_bytes)
        self.registry.register(TailerCollector(self.tailer))
        self.store = CheckpointStore(config.checkpoint or default_checkpoint(self.paths, config.job))
        self.resolver = ContextResolver(self.paths, config.job, config.rank, formats)
        self._positions: dict[str, int] = {}
        self._inflight_marked = False
        self._acked_files: dict[str, dict] = {}
        self.producer: KafkaProducer | None = None
        self.partitions = PartitionMap(lambda topic: self.producer.partitions_for(topic) if self.producer else None)
        self.shipped_total = 0
        self.stop_event = threading.Event()

    # ---- startup --------------------------------------------------------------------------------------
    def _connect(self) -> None:
        kw = self.settings.kafka_kwargs()
        waited = 0.0
        while not self.stop_event.is_set():
            try:
                self.producer = KafkaProducer(
                    **kw, acks="all", enable_idempotence=True, linger_ms=self.config.linger_ms,
                    batch_size=256 * 1024,
                    delivery_timeout_ms=self.config.delivery_timeout_ms, request_timeout_ms=30000,
                    max_block_ms=3_600_000, compression_type=self.config.compression,
                    retry_backoff_ms=200)
                return
            except KafkaError as exc:
                self.metrics.stalled.set(1)
                if waited % 10 < 1:
                    log.warning("broker %s unreachable (%s); retrying, nothing is read meanwhile",
                                self.settings.bootstrap, exc)
                self.stop_event.wait(1.0)
                waited += 1.0

    def _restore(self) -> None:
        state = self.store.load()
        kw = self.settings.kafka_kwargs()
        consumer = KafkaConsumer(**kw, enable_auto_commit=False, group_id=None, consumer_timeout_ms=1000)
        try:
            positions = dict(state.get("partitions") or {})
            shipped: dict[str, set[int]] = {}
            if state.get("inflight") and positions:
                shipped = shipped_since(consumer, positions, None, HOST + ":")
            fresh = end_positions(consumer, [t for k, t in self.topics.items() if k != "anomaly"])
            for key, off in fresh.items():
                positions.setdefault(key, off)  # partitions never written to: start from their end now
            self._positions = positions
        finally:
            consumer.close()
        self.tailer.restore(state.get("files") or {}, shipped)
        self._acked_files = self.tailer.positions()
        if state:
            log.info("resuming %d files from checkpoint %s", len(state.get("files") or {}), self.store.path)

    def _save(self, inflight: bool) -> None:
        # Only positions captured after an acknowledgement are ever written: the tailer's live positions
        # already include lines read but not yet acknowledged.
        self.store.save({"files": self._acked_files, "partitions": self._positions, "inflight": inflight,
                         "saved_at": self.clock()})
        self._inflight_marked = inflight

    # ---- the shipping cycle ---------------------------------------------------------------------------
    def _encode(self, line: Line, now: float) -> tuple[str, bytes, bytes, bool]:
        ctx = self.resolver.context(line.fid, line.path)
        self.metrics.bytes.inc(line.end - line.offset)
        if line.truncated:
            self.metrics.truncated.inc()
        try:
            rec = parse_line(line.text, ctx, line.offset, now)
        except ParseError as exc:
            self.metrics.errors.labels(_reason_class(exc.reason)).inc()
            key = f"{ctx.job}/{ctx.rank}".encode()
            return self.topics["deadletter"], key, dead_letter(exc.reason, line.text, file=line.path,
                                                               offset=line.offset, job=ctx.job, fid=line.fid), False
        self.metrics.lines.labels(rec.kind).inc()
        group = rank_group_key(rec.job, rec.rank, self.config.op_group_ranks) if rec.kind == "op" else None
        return self.topics[rec.family()], group or rec.key().encode(), encode_record(rec), True

    def ship_once(self) -> int:
        """Read what is there (up to batch_lines), ship it, wait for acks, checkpoint. Returns lines shipped."""
        lines = self.tailer.poll(self.config.batch_lines)
        self.metrics.files.set(len(self.tailer.files))
        if not lines:
            if self._inflight_marked:
                self._acked_files = self.tailer.positions()  # nothing pending: live positions are acked
                self._save(inflight=False)
            return 0
        if not self._inflight_marked:
            self._save(inflight=True)  # from here until the next clean save, a crash triggers reconciliation
        now = self.clock()
        msgs = pack_messages([self._encode(line, now) for line in lines], self.partitions, self.config.pack_bytes)
        if log.isEnabledFor(logging.DEBUG):
            spans: dict[str, list[int]] = {}
            for ln in lines:
                span = spans.setdefault(ln.path, [ln.offset, ln.end])
                span[0], span[1] = min(span[0], ln.offset), max(span[1], ln.end)
            log.debug("batch of %d lines: %s", len(lines), spans)
        self._deliver(msgs)
        self._acked_files = self.tailer.positions()
        self._save(inflight=True)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("acknowledged; checkpoint %s", {f["path"]: f["offset"] for f in self._acked_files.values()})
        self.shipped_total += len(lines)
        return len(lines)

    def _deliver(self, msgs: list[Message]) -> None:
        assert self.producer is not None
        todo = msgs
        while todo:
            futures = [self.producer.send(t, key=k, value=v, partition=p) for t, k, v, p in todo]
            self.metrics.pending.set(len(futures))
            started = time.monotonic()
            while True:
                try:
                    self.producer.flush(timeout=self.config.stall_report_s)
                    break
                except KafkaTimeoutError:
                    self.metrics.stalled.set(1)
                    if self.stop_event.is_set() and time.monotonic() - started > 2 * self.config.stall_report_s:
                        # Asked to stop while the broker is away: leave without a checkpoint; the next start
                        # reconciles with the broker, so nothing is lost or doubled.
                        raise StoppedWhileStalled(f"{len(futures)} records unacknowledged at shutdown") from None
                    log.warning("STALLED: broker has not acknowledged %d records for %.0f s; still retrying, "
                                "reading is paused and nothing is dropped", len(futures),
                                time.monotonic() - started)
            self.metrics.stalled.set(0)
            self.metrics.pending.set(0)
            failed = []
            for msg, fut in zip(todo, futures, strict=True):
                if fut.failed():
                    failed.append(msg)
                else:
                    md = fut.value
                    key = tp_key(md.topic, md.partition)
                    if md.offset + 1 > self._positions.get(key, 0):
                        self._positions[key] = md.offset + 1
            if failed:
                self.metrics.send_failures.inc(len(failed))
                log.error("%d records failed delivery (%s); sending them again", len(failed),
                          futures[[f.failed() for f in futures].index(True)].exception)
                time.sleep(1.0)
            todo = failed

    def run(self) -> None:
        self._connect()
        if self.stop_event.is_set():
            return
        self._restore()
        log.info("shipping %s to %s", ", ".join(self.paths), self.settings.bootstrap)
        last_lag = 0.0
        while not self.stop_event.is_set():
            started = time.monotonic()
            n = self.ship_once()
            now = time.monotonic()
            if now - last_lag > 2.0:
                self.metrics.lag.set(self.tailer.lag_bytes())
                last_lag = now
            if n < self.config.batch_lines:
                # Caught up: read again one poll interval after this read began, not at once. Shipping what a
                # few milliseconds wrote would cost the worker a message per partition for a record or two;
                # a line still waits at most one interval, as when the files are idle.
                self.stop_event.wait(max(0.0, self.config.poll_interval_s - (now - started)))

    def run_until_idle(self, idle_s: float = 1.0) -> int:
        """Ship until nothing new has arrived for idle_s (batch ingestion and tests)."""
        self._connect()
        self._restore()
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s and not self.stop_event.is_set():
            if self.ship_once():
                quiet_since = time.monotonic()
            else:
                time.sleep(self.config.poll_interval_s)
        return self.shipped_total

    def close(self, stalled: bool = False) -> None:
        self.stop_event.set()
        if self.producer is not None and stalled:
            self.producer.close(timeout=0)
        elif self.producer is not None:
            try:
                self.producer.flush(timeout=10)
                self._save(inflight=False)
            except KafkaError:
                log.warning("broker did not acknowledge the last records; they will be reconciled on restart")
            self.producer.close(timeout=5)
        self.tailer.close()


def default_checkpoint(paths: list[str], job: str | None) -> str:
    digest = hashlib.sha1(("|".join(sorted(paths)) + f"|{job}").encode()).hexdigest()[:12]
    base = os.environ.get("RANKWATCH_STATE_DIR") or os.path.join(Path.home(), ".cache", "rankwatch")
    return os.path.join(base, f"ckpt-{digest}.json")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="producer", description="Ship training logs to Kafka as typed records "
                                 "(--tail) and sample this node's GPUs (--gpu); one process can do both.")
    ap.add_argument("--tail", nargs="+", metavar="PATH", help="files or folders to follow")
    ap.add_argument("--job", help="job name (default: the tailed folder's name)")
    ap.add_argument("--rank", type=int, help="rank for lines whose rank cannot be inferred")
    ap.add_argument("--bootstrap", help="Kafka bootstrap servers host:port[,host:port]")
    ap.add_argument("--config", help="TOML config file ([shipper] section for these options, [[formats]] for "
                    "your own line formats)")
    ap.add_argument("--checkpoint", help="checkpoint file")
    ap.add_argument("--metrics-port", type=int, dest="metrics_port")
    ap.add_argument("--once", action="store_true", help="ship what is there, then exit when idle for 1 s")
    ap.add_argument("-v", "--verbose", action="store_true")
    from rankwatch.producers.gpu_cli import add_gpu_args

    add_gpu_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rankwatch.cli import quiet_libraries

    quiet_libraries(args.verbose)
    if not args.tail and not args.gpu:
        print("producer: give --tail PATH... and/or --gpu", file=sys.stderr)
        return 2
    cli = vars(args)
    try:
        settings = load_config(Settings, cli, path=args.config)
        config = load_config(ShipperConfig, cli, path=args.config, section="shipper")
        formats = load_user_formats(args.config)  # a bad [[formats]] pattern stops the shipper here, named
    except ConfigError as exc:
        print(f"producer: {exc}", file=sys.stderr)
        return 2
    registry = CollectorRegistry()
    gpu = None
    if args.gpu:
        from rankwatch.producers.gpu_cli import GpuRunError, setup_gpu

        try:
            gpu = setup_gpu(args, settings, registry)
        except GpuRunError as exc:
            print(f"producer: {exc}", file=sys.stderr)  # one clear line, non-zero exit
            return 2
    if not settings.bootstrap:
        settings.bootstrap = f"127.0.0.1:{settings.embedded_port}"
        log.info("no --bootstrap given; using the embedded broker at %s (start it with `rankwatch up`)",
                 settings.bootstrap)
    shipper = Shipper(args.tail, settings, config, registry=registry, formats=formats) if args.tail else None
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=settings.metrics_bind, registry=registry)
    stop = shipper.stop_event if shipper else threading.Event()

    def _stop(signum, frame):  # noqa: ARG001
        log.info("signal %d: finishing the current batch and stopping", signum)
        stop.set()
        if gpu is not None:
            gpu.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    gpu_thread = None
    if gpu is not None:
        gpu_thread = threading.Thread(target=gpu.run, name="rankwatch-gpu-sampler", daemon=True)
        gpu_thread.start()
    stalled = False
    try:
        if shipper is None:
            assert gpu_thread is not None
            while gpu_thread.is_alive():
                gpu_thread.join(0.5)
        elif args.once:
            n = shipper.run_until_idle()
            log.info("shipped %d lines", n)
        else:
            shipper.run()
    except StoppedWhileStalled as exc:
        stalled = True
        log.warning("stopped while stalled (%s); they are reconciled on the next start", exc)
    finally:
        if gpu is not None:
            if shipper is not None and not args.once:
                gpu.stop.set()
            if gpu_thread is not None:
                gpu_thread.join()
        if shipper is not None:
            shipper.close(stalled=stalled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
