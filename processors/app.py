"""The Faust app: one thin agent per record family. decode -> pipeline -> anomalies topic -> metrics."""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, replace

import faust
import orjson
from prometheus_client import start_http_server
from rankwatch.processors.pipeline import DetectionConfig, Pipeline
from rankwatch.processors.sinks import WorkerMetrics
from rankwatch.processors.watermarks import Watermarks

from rankwatch.config import Settings
from rankwatch.records import dead_letter, decode_records, encode_pack

log = logging.getLogger("rankwatch.worker")


@dataclass
class WorkerConfig:
    batch_size: int = 500  # messages per micro-batch taken from a topic
    # ... judged in slices of at most this many records (a batch of 256 KiB packs can hold 600,000). Slices of
    # 8,192 cost the LSTM's overlap with the event loop (each waits on its own last forward passes): 47k -> 37-43k
    # op records/s in bench_worker_capacity.py --predictor auto
    max_batch_records: int = 65536
    # A batch of at least this many op records gives its op verdicts with the next batch (0: never): the LSTM's
    # forward passes of batch j then run on the other cores while the event loop reads and builds batch j+1,
    # instead of the loop waiting for them. Its messages are acked (committed) only once its findings are out
    defer_op_records: int = 4096
    defer_flush_s: float = 0.05  # ... or when no batch has come for this long
    # ... and only a batch of at least this many messages (0: a full batch, `batch_size`: more is waiting, the
    # worker is behind). Caught up, a batch is finished at once: the next may be a fetch away, and detection
    # latency matters more than throughput there (deferred: p99 1.43 s at 20,000 op records/s, docs/PERFORMANCE.md)
    defer_min_messages: int = 0
    batch_within_s: float = 0.05
    # Kafka group timeouts. The embedded broker completes a join only after the rebalance timeout, so
    # `rankwatch up` and the demo use 5/6/1; production clusters can keep Faust's longer defaults.
    rebalance_timeout_s: float = 60.0
    session_timeout_s: float = 60.0
    heartbeat_interval_s: float = 3.0
    fetch_max_wait_ms: int = 100  # Faust hard-codes 1500 ms; a broker that holds empty fetches that long
    # (the embedded one does) adds up to 1.5 s of detection latency
    state_file: str | None = None  # detector state snapshot: loaded at start, saved periodically and at stop
    state_interval_s: float = 30.0
    start_from: str = "earliest"  # where a new consumer group starts: earliest | latest
    tick_interval_s: float = 1.0  # how often stage 2 judges silent jobs (hangs)
    progress_interval_s: float = 0.25  # how often each worker reports its watermarks (bounds detection latency)
    caught_up_messages: int = 0  # a partition at most this many messages behind counts as read to its end ...
    caught_up_s: float = 0.25  # ... as does one whose unread messages arrived in the last this many seconds
    lag_interval_s: float = 2.0
    gc_freeze_s: float = 10.0  # survivors move to the permanent generation this often (0: Python's own GC only)
    gc_full_s: float = 600.0  # ... and are unfrozen and collected in full this often (cycles among them)


EMBEDDED_GROUP_TIMEOUTS = {"rebalance_timeout_s": 5.0, "session_timeout_s": 6.0, "heartbeat_interval_s": 1.0}


def make_app(settings: Settings, detection: DetectionConfig | None = None, worker: WorkerConfig | None = None,
             metrics: WorkerMetrics | None = None) -> faust.App:
    worker = worker or WorkerConfig()
    app = faust.App(
        settings.app_id,
        broker=settings.faust_broker(),
        broker_credentials=settings.faust_credentials(),
        broker_rebalance_timeout=worker.rebalance_timeout_s,
        broker_session_timeout=worker.session_timeout_s,
        broker_heartbeat_interval=worker.heartbeat_interval_s,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_disable_leader=True,
        web_enabled=False,
        store="memory://",
        consumer_auto_offset_reset=worker.start_from,
        producer_acks=-1,
    )
    # training rounds of the collective-timing LSTM run on a thread in the worker: a round (~0.4 s) inside the
    # event loop would hold every partition's records back that long (`analyze` trains in line: reproducible)
    pipeline = Pipeline(replace(detection or DetectionConfig(), op_background_training=True))
    if worker.state_file:
        load_pipeline_state(pipeline, worker.state_file)
    metrics = metrics or WorkerMetrics(max_job_labels=settings.max_job_labels)
    app.rankwatch_pipeline = pipeline  # type: ignore[attr-defined]
    app.rankwatch_metrics = metrics  # type: ignore[attr-defined]
    def raw_topic(name: str):
        # bytes in, bytes out: decoding is ours, so a bad message is counted and dead-lettered, not fatal
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    anomalies = raw_topic(settings.topic_anomalies)
    deadletter = raw_topic(settings.topic_deadletter)
    summaries_topic = raw_topic(settings.topic_summaries)
    outbox_topics = {fam: raw_topic(name) for fam, name in settings.topics().items()}
    sources = {kind: settings.topics()[kind] for kind in ("metrics", "log", "op", "gpu")}
    families = {topic: kind for kind, topic in sources.items()}
    summary_partitions: dict[str, int] = {}  # job -> the summaries partition its stage-2 state belongs to
    held_since: dict[int, float] = {}  # summaries partition -> when this worker last held it
    watermarks = Watermarks()  # how far this worker has read each job's records (processors/watermarks.py)
    source = f"{socket.gethostname()}:{os.getpid()}"

    async def publish(found) -> None:
        for anomaly in found:
            await anomalies.send(key=anomaly.key().encode(), value=anomaly.encode())
            metrics.observe_anomaly(anomaly.detector, anomaly.severity, anomaly.signal, anomaly.job,
                                    anomaly.score, time.time(), anomaly.context.get("role"))
        for family, key, value in pipeline.outbox.drain():
            await outbox_topics[family].send(key=key.encode(), value=orjson.dumps(
                value, option=orjson.OPT_SERIALIZE_NUMPY))
        metrics.sync_gauges(pipeline.gauges)

    def count_skipped(errors_before: int) -> None:
        if pipeline.errors > errors_before:
            metrics.pipeline_errors.inc(pipeline.errors - errors_before)
            log.warning("%d records skipped by the pipeline; last: %s", pipeline.errors - errors_before,
                        pipeline.last_error)

    # (topic, partition) -> offset of the last message judged. Faust's read offset runs ahead of it: messages
    # waiting in the agent's queue and buffer, and a batch's later slices, are read but not judged yet
    judged: dict[tuple[str, int], int] = {}

    # batches whose op verdicts were deferred (WorkerConfig.defer_op_records), or that came while one was:
    # (deferred batches begun when it was held, its events, its last offsets). Their messages are neither
    # acked nor counted as judged until every batch deferred by then has given its findings
    held: collections.deque = collections.deque()
    busy = [0, time.monotonic()]  # handle() calls under way, when the last one ended

    def release_held() -> None:
        done = pipeline.deferred[1]
        while held and held[0][0] <= done:
            _, events, ends = held.popleft()
            for ev in events:
                ev.ack()  # the refcount taken when it was held: now Faust may commit it
            judged.update(ends)

    async def handle(events) -> None:
        busy[0] += 1
        try:
            await handle_batch(events)
        finally:
            busy[0] -= 1
            busy[1] = time.monotonic()

    async def handle_batch(events) -> None:
        """Stage 1: per-key detectors; summaries go on to the job's stage 2 through the summaries topic."""
        records: list = []
        partitions: list[int] = []  # per record: the partition it came from
        ends: dict[tuple[str, int], int] = {}  # per (topic, partition): the batch's last offset
        kinds: dict[str, int] = {}
        now = time.time()
        for ev in events:
            msg = ev.message
            tp = (msg.topic, msg.partition)
            ends[tp] = max(ends.get(tp, -1), msg.offset)
            decoded, errors = decode_records(ev.value or b"")
            if errors:
                metrics.decode_errors.labels(msg.topic).inc(len(errors))
                await deadletter.send(key=ev.key, value=dead_letter(
                    f"{len(errors)} invalid record(s): {errors[0]}", ev.value or b"", stage="decode"))
            if not decoded:
                continue
            if msg.timestamp:  # the records of one message share its produce time: one age per message
                metrics.latency.observe(max(0.0, now - msg.timestamp))
            records.extend(decoded)
            partitions.extend([msg.partition] * len(decoded))
        for rec in records:
            kinds[rec.kind] = kinds.get(rec.kind, 0) + 1
        for kind, n in kinds.items():  # one labelled increment per kind and batch, not per record
            metrics.events.labels(kind).inc(n)
        # A batch of 500 messages can hold ~50,000 op records (a node's read is one message), and far more of
        # records packed to 256 KiB: judged in slices, each slice's findings and summaries out before the next
        step = max(1, worker.max_batch_records)
        defer = (0 < worker.defer_op_records <= kinds.get("op", 0)
                 and len(events) >= (worker.defer_min_messages or worker.batch_size))
        for a in range(0, len(records), step):
            await judge(records[a:a + step], partitions[a:a + step], defer)
            if a + step < len(records):
                await asyncio.sleep(0)  # let the summaries and anomalies go out, and progress be reported
        begun, done = pipeline.deferred
        if begun > done:  # op verdicts still to come: Faust acks this batch when we return, unless held
            for ev in events:
                ev.message.incref()
            held.append((begun, events, ends))
        else:
            judged.update(ends)  # only now do progress reports count these messages as read

    async def send_summaries(summaries: list) -> None:
        by_job: dict[str, list] = {}
        for s in summaries:
            by_job.setdefault(s["job"], []).append(s)
        for job, items in by_job.items():  # packs per job, like the shipper's, within the message size limit
            for pack in packs([orjson.dumps(i, option=orjson.OPT_SERIALIZE_NUMPY) for i in items]):
                await summaries_topic.send(key=job.encode(), value=pack)

    async def judge(records: list, partitions: list[int], defer: bool = False) -> None:
        # (job, family, partition, key) -> the latest event time of the slice: one watermark update per key
        latest: dict[tuple[str, str, int, str], float] = {}
        for rec, partition in zip(records, partitions, strict=True):
            mark = (rec.job, rec.family(), partition, rec.key())
            if rec.ts > latest.get(mark, -math.inf):
                latest[mark] = rec.ts
        errors_before = pipeline.errors
        found, summaries = pipeline.first_stage(records, defer)
        count_skipped(errors_before)
        await send_summaries(summaries)
        # only now may a progress report cover these records: their summaries are ahead of it in the topic
        now = time.time()  # when these keys moved: after their slice, not when the batch began
        for (job, family, partition, key), ts in latest.items():
            watermarks.observe(job, family, partition, key, ts, now)
        await publish(found)
        release_held()

    if worker.defer_op_records > 0:

        @app.timer(worker.defer_flush_s)
        async def flush_deferred() -> None:
            """A deferred batch's findings when no batch follows it soon (never in the middle of one: its
            summaries must reach stage 2 before its findings)."""
            begun, done = pipeline.deferred
            if begun == done or busy[0] or time.monotonic() - busy[1] < worker.defer_flush_s:
                return
            errors_before = pipeline.errors
            found, summaries = pipeline.flush_deferred()
            count_skipped(errors_before)
            await send_summaries(summaries)
            await publish(found)
            release_held()

    for kind, topic_name in sources.items():
        topic = raw_topic(topic_name)

        async def agent(stream, _kind=kind):
            async for events in stream.take_events(worker.batch_size, within=worker.batch_within_s):
                await handle(events)

        app.agent(topic, name=f"rankwatch.{kind}")(agent)

    @app.agent(summaries_topic, name="rankwatch.stage2")
    async def second_stage(stream):
        """Stage 2: cross-rank detectors of the jobs whose summaries partitions this worker holds."""
        async for events in stream.take_events(worker.batch_size, within=worker.batch_within_s):
            summaries = []
            for ev in events:
                try:
                    items = orjson.loads(ev.value or b"")
                except orjson.JSONDecodeError as exc:
                    metrics.decode_errors.labels(ev.message.topic).inc()
                    await deadletter.send(key=ev.key, value=dead_letter(f"not JSON: {exc}", ev.value or b"",
                                                                        stage="decode"))
                    continue
                items = items if isinstance(items, list) else [items]
                for item in items:
                    if isinstance(item, dict) and "job" in item:
                        summary_partitions[str(item["job"])] = ev.message.partition
                        summaries.append(item)
            metrics.events.labels("summary").inc(len(summaries))
            errors_before = pipeline.errors
            found = pipeline.second_stage(summaries, wall=time.time())
            count_skipped(errors_before)
            await publish(found)

    @app.timer(worker.progress_interval_s)
    async def report_progress() -> None:
        """Tell each job's stage 2 how far this worker has read its records (a low watermark): the clock
        that judges silence and releases held findings (processors/stages.py) trusts no more than that."""
        positions = behind_by_partition()
        assigned: dict[str, list[int]] = {}
        for topic, part in positions:
            if topic in families:
                assigned.setdefault(families[topic], []).append(part)
        now = time.time()

        def backlog(fam: str, part: int) -> float:
            tp = (sources.get(fam, ""), part)
            return backlog_s(tp, *positions.get(tp, (1, None)), now)

        by_job: dict[str, list[bytes]] = {}
        for job, ts in watermarks.report(now, backlog, assigned, worker.caught_up_s).items():
            by_job.setdefault(job, []).append(orjson.dumps(
                {"type": "progress", "job": job, "family": "all", "source": source, "ts": ts}))
        for job, encoded in by_job.items():
            for pack in packs(encoded):  # after this worker's summaries of those records: same partition
                await summaries_topic.send(key=job.encode(), value=pack)

    @app.timer(worker.tick_interval_s)
    async def tick_jobs() -> None:
        """Hangs are the absence of events: judge each owned job on its clock."""
        now = time.time()
        assigned = {tp.partition for tp in app.consumer.assignment() if tp.topic == settings.topic_summaries}
        for part in assigned:
            held_since[part] = now
        owned = [job for job, part in summary_partitions.items() if part in assigned]
        # a partition away for a while went to another worker in a rebalance: its jobs' state is theirs now
        # (not at once: the assignment is briefly empty while a rebalance is under way)
        gone = [job for job, part in summary_partitions.items() if now - held_since.get(part, now) > 30.0]
        if gone:
            pipeline.drop_jobs(gone)
            for job in gone:
                summary_partitions.pop(job, None)
        await publish(pipeline.tick(now, owned))

    arrivals: dict[tuple[str, int], list[float]] = {}  # (topic, partition) -> [high water, when, messages/s]

    def backlog_s(tp: tuple[str, int], n: int, high: int | None, now: float) -> float:
        """Seconds of unread messages in a partition (`n` of them, `high` its high water): the backlog over its
        arrival rate (smoothed over the progress reports). 0 when read to its end, inf while the rate is
        unknown."""
        if n <= worker.caught_up_messages:
            return 0.0
        if high is None:  # not yet fetched
            return math.inf
        seen = arrivals.get(tp)
        if seen is None or high < seen[0]:
            arrivals[tp] = [high, now, 0.0]
            return math.inf
        if now - seen[1] >= worker.progress_interval_s / 2:
            rate = (high - seen[0]) / (now - seen[1])
            seen[2] = rate if seen[2] == 0.0 else 0.7 * seen[2] + 0.3 * rate
            seen[0], seen[1] = high, now
        return n / seen[2] if seen[2] > 0 else math.inf

    def behind_by_partition() -> dict[tuple[str, int], tuple[int, int | None]]:
        """(messages not yet read, high water) per (topic, partition) of this worker's assignment. A partition
        not fetched yet counts as far behind: nothing is known of it."""
        consumer = app.consumer
        out: dict[tuple[str, int], tuple[int, int | None]] = {}
        assignment = consumer.assignment()
        held = {(tp.topic, tp.partition) for tp in assignment}
        for gone in [tp for tp in judged if tp not in held]:  # revoked: if it comes back, from Faust's read on
            del judged[gone]
        for tp in assignment:
            try:
                high = consumer.highwater(tp)
            except Exception:  # noqa: BLE001 - not yet fetched
                high = None
            # the last offset judged (see `judged`); before this worker judged any of a partition (a source topic
            # quiet since a restart, or one no agent here judges), the last Faust read (private, the only source)
            pos = judged.get((tp.topic, tp.partition))
            if pos is None:
                pos = getattr(consumer, "_read_offset", {}).get(tp)
            out[(tp.topic, tp.partition)] = (1 << 30 if high is None else max(
                0, high - (pos + 1 if pos is not None else 0)), high)
        return out

    @app.agent(deadletter, name="rankwatch.deadletter")
    async def count_dead_letters(stream):
        # Shippers parse, so their parse errors reach the worker only here: one place to see them all.
        async for value in stream:
            try:
                d = orjson.loads(value)
                stage, job = str(d.get("stage", "parse")), str(d.get("job") or "")
            except (orjson.JSONDecodeError, AttributeError):
                stage, job = "unknown", ""
            metrics.parse_errors.labels(stage[:20], metrics.job_label(job)).inc()

    if worker.state_file:
        state_file = worker.state_file

        @app.timer(worker.state_interval_s)
        async def snapshot_state() -> None:
            try:
                save_pipeline_state(pipeline, state_file)
            except Exception:  # noqa: BLE001 - a failed snapshot must not stop detection (the last one stays)
                metrics.state_save_errors.inc()
                log.exception("cannot save the detectors' state to %s; keeping the previous snapshot", state_file)

    if worker.gc_freeze_s > 0:
        last_full = [time.monotonic()]

        @app.timer(worker.gc_freeze_s)
        async def freeze_heap() -> None:
            """A worker holds hundreds of thousands of long-lived objects (Faust, torch, every key's detector
            state), and each of Python's full collections walks them all: measured on a 1,024-rank backlog, 26
            full collections of ~170 ms in 40 s, 4.3 s of the event loop, each a pause in detection. Frozen, they
            are skipped (2.2 s over the same run, mostly before the first freeze). Reference counting still frees
            them; only cycles among frozen objects wait for the periodic full collection."""
            now = time.monotonic()
            if now - last_full[0] >= worker.gc_full_s:
                last_full[0] = now
                gc.unfreeze()
                gc.collect()
            gc.freeze()

    @app.timer(worker.lag_interval_s)
    async def report_lag() -> None:
        by_topic: dict[str, int] = {}
        for (topic, _), (behind, _) in behind_by_partition().items():
            if behind < 1 << 30:  # never fetched: unknown, not a number of messages
                by_topic[topic] = by_topic.get(topic, 0) + behind
        for topic, behind in by_topic.items():
            metrics.lag.labels(topic).set(behind)

    return app


def packs(encoded: list[bytes], limit: int = 256 * 1024) -> list[bytes]:
    """JSON arrays of the encoded items, each at most `limit` bytes (one item alone may exceed it): a pack per
    message divides the producer's per-message cost, and Kafka refuses messages over ~1 MB."""
    out: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for item in encoded:
        if group and size + len(item) + 1 > limit:
            out.append(encode_pack(group))
            group, size = [], 0
        group.append(item)
        size += len(item) + 1
    if group:
        out.append(encode_pack(group))
    return out


def save_pipeline_state(pipeline: Pipeline, path: str) -> None:
    """Atomic JSON snapshot of every detector's learned state (no pickle: it is read back at start)."""
    from rankwatch.producers.checkpoint import CheckpointStore

    CheckpointStore(path).save({"pipeline": pipeline.save_state(), "saved_at": time.time()})


def load_pipeline_state(pipeline: Pipeline, path: str) -> None:
    """Warm start: a restarted worker judges from the first record instead of re-learning every window."""
    from rankwatch.producers.checkpoint import CheckpointStore

    state = CheckpointStore(path).load()
    if state.get("pipeline"):
        pipeline.load_state(state["pipeline"])
        log.info("restored detector state (%d jobs with cross-rank state) from %s", len(pipeline.jobs), path)


def cap_fetch_wait(max_ms: int) -> None:
    """Faust passes fetch_max_wait_ms=1500 to aiokafka with no setting to change it; cap it in this process."""
    import aiokafka

    original = aiokafka.AIOKafkaConsumer.__init__
    if getattr(original, "_rankwatch_capped", False):
        return

    def __init__(self, *args, **kwargs):  # noqa: N807
        kwargs["fetch_max_wait_ms"] = min(int(kwargs.get("fetch_max_wait_ms", 500)), max_ms)
        original(self, *args, **kwargs)

    __init__._rankwatch_capped = True  # type: ignore[attr-defined]
    aiokafka.AIOKafkaConsumer.__init__ = __init__


def run_worker(settings: Settings, detection: DetectionConfig | None = None,
               worker: WorkerConfig | None = None, loglevel: str = "warning") -> None:
    """Blocking: serve /metrics and run the Faust worker until SIGINT/SIGTERM."""
    metrics = WorkerMetrics(max_job_labels=settings.max_job_labels)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_bind, registry=metrics.registry)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_bind, settings.metrics_port)
    worker = worker or WorkerConfig()
    cap_fetch_wait(worker.fetch_max_wait_ms)
    app = make_app(settings, detection, worker, metrics)
    from faust import Worker

    try:
        Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
    finally:
        if worker.state_file:  # agents have stopped: the state is final for this run
            save_pipeline_state(app.rankwatch_pipeline, worker.state_file)
